#!/usr/bin/env python3
"""Shrink a qemu-io script on which qsm io and qemu-io disagree (ddmin).

    minimize.py [--mode image|output|check|exit] [-o CREATE_OPTS] [--size 1G]
                [--qsm PATH] [--qsm-args "-t none"] [--tries K] SCRIPT > smaller

Modes (what counts as "still failing"):
  image   qemu-img compare of the two images reports a difference (default)
  output  stdout differs after blanking the rate lines' timing
  check   qemu-img check of qsm's image is not clean
  exit    qsm io exits non-zero or prints a failure, qemu-io does not
Both images are made fresh by qemu-img create -f qcow2 -o CREATE_OPTS for
each trial, in a temporary directory under $TMPDIR (default /var/tmp).
The qsm binary comes from --qsm or $QSM.  Progress goes to stderr.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

RATE = re.compile(r"(, [0-9]+ ops; )[0-9:.]+( sec)? \([0-9.]+ (bytes|[KMGTPE]iB)/sec and [0-9.]+ ops/sec\)$",
                  re.M)


def blank(out):
    return RATE.sub(r"\1T sec (R/sec and R ops/sec)", out)


class Trial:
    def __init__(self, a, work):
        self.a = a
        self.work = work
        self.runs = 0

    def run_io(self, argv, img, script):
        p = subprocess.run(argv + [img], input=script, capture_output=True, text=True,
                           timeout=600)
        return p.returncode, p.stdout, p.stderr

    def fails(self, lines):
        """True if any of --tries runs shows the difference (for races)."""
        for _ in range(self.a.tries):
            if self.fails_once(lines):
                return True
        return False

    def fails_once(self, lines):
        self.runs += 1
        script = "".join(l + "\n" for l in lines)
        q = os.path.join(self.work, "q.qcow2")
        s = os.path.join(self.work, "s.qcow2")
        for img in (q, s):
            if os.path.exists(img):
                os.unlink(img)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", self.a.o, img,
                            self.a.size], check=True)
        rq, oq, eq = self.run_io(["qemu-io", "-f", "qcow2"], q, script)
        rs, os_, es = self.run_io([self.a.qsm, "io", "-f", "qcow2"] + shlex.split(self.a.qsm_args),
                                  s, script)
        m = self.a.mode
        if m == "output":
            return blank(oq) != blank(os_) or rq != rs
        if m == "exit":
            bad_s = rs != 0 or re.search(r"fail|error", os_ + es, re.I)
            bad_q = rq != 0 or re.search(r"fail|error", oq + eq, re.I)
            return bool(bad_s) and not bad_q
        if m == "check":
            c = subprocess.run(["qemu-img", "check", "-f", "qcow2", s], capture_output=True, text=True)
            return c.returncode != 0
        c = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", q, s])
        return c.returncode != 0


def ddmin(lines, fails):
    n = 2
    while len(lines) >= 2:
        chunk = (len(lines) + n - 1) // n
        subsets = [lines[i:i + chunk] for i in range(0, len(lines), chunk)]
        reduced = False
        for i in range(len(subsets)):
            complement = [l for j, s in enumerate(subsets) if j != i for l in s]
            if fails(complement):
                lines = complement
                n = max(n - 1, 2)
                reduced = True
                sys.stderr.write("minimize: %d lines\n" % len(lines))
                break
        if not reduced:
            if n >= len(lines):
                break
            n = min(len(lines), n * 2)
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="image", choices=["image", "output", "check", "exit"])
    ap.add_argument("-o", default="cluster_size=65536")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--qsm", default=os.environ.get("QSM", ""))
    ap.add_argument("--qsm-args", default="")
    ap.add_argument("--tries", type=int, default=1,
                    help="runs per candidate; it fails if any run fails (flaky races)")
    ap.add_argument("script")
    a = ap.parse_args()
    if not a.qsm:
        ap.error("--qsm or $QSM needed")
    lines = [l.rstrip("\n") for l in open(a.script) if l.strip()]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as work:
        t = Trial(a, work)
        if not t.fails(lines):
            sys.stderr.write("minimize: the full script does not fail in mode %s\n" % a.mode)
            return 1
        lines = ddmin(lines, t.fails)
        # one more pass removing single lines
        i = 0
        while i < len(lines):
            cand = lines[:i] + lines[i + 1:]
            if cand and t.fails(cand):
                lines = cand
            else:
                i += 1
        sys.stderr.write("minimize: %d lines after %d trials\n" % (len(lines), t.runs))
    sys.stdout.write("".join(l + "\n" for l in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
