#!/usr/bin/env python3
"""tests/teach/test_trace.py: request traces are valid and follow the table.

Runs `qsm io --trace FILE --trace-text FILE` on workloads of the interop
tests (tests/interop/gen_workload.py, sequential and concurrent aio, at 64k
and 4k clusters, small L2 caches so tables are evicted and reloaded), on a
write that freezes another behind its L2 allocation, on a COW over a backing
file, on a lazy-refcount crash (`abort`) and on `qsm bench --trace`, then
checks every trace:

  format  the JSON parses; every event has ph, ts, pid, tid, name; X slices
          have dur >= 0;
  nesting per track (tid): state slices appear in ts order without
          overlapping, inside the one request slice of the track;
  flows   each id has exactly one "s" and one "f"; the "s" lies inside a
          slice of its track, the "f" (bound to its enclosing slice) inside a
          wait slice of its track, s.ts <= f.ts;
  table   every transition seen (request slice's first transition, then each
          state slice's exit event and next state) is a TRANSITION of
          sm/states.def for that request's machine, or ERROR -> DONE; the
          slices chain (one's next state is the following slice) and end in
          DONE;
  text    one line per request, naming every state of its JSON slices in
          order (NEXT_RUN and L2_LOAD included), ending in "done <time>" (or
          "not finished" after a crash); a batch's "WB collect (...)" counts
          the writes of each level as the JSON WB_COLLECT slice does (1
          refcount block, 1 L2 table, 1 L1 range, adding up to meta_writes),
          and each "WB sync <level> (durable: ...)" names what the level before it
          wrote, the first one also "the data written before the batch".
Also: at least one freeze arrow, one durable-wait arrow and one L2 load were
seen (so the checks above had something to check).
"""
import json
import os
import re
import subprocess
import sys
import tempfile

QSM = os.environ.get("QSM", "build/qsm")
SRC = os.environ.get("QSM_SRC", os.path.join(os.path.dirname(__file__), "..", ".."))
SCALE = float(os.environ.get("QSM_TEST_SCALE", "1"))
GEN = os.path.join(SRC, "tests", "interop", "gen_workload.py")
MACHINE = {"write_zeroes": "ZEROES"}  # otherwise the kind in upper case

failures = []
seen = set()          # (machine, from, event, to)
stats = {"flows": 0, "frozen": 0, "durable": 0, "l2_load": 0, "requests": 0, "traces": 0,
         "next_run": 0, "wb_collect": 0, "wb_sync": 0}


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg)


DEF = re.sub(r"/\*.*?\*/", "", open(os.path.join(SRC, "sm", "states.def")).read(), flags=re.S)
TABLE = set(re.findall(r"^TRANSITION\((\w+),\s*(\w+),\s*(\w+),\s*(\w+)\)", DEF, re.M))
DESC = dict(re.findall(r'^STATE\((\w+),\s*"([^"]*)"\)', DEF, re.M))
# Per-level counts of a batch, in the order and words the text uses.
LEVELS = [("refblocks", "refcount block"), ("reftable", "refcount table write"),
          ("header", "header"), ("l2_tables", "L2 table"), ("l1_ranges", "L1 range")]


def collect_text(args, event):
    parts = [f"{args[k]} {w}{'' if args[k] == 1 else 's'}"
             for k, w in LEVELS if args[k]]
    s = ", ".join(parts) or "nothing to write"
    if event == "WB_LAZY":
        s += "; refcounts deferred"
    elif event == "WB_MARK_DIRTY":
        s += "; marks the image dirty first"
    return f"WB collect ({s})"


def sync_texts(states):
    """The "WB sync (durable: ...)" items a batch's slices call for."""
    out, prev, synced = [], None, False
    for s in states:
        if DESC.get(s["name"], "").startswith("fdatasync"):
            d = DESC.get(prev, "")
            what = d[6:] if d.startswith("write ") else ""
            data = "" if synced else "the data written before the batch"
            # the sync state's name as the text shows it: "WB_SYNC_L2" ->
            # "WB sync L2" (one sync state per level, sm/states.def)
            name = " ".join(w if w in ("WB", "L1", "L2") else w.lower()
                            for w in s["name"].split("_"))
            out.append(f"{name} (durable: {what}{' + ' if what and data else ''}{data})")
            synced = True
        prev = s["name"]
    return out


