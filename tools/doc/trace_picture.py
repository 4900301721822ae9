#!/usr/bin/env python3
"""tools/doc/trace_picture.py: draw one request and the write-back batch that
made it durable, side by side, from a real `qsm io --trace` JSON file.

    trace_picture.py TRACE.json [-o OUT.svg] [--request N]

Two lanes over the order of events: the request (by default the first one
that waited in DURABLE_WAIT; --request N picks request #N) and the batch
named by its DURABLE_WAIT slice ("wait_for"). Each state is a box (yellow:
the request sleeps there, as in the diagrams); under the batch, each sync is
marked with what it makes durable: the level written just before it (what
that state writes, from its description in sm/states.def, with the number
of writes and the first offset from the trace) and, for the batch's first
sync, the data the request wrote before the batch took its snapshot (a
dashed line joins them). An arrow shows the batch waking the request.

The horizontal axis is the order of the slice boundaries of the two lanes,
not their times, so a run of the same commands gives the same picture byte
for byte (tools/doc/tour.py and tests/teach/test_tour.py rely on it).
Only the Python standard library is used.
"""
import json
import os
import re
import sys
from xml.sax.saxutils import escape

HERE = os.path.dirname(os.path.realpath(__file__))
DEF = os.path.join(HERE, "..", "..", "sm", "states.def")

COL = 104         # width of one step of the event order
LANE_H = 34
LEFT = 170        # room for the lane names
TOP = 78


def descriptions(path):
    text = re.sub(r"/\*.*?\*/", "", open(path).read(), flags=re.S)
    return dict(re.findall(r'^STATE\((\w+),\s*"([^"]*)"\)', text, re.M))


def load(path):
    doc = json.load(open(path))
    evs = doc["traceEvents"] if isinstance(doc, dict) else doc
    names = {e["tid"]: e["args"]["name"] for e in evs
             if e["ph"] == "M" and e["name"] == "thread_name"}
    tracks = {}
    for e in evs:
        if e["ph"] == "X":
            t = tracks.setdefault(e["tid"], {"req": None, "states": []})
            if e.get("cat") == "request":
                t["req"] = e
            else:
                t["states"].append(e)
    for t in tracks.values():
        t["states"].sort(key=lambda s: s["ts"])
        # Boundaries in nanoseconds, so that one slice's end is exactly the
        # next one's start (ts and dur are printed in microseconds, 3 decimals).
        for s in t["states"]:
            s["t0"] = round(s["ts"] * 1000)
            s["t1"] = round((s["ts"] + s["dur"]) * 1000)
    return names, tracks


def pick(names, tracks, want_id):
    """(request track, batch track)."""
    for tid in sorted(tracks):
        t = tracks[tid]
        if t["req"] is None:
            continue
        a = t["req"]["args"]
        if want_id is not None and a["id"] != want_id:
            continue
        dw = [s for s in t["states"] if s["name"] == "DURABLE_WAIT" and s["args"].get("wait_for")]
        if not dw:
            if want_id is not None:
                sys.exit(f"trace_picture.py: request #{want_id} never waited in DURABLE_WAIT")
            continue
        batch_id = dw[-1]["args"]["wait_for"]
        # The batch: a writeback track with that id that ended before the
        # request did (ids restart when an image is reopened).
        for btid in sorted(tracks):
            b = tracks[btid]
            if (b["req"] and b["req"]["args"]["kind"] == "writeback" and
                    b["req"]["args"]["id"] == batch_id and b["req"]["ts"] >= t["req"]["ts"] and
                    b["req"]["ts"] <= dw[-1]["ts"] + dw[-1]["dur"]):
                return tid, btid
        sys.exit(f"trace_picture.py: batch #{batch_id} is not in the trace")
    sys.exit("trace_picture.py: no request in the trace waited for a write-back batch")


