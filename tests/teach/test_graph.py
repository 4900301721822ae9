#!/usr/bin/env python3
"""tests/teach/test_graph.py: `qsm graph` draws exactly the table the engine runs.

The reference is sm/states.def itself, parsed here with regular expressions
(independently of the C preprocessor that builds qsm):
  1. `qsm graph --list` prints the same machines, states, events, transitions;
  2. for every machine (and `all`), the DOT output parses with Graphviz's dot
     (dot -Tjson0), has a node for every state the machine uses and only
     those, one edge per transition of the machine with the right ends and
     label and no other edge except the one implicit ERROR -> DONE edge;
     `all` covers every state of the enum;
  3. the committed tools/doc/<machine>.dot equal the output (not stale), and
     each tools/doc/<machine>.svg draws the same nodes and edges;
  4. bad input: unknown machine or format, and svg without dot, fail with a
     message naming the problem and write nothing;
  5. the edges between requests (WAKES lines): each names an edge of the
     table and a state its waker has; `all` draws one dashed edge per
     (waiting machine, waking machine) from the waker's state to the waiting
     state, a single machine's diagram the edges inside it and a note for
     each other machine that wakes it or that it wakes; `--list` prints them;
  6. write-back levels: every WRITEBACK edge into a sync state (description
     "fdatasync...") says under its event label what that sync makes durable:
     what its source state writes, and the guest data written before the
     snapshot when no sync can precede it (the batch's first sync).
Exit 77 (skipped) after the checks that need no dot when dot is missing.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

QSM = os.environ.get("QSM", "build/qsm")
SRC = os.environ.get("QSM_SRC", os.path.join(os.path.dirname(__file__), "..", ".."))
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg)


def parse_def(path):
    text = open(path).read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    machines = re.findall(r'^MACHINE\((\w+),\s*"([^"]*)"\)', text, re.M)
    states = re.findall(r'^STATE\((\w+),\s*"([^"]*)"\)', text, re.M)
    events = re.findall(r'^EVENT\((\w+),\s*"([^"]*)"\)', text, re.M)
    trans = re.findall(r"^TRANSITION(?:_BACK)?\((\w+),\s*(\w+),\s*(\w+),\s*(\w+)\)", text, re.M)
    wakes = re.findall(r'^WAKES\((\w+),\s*(\w+),\s*(\w+),\s*(\w+),\s*(\w+),\s*"([^"]*)"\)',
                       text, re.M)
    return machines, states, events, trans, wakes


def run(args, **kw):
    return subprocess.run([QSM] + args, capture_output=True, text=True, **kw)


machines, states, events, trans, wakes = parse_def(os.path.join(SRC, "sm", "states.def"))
assert machines and states and events and trans and wakes, "could not parse sm/states.def"
labels = dict(events)
descs = dict(states)
state_names = [s for s, _ in states]
machine_names = [m for m, _ in machines]


def uses(m):
    return {s for t in trans if t[0] == m for s in (t[1], t[3])} | {"START", "DONE"}


def applies(w, m):
    return w[0] in ("ANY", m) and any(t[:3] == (m, w[1], w[2]) for t in trans)


def wake_by(w, m, b):
    if w[4] not in uses(b):
        return False
    if w[3] != "ANY":
        return w[3] == b
    return b == m if w[4] in uses(m) else True


for w in wakes:
    if not any(applies(w, m) for m in machine_names):
        fail(f"WAKES{w[:5]}: no machine has the edge {w[1]} --{w[2]}-->")
    elif not any(wake_by(w, m, b) for m in machine_names if applies(w, m) for b in machine_names):
        fail(f"WAKES{w[:5]}: no waker has state {w[4]}")
    if "wait" not in descs.get(w[1], "") and w[1] != "START":
        fail(f"WAKES{w[:5]}: the description of {w[1]} does not say it waits")


def expected_wakes(opt):
    """{edge id: (tail, head, label)} and {note id} of one diagram."""
    edges, notes = {}, set()
    for i, w in enumerate(wakes):
        m_, s, ev, by, bs, label = w
        if opt == "ALL":
            for m in machine_names:
                for b in machine_names:
                    if applies(w, m) and wake_by(w, m, b):
                        edges[f"wake:{m}:{s}:{ev}:{b}:{bs}"] = (f"{b}__{bs}", f"{m}__{s}", "")
            continue
        m = opt
        if applies(w, m):
            if wake_by(w, m, m):
                edges[f"wake:{m}:{s}:{ev}:{m}:{bs}"] = (f"{m}__{bs}", f"{m}__{s}", label)
            if any(b != m and wake_by(w, m, b) for b in machine_names):
                notes.add(f"note:{m}:{s}:{ev}:{bs}")
                edges[f"wake:{m}:{s}:{ev}:others:{bs}"] = ("note", f"{m}__{s}", label)
        if any(o != m and applies(w, o) and wake_by(w, o, m) for o in machine_names):
            notes.add(f"note:wakes:{s}:{ev}:{m}:{bs}")
            edges[f"wake:*:{s}:{ev}:{m}:{bs}"] = (f"{m}__{bs}", "note", label)
    return edges, notes


def wb_reach():
    """WRITEBACK states reachable from START with no sync before them, and
    with one."""
    is_sync = lambda s: descs[s].startswith("fdatasync")
    seen, todo = {("START", False)}, [("START", False)]
    while todo:
        s, y = todo.pop()
        ny = y or is_sync(s)
        for t in trans:
            if t[0] == "WRITEBACK" and t[1] == s and (t[3], ny) not in seen:
                seen.add((t[3], ny))
                todo.append((t[3], ny))
    return {s for s, y in seen if not y}, {s for s, y in seen if y}


FIRST, LATER = wb_reach()


def edge_label(t):
    """The label of a table edge: its event's, plus for an edge into a
    WRITEBACK sync state what the sync makes durable."""
    lab = labels[t[2]]
    if t[0] != "WRITEBACK" or not descs[t[3]].startswith("fdatasync"):
        return lab
    d = descs[t[1]]
    what = d[6:] if d.startswith("write ") else ""
    lab += "\n=> sync makes durable: " + what
    if t[1] in FIRST:
        lab += (" + " if what else "") + "the guest data written before the snapshot"
        if t[1] in LATER:
            lab += " (when first)"
    return lab


sync_edges = [t for t in trans if edge_label(t) != labels[t[2]]]
if not any("guest data" in edge_label(t) and t[1] != "WB_COLLECT" for t in sync_edges):
    fail("no write-back level's sync is marked as covering the guest data")

# 1. --list agrees with the .def
r = run(["graph", "--list"])
if r.returncode != 0:
    fail(f"qsm graph --list exited {r.returncode}: {r.stderr}")
got = {"machine": [], "state": [], "event": [], "transition": [], "wakes": []}
for line in r.stdout.splitlines():
    kind, rest = line.split(" ", 1)
    got[kind].append(rest)
if got["machine"] != [f"{m} {d}" for m, d in machines]:
    fail("--list machines differ from sm/states.def")
if got["state"] != [f"{s} {d}" for s, d in states]:
    fail("--list states differ from sm/states.def")
if got["event"] != [f"{e} {l}" for e, l in events]:
    fail("--list events differ from sm/states.def")
if got["transition"] != [" ".join(t) for t in trans]:
    fail("--list transitions differ from sm/states.def")
if got["wakes"] != [" ".join(w) for w in wakes]:
    fail("--list wakes differ from sm/states.def")


def expected(machine):
    """(nodes, edges) the graph of one machine must have."""
    ts = [t for t in trans if t[0] == machine]
    nodes = {f"{machine}__{s}" for t in ts for s in (t[1], t[3])}
    nodes |= {f"{machine}__START", f"{machine}__DONE"}
    edges = {(f"{machine}:{t[1]}:{t[2]}:{t[3]}", f"{machine}__{t[1]}", f"{machine}__{t[3]}",
              edge_label(t)) for t in ts}
    return nodes, edges, f"{machine}:*:ERROR:DONE"


def split(nodes, edges):
    """(state nodes, table edges) and (note ids, {wake edge id: (tail, head,
    label)}), note names read as "note"."""
    notes = {n for n in nodes if n.startswith("note_")}
    wk = {e[0]: ("note" if e[1].startswith("note_") else e[1],
                 "note" if e[2].startswith("note_") else e[2], e[3])
          for e in edges if e[0].startswith("wake:")}
    return (nodes - notes, {e for e in edges if not e[0].startswith("wake:")}), wk


def text_graph(dot):
    """Nodes and edges of our generator's DOT text (one statement per line);
    notes by their id."""
    nodes, edges, note_ids = set(), set(), set()
    for line in dot.splitlines():
        m = re.match(r'\s*(\w+) -> (\w+) \[id="([^"]+)", (?:ltail=\w+, )?label="([^"]*)"', line)
        if m:
            edges.add((m.group(3), m.group(1), m.group(2), m.group(4).replace("\\n", "\n")))
            continue
        m = re.match(r'\s*(\w+) \[(?:id="([^"]+)", )?(?:shape=\w+, )?(?:style="", )?.*label=', line)
        if m and not line.strip().startswith(("graph ", "node ", "edge ")):
            nodes.add(m.group(1))
            if m.group(1).startswith("note_"):
                note_ids.add(m.group(2))
    (n, e), wk = split(nodes, edges)
    return n, e, wk, note_ids


def dot_graph(dot):
    """Nodes and edges as Graphviz itself parsed them."""
    r = subprocess.run(["dot", "-Tjson0"], input=dot, capture_output=True, text=True)
    if r.returncode != 0 or r.stderr.strip():
        fail(f"dot could not parse the output: {r.stderr.strip()}")
        return set(), set()
    g = json.loads(r.stdout)
    objs = g.get("objects", [])
    names = {o["_gvid"]: o["name"] for o in objs if "nodes" not in o and "subgraphs" not in o
             and not o["name"].startswith("cluster")}
    nodes = set(names.values())
    edges = {(e["id"], names[e["tail"]], names[e["head"]], e.get("label", "").replace("\\n", "\n"))
             for e in g.get("edges", [])}
    return split(nodes, edges)[0]


def check_graph(what, nodes, edges, want_machines):
    want_nodes, want_edges = set(), set()
    implicit = set()
    for m in want_machines:
        n, e, imp = expected(m)
        want_nodes |= n
        want_edges |= e
        implicit.add(imp)
    if nodes != want_nodes:
        fail(f"{what}: nodes differ: missing {sorted(want_nodes - nodes)}, extra {sorted(nodes - want_nodes)}")
    table_edges = {e for e in edges if "*" not in e[0]}
    if table_edges != want_edges:
        fail(f"{what}: edges differ: missing {sorted(want_edges - table_edges)}, "
             f"extra {sorted(table_edges - want_edges)}")
    imp_edges = {e for e in edges if "*" in e[0]}
    if {e[0] for e in imp_edges} != implicit or len(imp_edges) != len(implicit):
        fail(f"{what}: implicit error edges {sorted(e[0] for e in imp_edges)}, want {sorted(implicit)}")
    for e in imp_edges:
        m = e[0].split(":")[0]
        if e[2] != f"{m}__DONE" or not e[3].startswith(labels["ERROR"]):
            fail(f"{what}: implicit edge {e} must go to DONE labelled '{labels['ERROR']}'")


have_dot = shutil.which("dot") is not None
options = [m.lower() for m, _ in machines] + ["all"]
for opt in options:
    r = run(["graph", "--machine", opt])
    if r.returncode != 0:
        fail(f"qsm graph --machine {opt} exited {r.returncode}: {r.stderr}")
        continue
    want = [m for m, _ in machines] if opt == "all" else [opt.upper()]
    tn, te, twk, tnotes = text_graph(r.stdout)
    check_graph(f"{opt} (text)", tn, te, want)
    ww, wnotes = expected_wakes(opt.upper())
    if twk != ww:
        fail(f"{opt}: wake edges differ: missing {sorted(set(ww) - set(twk))}, extra "
             f"{sorted(set(twk) - set(ww))}, wrong {sorted(k for k in ww if k in twk and ww[k] != twk[k])}")
    if tnotes != wnotes:
        fail(f"{opt}: notes differ: want {sorted(wnotes)}, got {sorted(tnotes)}")
    if have_dot:
        check_graph(f"{opt} (dot)", *dot_graph(r.stdout), want)
    if opt == "all":
        used = {n.split("__", 1)[1] for n in tn}
        if used != set(state_names):
            fail(f"--machine all lacks states of the enum: {sorted(set(state_names) - used)}")
    # 3. the committed copies
    committed = os.path.join(SRC, "tools", "doc", f"{opt}.dot")
    if not os.path.exists(committed) or open(committed).read() != r.stdout:
        fail(f"tools/doc/{opt}.dot is stale: run `cmake --build build --target diagrams`")
    svg = os.path.join(SRC, "tools", "doc", f"{opt}.svg")
    if not os.path.exists(svg):
        fail(f"tools/doc/{opt}.svg is missing: run `cmake --build build --target diagrams`")
    else:
        text = open(svg).read()
        titles = set(re.findall(r"<title>([^<]*)</title>", text))
        ids = set(re.findall(r'<g id="([A-Z0-9_]+:[A-Z0-9_*]+:[A-Z0-9_]+:[A-Z0-9_]+)" class="edge"', text))
        wids = set(re.findall(r'<g id="(wake:[^"]+)" class="edge"', text))
        if not tn <= titles or ids != {e[0] for e in te} or wids != set(ww):
            fail(f"tools/doc/{opt}.svg is stale: run `cmake --build build --target diagrams`")

# 4. bad input
with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "x.svg")
    r = subprocess.run([QSM, "graph", "--format", "svg", "-o", out], capture_output=True,
                       text=True, env=dict(os.environ, PATH=tmp))
    if r.returncode == 0 or r.stderr.strip() != "qsm graph: svg needs Graphviz's dot (apt-get install graphviz)":
        fail(f"svg without dot: exit {r.returncode}, stderr {r.stderr!r}")
    if os.path.exists(out):
        fail("svg without dot wrote the output file")
    r = run(["graph", "--machine", "nosuch", "-o", out])
    if r.returncode == 0 or "unknown machine 'nosuch'" not in r.stderr or os.path.exists(out):
        fail(f"unknown machine: exit {r.returncode}, stderr {r.stderr!r}")
    r = run(["graph", "--format", "png", "-o", out])
    if r.returncode == 0 or "unknown format 'png'" not in r.stderr or os.path.exists(out):
        fail(f"unknown format: exit {r.returncode}, stderr {r.stderr!r}")
    if have_dot:
        r = run(["graph", "--machine", "read", "--format", "svg", "-o", out])
        if r.returncode != 0 or "<svg" not in open(out).read():
            fail(f"svg output: exit {r.returncode}, stderr {r.stderr!r}")

checks = len(options)
if failures:
    print(f"0 passed, {len(failures)} failed")
    sys.exit(1)
if not have_dot:
    print("SKIP: Graphviz's dot is not installed: the DOT text was checked, not parsed by dot")
    sys.exit(77)
print(f"graph checks passed for {checks} diagrams, {len(trans)} transitions, {len(wakes)} wake "
      f"declarations, {len(sync_edges)} write-back syncs annotated")
