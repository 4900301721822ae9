#!/usr/bin/env python3
"""tests/teach/test_tour.py: tools/doc/tour.md shows what its commands print.

Runs tools/doc/tour.py --check with the built qsm: every command of the tour
is run again and its output compared with the page (durations and rates
ignored), and every picture the page draws from a real trace (`<!-- picture
NAME.svg -->`: tools/doc/trace_picture.py, laid out by the order of events,
so the same commands give the same bytes) is drawn again and compared byte
for byte with the committed tools/doc/NAME.svg.  Sections 4 and 5 run concurrent requests whose interleaving can
depend on I/O timing on a loaded machine, so a difference is confirmed by up
to two more runs before the test fails.
"""
import os
import subprocess
import sys

QSM = os.environ.get("QSM", "build/qsm")
SRC = os.environ.get("QSM_SRC", os.path.join(os.path.dirname(__file__), "..", ".."))
tour = os.path.join(SRC, "tools", "doc", "tour.py")
for attempt in range(3):
    r = subprocess.run([sys.executable, tour, "--check", "--qsm", QSM], capture_output=True,
                       text=True, timeout=600)
    if r.returncode == 0:
        print(r.stdout.strip())
        sys.exit(0)
    print(f"attempt {attempt + 1}: tour.md differs from what its commands print now")
print(r.stdout[-6000:], r.stderr[-2000:])
sys.exit(1)