def main():
    args = sys.argv[1:]
    out, want = None, None
    if "-o" in args:
        i = args.index("-o")
        out = args[i + 1]
        del args[i:i + 2]
    if "--request" in args:
        i = args.index("--request")
        want = int(args[i + 1])
        del args[i:i + 2]
    if len(args) != 1:
        sys.exit(__doc__.split("\n\n")[1])
    desc = descriptions(DEF)
    names, tracks = load(args[0])
    rtid, btid = pick(names, tracks, want)
    req, batch = tracks[rtid], tracks[btid]

    # The order of events: every slice boundary of both lanes, ranked.
    bounds = sorted({x for t in (req, batch) for s in t["states"] for x in (s["t0"], s["t1"])})
    rank = {x: i for i, x in enumerate(bounds)}
    x_of = lambda ts: LEFT + rank[ts] * COL

    svg = []
    width = LEFT + (len(bounds) - 1) * COL + 40
    lane_y = {rtid: TOP, btid: TOP + 100}

    def box(t, s, y):
        x0, x1 = x_of(s["t0"]), x_of(s["t1"])
        d = desc.get(s["name"], "")
        fill = "#fff2b3" if d.startswith("wait:") else \
            "#d8f0d8" if d.startswith("fdatasync") else \
            "#dde8f8" if d.startswith("write ") else "#ffffff"
        label = s["name"]
        size = 11 if len(label) * 6.6 < x1 - x0 - 6 else max(7, int((x1 - x0 - 6) / len(label) / 0.6))
        svg.append(f'<rect x="{x0 + 1}" y="{y}" width="{x1 - x0 - 2}" height="{LANE_H}" rx="5" '
                   f'fill="{fill}" stroke="#555"><title>{escape(s["name"] + ": " + d)}</title></rect>')
        svg.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{y + LANE_H / 2 + 4}" font-size="{size}" '
                   f'text-anchor="middle">{escape(label)}</text>')
        return x0, x1

    # Lanes.
    for tid, t in ((rtid, req), (btid, batch)):
        y = lane_y[tid]
        svg.append(f'<text x="10" y="{y + LANE_H / 2 + 4}" font-size="12" font-weight="bold">'
                   f'{escape(names.get(tid, "#?"))}</text>')
        for s in t["states"]:
            s["_x"] = box(t, s, y)

    # What each sync makes durable.
    data = [s for s in req["states"] if desc.get(s["name"], "").startswith("write ")
            and s["args"].get("host") and s["t1"] <= batch["states"][0]["t0"]]
    rid = req["req"]["args"]["id"]
    r_l2 = {s["args"].get("l2") for s in req["states"]}
    prev, n_sync = None, 0
    base = lane_y[btid] + LANE_H
    # The last sync's note nearest the lane, the first one's lowest: each
    # note starts right of the lines of the syncs before it, so no line
    # crosses a note.
    total = sum(1 for s in batch["states"] if desc.get(s["name"], "").startswith("fdatasync"))
    right = width  # the notes may reach past the last box
    for s in batch["states"]:
        if desc.get(s["name"], "").startswith("fdatasync"):
            n_sync += 1
            lines = []
            pd = desc.get(prev["name"], "") if prev else ""
            if pd.startswith("write "):
                a = prev["args"]
                n = a.get("meta_writes", 0)
                what = f"{pd[6:]} ({n} write{'s' if n != 1 else ''} @{a.get('meta_offset', '?')})"
                if a.get("meta_offset") in r_l2:
                    what += f": #{rid}'s table"
                lines.append(what)
            if n_sync == total:
                lines.append(f"now #{rid} is durable: its data and the metadata that maps it")
            if n_sync == 1:
                if data:
                    lines.append("+ the data written before the batch: " +
                                 ", ".join(f"#{rid} {d['name']} @{d['args']['host']}" for d in data))
                else:
                    lines.append("+ the data written before the batch")
            lines.sort(key=lambda ln: ln.startswith("now "))
            x0, x1 = s["_x"]
            cx = (x0 + x1) / 2
            ty = base + 26 + (total - n_sync) * 44
            svg.append(f'<line x1="{cx:.1f}" y1="{base}" x2="{cx:.1f}" y2="{ty - 12}" '
                       f'stroke="#2a7a2a" stroke-width="1.2"/>')
            svg.append(f'<text x="{cx - 4:.1f}" y="{ty}" font-size="11" fill="#2a7a2a">'
                       f'<tspan font-weight="bold">sync {n_sync} makes durable:</tspan></text>')
            for k, ln in enumerate(lines):
                right = max(right, cx - 4 + len(ln) * 6.3)
                svg.append(f'<text x="{cx - 4:.1f}" y="{ty + 13 * (k + 1)}" font-size="11" '
                           f'fill="#2a7a2a">{escape(ln)}</text>')
            if n_sync == 1:
                for d in data:
                    dx = sum(d["_x"]) / 2
                    svg.append(f'<path d="M{cx:.1f},{lane_y[btid]} C{cx:.1f},{lane_y[btid] - 30} '
                               f'{dx:.1f},{lane_y[rtid] + LANE_H + 30} {dx:.1f},{lane_y[rtid] + LANE_H}" '
                               f'fill="none" stroke="#2a7a2a" stroke-dasharray="4,3"/>')
        prev = s
    height = base + 26 + n_sync * 44 + 20

    # The batch wakes the request.
    last = batch["states"][-1]
    dw = [s for s in req["states"] if s["name"] == "DURABLE_WAIT"][-1]
    ax, ay = last["_x"][1], lane_y[btid]
    bx, by = dw["_x"][1] - 4, lane_y[rtid] + LANE_H
    svg.append(f'<path d="M{ax},{ay} L{bx},{by + 6}" stroke="#3366cc" stroke-width="1.4" '
               f'stroke-dasharray="5,3" marker-end="url(#arrow)"/>')
    svg.append(f'<text x="{min(ax, bx) - 8}" y="{(ay + by) / 2 + 4}" font-size="11" fill="#3366cc" '
               f'text-anchor="end">batch done: wakes #{rid}</text>')
    width = int(max(width, right + 20))

    head = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#3366cc"/></marker></defs>',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="10" y="22" font-size="14" font-weight="bold">{escape(names.get(rtid, ""))} '
        f'and the write-back batch that makes it durable</text>',
        f'<text x="10" y="40" font-size="11" fill="#555">drawn by tools/doc/trace_picture.py from '
        f'a qsm io --trace timeline; left to right: the order of events, not their durations</text>',
        f'<line x1="{LEFT}" y1="{TOP - 14}" x2="{width - 30}" y2="{TOP - 14}" stroke="#999" '
        f'marker-end="url(#arrow)"/>',
    ]
    text = "\n".join(head + svg + ["</svg>"]) + "\n"
    if out:
        open(out, "w").write(text)
        print(f"{out}: {names.get(rtid, '')} and {names.get(btid, '')}, {n_sync} syncs")
    else:
        sys.stdout.write(text)


main()
