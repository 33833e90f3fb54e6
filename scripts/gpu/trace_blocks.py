#!/usr/bin/env python3
"""Per-block phases of one kernel from a `DS4_TRACE=1 ds4 bench` log (BLOCK lines).

Kernels mark moments with TRACE_BLOCK(what) (pdl.cuh): 0 placed, 1 PDL wait returned,
3 end; others are kernel-specific (hc_pre_finish_v2: 4 pre computed, 5 norm scale
known). Launches are told apart by their grid size, so pick a grid no other traced
kernel has (hc_pre_finish_v2: 2; hc_post_mix_v2: 64).

    python3 scripts/gpu/trace_blocks.py trace.log --grid 2 --block 0
"""
import argparse
import collections
import statistics


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--grid", type=int, required=True, help="the kernel's block count (grid_x · grid_y)")
    ap.add_argument("--block", type=int, default=0, help="block index to follow")
    a = ap.parse_args()
    events = []
    for line in open(a.log):
        p = line.split()
        if len(p) == 5 and p[0] == "BLOCK" and int(p[3]) == a.grid and int(p[4]) == a.block:
            events.append((float(p[1]), int(p[2])))
    launches, cur = [], None
    for t, what in sorted(events):
        if what == 0:
            cur = {}
            launches.append(cur)
        if cur is not None:
            cur[what] = t
    if not launches:
        raise SystemExit(f"no BLOCK lines for grid {a.grid} block {a.block}")
    order = sorted({w for c in launches for w in c}, key=lambda w: statistics.median(
        c[w] - c[0] for c in launches if w in c))
    print(f"{len(launches)} launches of grid {a.grid}, block {a.block}: µs between marks")
    for x, y in zip(order, order[1:]):
        d = sorted(c[y] - c[x] for c in launches if x in c and y in c)
        print(f"  {x} -> {y}: median {statistics.median(d):6.2f}  p10 {d[len(d) // 10]:6.2f}"
              f"  p90 {d[9 * len(d) // 10]:6.2f}  ({len(d)})")


if __name__ == "__main__":
    main()