def words(state):
    return state.lower().replace("_", " ")


def check_trace(tag, json_path, text_path, finished=True):
    stats["traces"] += 1
    try:
        doc = json.load(open(json_path))
    except ValueError as e:
        fail(f"{tag}: JSON does not parse: {e}")
        return
    evs = doc["traceEvents"] if isinstance(doc, dict) else doc
    for i, e in enumerate(evs):
        for k in ("ph", "ts", "pid", "tid", "name"):
            if k not in e:
                fail(f"{tag}: event {i} has no {k}: {e}")
                return
        if e["ph"] == "X" and not e["dur"] >= 0:
            fail(f"{tag}: negative duration: {e}")
    names = {e["tid"]: e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    tracks = {}
    for e in evs:
        if e["ph"] == "X":
            tracks.setdefault(e["tid"], {"req": [], "states": []})
            tracks[e["tid"]]["req" if e["cat"] == "request" else "states"].append(e)
    eps = 0.0015  # ts are printed with 3 decimals
    for tid, t in tracks.items():
        if len(t["req"]) != 1:
            fail(f"{tag}: track {tid} has {len(t['req'])} request slices")
            continue
        req = t["req"][0]
        a = req["args"]
        m = MACHINE.get(a["kind"], a["kind"].upper())
        rs, re_ = req["ts"], req["ts"] + req["dur"]
        prev_end = rs
        prev_next = a["first_next"]
        tr = ("START", a["first_event"], a["first_next"])
        for s in [None] + t["states"]:
            if s is not None:
                if s["ts"] + eps < prev_end:
                    fail(f"{tag}: {names[tid]}: slice {s['name']} at {s['ts']} overlaps the one before (ends {prev_end})")
                if s["ts"] + eps < rs or s["ts"] + s["dur"] > re_ + eps:
                    fail(f"{tag}: {names[tid]}: slice {s['name']} not inside the request slice")
                if s["name"] != prev_next:
                    fail(f"{tag}: {names[tid]}: slice {s['name']} follows a transition to {prev_next}")
                prev_end = s["ts"] + s["dur"]
                tr = (s["name"], s["args"]["exit"], s["args"]["next"])
                prev_next = tr[2]
                if s["name"] == "FROZEN":
                    stats["frozen"] += 1
                if s["name"] == "DURABLE_WAIT":
                    stats["durable"] += 1
                if s["name"] == "L2_LOAD":
                    stats["l2_load"] += 1
            seen.add((m,) + tr)
            if (m,) + tr not in TABLE and not (tr[1] == "ERROR" and tr[2] == "DONE"):
                fail(f"{tag}: {names[tid]}: transition {m} {tr} is not in sm/states.def")
        if prev_next != "DONE":
            fail(f"{tag}: {names[tid]}: the last transition goes to {prev_next}, not DONE")
    # flows
    flows = {}
    for e in evs:
        if e["ph"] in ("s", "f"):
            flows.setdefault(e["id"], []).append(e)
    for fid, pair in flows.items():
        kinds = sorted(p["ph"] for p in pair)
        if kinds != ["f", "s"]:
            fail(f"{tag}: flow {fid} has events {kinds}")
            continue
        s = next(p for p in pair if p["ph"] == "s")
        f = next(p for p in pair if p["ph"] == "f")
        if s["ts"] > f["ts"] + eps:
            fail(f"{tag}: flow {fid} ends before it starts")
        sl = tracks.get(s["tid"], {"states": []})["states"]
        if not any(x["ts"] - eps <= s["ts"] <= x["ts"] + x["dur"] + eps for x in sl):
            fail(f"{tag}: flow {fid} starts outside any slice of track {s['tid']}")
        fl = tracks.get(f["tid"], {"states": []})["states"]
        if f.get("bp") != "e" or not any(
                x["name"] in ("FROZEN", "ALLOC_WAIT", "JOIN_WAIT", "DURABLE_WAIT", "L2_LOAD") and
                x["ts"] - eps <= f["ts"] <= x["ts"] + x["dur"] + eps for x in fl):
            fail(f"{tag}: flow {fid} does not end inside a wait slice of track {f['tid']}")
    stats["flows"] += len(flows)
    stats["requests"] += len(tracks)
    # counters
    for e in evs:
        if e["ph"] == "C" and not all(isinstance(v, (int, float)) for v in e["args"].values()):
            fail(f"{tag}: counter with non-numeric args: {e}")
    # text lines: same requests, same states
    lines = open(text_path).read().splitlines()
    by_head = {}
    for ln in lines:
        mo = re.match(r"^(#\d+ [a-z_]+(?: \S+)?): (.*)$", ln)
        if not mo:
            fail(f"{tag}: text line not understood: {ln}")
            continue
        by_head.setdefault(mo.group(1), []).append(mo.group(2))
        if not re.search(r"(done \d+us|done \d+\.\dms|not finished)$", ln):
            fail(f"{tag}: text line does not end in 'done <time>': {ln}")
    n_done = sum(1 for ln in lines if not ln.endswith("not finished"))
    if n_done != len(tracks):
        fail(f"{tag}: {n_done} finished text lines for {len(tracks)} finished requests")
    if finished and n_done != len(lines):
        fail(f"{tag}: unfinished requests in a clean run")
    for tid, t in tracks.items():
        body = by_head.get(names[tid])
        if not body:
            fail(f"{tag}: no text line for {names[tid]}")
            continue
        # Every state slice appears in order; several requests may share a
        # head (ids restart on reopen): accept any line that matches.
        want = [words(s["name"]) for s in t["states"]]
        extra = []  # items the line must contain exactly
        for s in t["states"]:
            if s["name"] == "WB_COLLECT":
                a = s["args"]
                if sum(a[k] for k, _ in LEVELS) != a.get("meta_writes", 0):
                    fail(f"{tag}: {names[tid]}: WB_COLLECT level counts {a} do not add up")
                extra.append(collect_text(a, a["exit"]))
            if s["name"] == "NEXT_RUN":
                extra.append("next run (more)" if s["args"]["exit"] == "MORE" else "next run (last)")
        extra += sync_texts(t["states"])
        ok = False
        for b in body:
            items = b.split(" > ")
            got = [re.sub(r" \(.*|@.*| behind.*| on #.*| for #.*| x\d+.*| by #.*", "", p).strip().lower()
                   for p in items]
            got = [g for g in got if not g.startswith("error:") and not g.startswith("done")
                   and g != "not finished"]
            if got == want and all(x in items for x in extra) and \
                    [x for x in items if x.startswith("WB sync")] == sync_texts(t["states"]):
                ok = True
        if not ok:
            fail(f"{tag}: text line of {names[tid]} does not list its states {want} "
                 f"with {extra}: {body}")
        stats["next_run"] += sum(1 for s in t["states"] if s["name"] == "NEXT_RUN")
        stats["wb_collect"] += sum(1 for s in t["states"] if s["name"] == "WB_COLLECT")
        stats["wb_sync"] += len(sync_texts(t["states"]))


def qsm_io(tag, d, args, stdin=None, finished=True, expect_rc=(0,)):
    j, t = os.path.join(d, tag + ".json"), os.path.join(d, tag + ".txt")
    r = subprocess.run([QSM, "io", "--trace", j, "--trace-text", t] + args, input=stdin,
                       capture_output=True, text=True, timeout=600)
    if r.returncode not in expect_rc:
        fail(f"{tag}: qsm io exited {r.returncode}: {r.stderr[-2000:]}")
        return
    check_trace(tag, j, t, finished)


def create(path, size, *opts):
    r = subprocess.run([QSM, "create", "-f", "qcow2"] + list(opts) + [path, size],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"qsm create failed: {r.stderr}")


def gen(seed, n, size, cluster, aio):
    args = ["python3", GEN, str(seed), str(max(4, int(n * SCALE))), size, cluster]
    if aio:
        args.append("--aio")
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
    img = os.path.join(d, "a.qcow2")
    # Interop workloads: sequential and aio, 64k and 4k clusters, small
    # caches (evictions, reloads, freezes); writethrough (qsm io's default)
    # and writeback.
    for i, (cl, aio, cache, l2c) in enumerate([("64k", False, "writethrough", "64k"),
                                               ("64k", True, "writeback", "64k"),
                                               ("4k", True, "writethrough", "8k"),
                                               ("4k", False, "writeback", "8k")]):
        create(img, "256M", "-o", f"cluster_size={cl}")
        script = f"open -t {cache} -o l2-cache-size={l2c} {img}\n" + gen(7000 + i, 150, "256M", cl, aio)
        qsm_io(f"workload{i}-{cl}-{'aio' if aio else 'seq'}", d, [], stdin=script)
        # The same image again: every table is loaded from disk.
        qsm_io(f"reread{i}", d, ["-r", "-c", "read 0 1M", "-c", "read 100M 300k", img])

    # An L2 allocation that waits for a cache slot freezes a second write
    # to the same L1 slot (tools/doc/tour.md).
    create(img, "4G")
    qsm_io("freeze", d, ["-c", f"open -t writeback -o l2-cache-size=64k {img}",
                         "-c", "aio_write -P 1 0 4k", "-c", "aio_write -P 2 512M 4k",
                         "-c", "aio_write -P 3 516M 4k", "-c", "aio_flush"])
    # COW from a backing file, then a writethrough batch sharing one flush.
    base = os.path.join(d, "base.qcow2")
    create(base, "64M")
    subprocess.run([QSM, "io", "-c", "write -P 7 0 1M", base], capture_output=True, check=True)
    create(img, "64M", "-b", base, "-F", "qcow2")
    qsm_io("cow", d, ["-c", "write -P 1 4k 4k", "-c", "write -c -P 9 8M 128k", "-c", "aio_write -P 2 1M 4k",
                      "-c", "aio_write -P 3 2M 4k", "-c", "aio_write -P 4 3M 4k",
                      "-c", "aio_flush", "-c", "read -P 7 0 4k", img])
    # Lazy refcounts: a crash (abort) leaves the image dirty; the next
    # read-write open repairs it.  The trace of the crashed run is complete.
    create(img, "64M", "-o", "lazy_refcounts=on")
    qsm_io("crash", d, ["-c", "write -P 5 0 64k", "-c", "flush", "-c", "abort", img],
           expect_rc=(134,))
    qsm_io("repair", d, ["-c", "read -P 5 0 64k", img])
    # qsm bench writes the same traces.
    create(img, "64M")
    j, t = os.path.join(d, "bench.json"), os.path.join(d, "bench.txt")
    r = subprocess.run([QSM, "bench", "-w", "-c", "300", "-d", "16", "-s", "4k", "-S", "20k",
                        "-t", "writethrough", "--trace", j, "--trace-text", t, img],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        fail(f"bench: exit {r.returncode}: {r.stderr}")
    else:
        check_trace("bench", j, t)

    # Bad input: an unwritable trace file is refused before anything runs.
    r = subprocess.run([QSM, "io", "--trace", os.path.join(d, "no", "such", "dir.json"),
                        "-c", "write 0 4k", img], capture_output=True, text=True)
    if r.returncode == 0 or "qsm io: cannot open trace file" not in r.stderr:
        fail(f"unwritable trace file: exit {r.returncode}, stderr {r.stderr!r}")

if stats["frozen"] == 0:
    fail("no request was ever FROZEN: the freeze workload did not freeze")
if min(stats["durable"], stats["l2_load"], stats["flows"], stats["next_run"], stats["wb_collect"],
       stats["wb_sync"]) == 0:
    fail(f"too little seen to check: {stats}")
print(f"{stats['traces']} traces, {stats['requests']} requests, {stats['flows']} wait arrows, "
      f"{len(seen)} distinct transitions seen (of {len(TABLE)} in the table)")
if failures:
    print(f"0 passed, {len(failures)} failed")
    sys.exit(1)
