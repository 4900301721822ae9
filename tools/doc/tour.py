#!/usr/bin/env python3
"""tools/doc/tour.py: run the commands of tools/doc/tour.md and put their
real output in it.

    tools/doc/tour.py [--qsm PATH] [--check] [tour.md]

Every fenced block of tour.md that follows a line `<!-- run -->` holds shell
commands (lines starting with "$ ") and their output.  This script runs the
commands in order, all blocks in one scratch directory (so later blocks see
the images earlier ones made), with `qsm` on PATH, and rewrites each block
as "$ command" followed by what it printed (stdout and stderr together),
then "[exit N]" when N is not 0.

--check rewrites nothing: it fails (exit 1) when the output differs from
what tour.md shows, ignoring what changes from run to run (durations and
throughput figures), i.e. when the tour has gone stale.

Pictures: a line `<!-- picture NAME.svg -->` says that the commands of the
blocks made NAME.svg in the scratch directory (with tools/doc/trace_picture.py,
which is on PATH as trace_picture.py, from a real trace); the script copies
it next to tour.md, and --check fails when the committed copy differs.
The pictures are built from the order of events, not their times, so the
same commands draw the same bytes.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def normalize(text):
    text = re.sub(r"done \d+us|done \d+\.\dms", "done <t>", text)
    text = re.sub(r"[\d.]+ \w+/sec and [\d.]+ ops/sec", "<rate>", text)
    text = re.sub(r"\d\d\.\d\d sec", "<secs>", text)
    return text


def main():
    args = sys.argv[1:]
    check = "--check" in args
    args = [a for a in args if a != "--check"]
    qsm = None
    if "--qsm" in args:
        i = args.index("--qsm")
        qsm = os.path.abspath(args[i + 1])
        del args[i:i + 2]
    path = args[0] if args else os.path.join(HERE, "tour.md")
    if not qsm:
        qsm = os.path.join(HERE, "..", "..", "build", "qsm")
    if not os.access(qsm, os.X_OK):
        sys.exit(f"tour.py: no qsm at {qsm} (build first, or --qsm PATH)")
    text = open(path).read()
    parts = re.split(r"(<!-- run -->\n```console\n.*?```\n)", text, flags=re.S)
    bindir = tempfile.mkdtemp(prefix="qsm-tour-bin.")
    work = tempfile.mkdtemp(prefix="qsm-tour.")
    os.symlink(qsm, os.path.join(bindir, "qsm"))
    os.symlink(os.path.join(HERE, "trace_picture.py"), os.path.join(bindir, "trace_picture.py"))
    env = dict(os.environ, PATH=bindir + ":" + os.environ["PATH"], LC_ALL="C")
    stale = []
    out_parts = []
    try:
        for part in parts:
            if not part.startswith("<!-- run -->"):
                out_parts.append(part)
                continue
            cmds = [l[2:] for l in part.splitlines() if l.startswith("$ ")]
            body = []
            for c in cmds:
                r = subprocess.run(["bash", "-c", c + " 2>&1"], cwd=work, env=env,
                                   capture_output=True, text=True, timeout=300)
                body.append("$ " + c + "\n" + r.stdout)
                if r.returncode:
                    body.append(f"[exit {r.returncode}]\n")
            new = "<!-- run -->\n```console\n" + "".join(body) + "```\n"
            if normalize(new) != normalize(part):
                stale.append((part, new))
            out_parts.append(new)
        pictures = []
        for name in re.findall(r"<!-- picture ([\w.-]+\.svg) -->", text):
            made = os.path.join(work, name)
            kept = os.path.join(os.path.dirname(os.path.abspath(path)), name)
            if not os.path.exists(made):
                stale.append((f"<!-- picture {name} -->\n", f"(the commands made no {name})\n"))
                continue
            now = open(made).read()
            if not os.path.exists(kept) or open(kept).read() != now:
                stale.append((f"{name} as committed\n", f"{name} as drawn now\n"))
            pictures.append((kept, now))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(bindir, ignore_errors=True)
    if check:
        for old, new in stale:
            print("tour.md is stale here:\n--- shown\n" + old + "--- now\n" + new)
        if stale:
            print("run tools/doc/tour.py to regenerate tools/doc/tour.md")
            sys.exit(1)
        print(f"tour.md: {sum(1 for p in parts if p.startswith('<!-- run -->'))} blocks and "
              f"{len(pictures)} pictures up to date")
        return
    open(path, "w").write("".join(out_parts))
    for kept, now in pictures:
        open(kept, "w").write(now)
    print(f"{path}: {len(stale)} blocks or pictures changed")


main()
