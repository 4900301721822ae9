#!/usr/bin/env python3
"""tests/teach/test_design.py: the design blocks of sm/ name every transition.

Each file of sm/ that holds step functions opens with its part of the design
(STYLE.md practice 1): a state diagram fragment, a "Transition -> function"
list and numbered invariants.  The lists are what a reader follows from a
state to the code that leaves it, so they must stay complete and current.
Checked here, from the sources alone (no build needed):

  1. every sm/*.c that defines a step function (qsm_step_*, qsm_classify_*)
     or the dispatcher (qsm_sm_run) opens with a
     comment block holding "Transition -> function" and "Invariants", with
     at least one numbered invariant;
  2. every TRANSITION(machine, from, event, to) of sm/states.def is covered
     by a list line "FROM -> TO ..... function" of some block, where FROM
     and TO may be alternatives (A|B, or A,B for FROM) and NAME_* globs;
  3. every state a list line names exists (a glob matches some state), no
     line is a plain "*" wildcard, and each line's function (the first word
     after the dot leader, or of the next line when the leader ends it) is
     defined in sm/ or metadata/;
  4. invariants are numbered across sm/ (a file applying a rule stated in
     another may restate its number): the numbers run 1..max, no gaps.
The error messages name the missing transition and the files searched.
"""
import glob
import os
import re
import sys

SRC = os.environ.get("QSM_SRC", os.path.join(os.path.dirname(__file__), "..", ".."))
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg)


def parse_def(path):
    text = open(path).read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    states = re.findall(r"^STATE\((\w+),", text, re.M)
    trans = re.findall(r"^TRANSITION(?:_BACK)?\((\w+),\s*(\w+),\s*(\w+),\s*(\w+)\)", text, re.M)
    return states, trans


def design_block(path):
    """The file's opening comment (lines without the leading ' * '), or None."""
    text = open(path).read()
    m = re.match(r"\s*/\*(.*?)\*/", text, re.S)
    if not m:
        return None
    return [re.sub(r"^\s*\* ?", "", ln) for ln in m.group(1).split("\n")]


NAME = r"[A-Z][A-Z0-9_]*\*?|\*"
LINE = re.compile(r"^\s*(?P<from>(?:%s)(?:\s*[,|]\s*(?:%s))*)\s+->\s+"
                  r"(?P<to>(?:%s)(?:\|(?:%s))*)\s+\.{2,}\s*(?P<fn>\w+)?" % (NAME, NAME, NAME, NAME))


def names(field):
    return [n.strip() for n in re.split(r"[,|]", field)]


def matches(pattern, state):
    if pattern.endswith("*"):
        return state.startswith(pattern[:-1])
    return pattern == state


states, trans = parse_def(os.path.join(SRC, "sm", "states.def"))
assert states and trans, "could not parse sm/states.def"

# Functions defined in sm/ and metadata/ (a name at the start of a line,
# after its return type, followed by '(' and not ending in ';').
defined = set()
for path in glob.glob(os.path.join(SRC, "sm", "*.[ch]")) + glob.glob(os.path.join(SRC, "metadata", "*.[ch]")):
    for m in re.finditer(r"^[A-Za-z_][\w \t\*]*?\b(\w+)\(([^;{]*?)\)\s*\n?\{", open(path).read(), re.M):
        defined.add(m.group(1))

lines = []       # (file, from names, to names, function)
invariants = {}  # number -> files stating it
blocks = 0
for path in sorted(glob.glob(os.path.join(SRC, "sm", "*.c"))):
    rel = os.path.relpath(path, SRC)
    has_steps = re.search(r"^(?:enum qsm_event qsm_(?:step|classify)_\w+|static void qsm_sm_run)\(",
                          open(path).read(), re.M)
    block = design_block(path)
    if not block:
        if has_steps:
            fail(f"{rel} defines step functions but opens with no design block")
        continue
    text = "\n".join(block)
    if has_steps:
        blocks += 1
        for heading in ("Transition -> function", "Invariants"):
            if heading not in text:
                fail(f"{rel}: its design block has no '{heading}' section")
    inv = text[text.find("Invariants"):] if "Invariants" in text else ""
    nums = [int(n) for n in re.findall(r"^\s{0,3}(\d+)\.\s", inv, re.M)]
    if has_steps and not nums:
        fail(f"{rel}: no numbered invariant")
    for n in nums:
        invariants.setdefault(n, []).append(rel)
    for i, ln in enumerate(block):
        m = LINE.match(ln)
        if not m:
            continue
        froms, tos = names(m.group("from")), names(m.group("to"))
        fn = m.group("fn")
        if not fn and i + 1 < len(block):
            nxt = re.match(r"\s*(\w+)", block[i + 1])
            fn = nxt.group(1) if nxt else None
        where = f"{rel}: '{ln.strip()}'"
        if "*" in froms + tos:
            fail(f"{where}: a bare '*' would cover transitions nobody listed")
        for n in froms + tos:
            if not any(matches(n, s) for s in states):
                fail(f"{where}: no state {n} in sm/states.def")
        if not fn:
            fail(f"{where}: names no function")
        elif fn not in defined:
            fail(f"{where}: function {fn} is not defined in sm/ or metadata/")
        lines.append((rel, froms, tos, fn))

if blocks < 2:
    fail(f"found {blocks} step files with design blocks; expected the split of sm/")
if not lines:
    fail("no 'FROM -> TO ..... function' line in any design block of sm/")

missing = 0
for m, frm, ev, to in trans:
    if not any(any(matches(f, frm) for f in froms) and any(matches(t, to) for t in tos)
               for _, froms, tos, _ in lines):
        missing += 1
        fail(f"TRANSITION({m}, {frm}, {ev}, {to}) is in no 'Transition -> function' "
             f"list of sm/*.c (add '{frm} -> {to} ..... function' where {frm}'s step lives)")

if invariants:
    top = max(invariants)
    gaps = [n for n in range(1, top + 1) if n not in invariants]
    if gaps:
        fail(f"invariants {gaps} are stated nowhere (numbers run 1..{top} across sm/)")

if failures:
    print(f"{len(failures)} problems ({missing} transitions not listed)")
    sys.exit(1)
print(f"design blocks: {blocks} step files, {len(lines)} list lines cover all "
      f"{len(trans)} transitions; invariants 1..{max(invariants)}")
