#!/usr/bin/env python3
"""The decode MoE's gate/up phase from a `DS4_TRACE=1 ds4 bench` log (BLOCK lines).

The routed gate/up product (mv2f IQ2_XXS) marks 8 placed, 9 experts known, 10 first
ring stage in, 11 done; the Q8_0 register products mark 16/17/19 (K 4096: placed,
wait returned, done) or 20/21/23 (other K). For every launch of the routed product
it takes the shared expert's launch nearest in time and prints, as medians over the
launches, the earliest / median / latest block of each moment in µs from the
routed product's first block that knew its experts.

    python3 scripts/gpu/trace_moe.py trace.log            # Flash: 264 and 512 blocks
    python3 scripts/gpu/trace_moe.py trace.log --shared-grid 1024
"""
import argparse
import collections
import statistics


def launches(events, gap_us):
    """Splits one mark's (time, block) events into launches at gaps over `gap_us`."""
    out, cur = [], []
    for t, b in sorted(events):
        if cur and t - cur[-1][0] > gap_us:
            out.append(cur)
            cur = []
        cur.append((t, b))
    if cur:
        out.append(cur)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--routed-grid", type=int, default=264, help="blocks of the routed product")
    ap.add_argument("--shared-grid", type=int, default=512, help="blocks of the shared one")
    ap.add_argument("--shared-mark", type=int, default=16, help="the shared product's first mark")
    ap.add_argument("--gap", type=float, default=8.0, help="µs between two launches")
    a = ap.parse_args()
    ev = collections.defaultdict(list)
    for line in open(a.log):
        p = line.split()
        if len(p) == 5 and p[0] == "BLOCK":
            ev[(int(p[2]), int(p[3]))].append((float(p[1]), int(p[4])))
    routed = [launches(ev[(w, a.routed_grid)], a.gap) for w in (8, 9, 10, 11)]
    sm = a.shared_mark
    shared = [launches(ev[(w, a.shared_grid)], a.gap) for w in (sm, sm + 1, sm + 3)]
    n = min(len(x) for x in routed + shared)
    if n < 3:
        raise SystemExit("too few launches of the two products in the log")
    rows = []
    for i in range(1, n - 1):  # the first and last launches may be cut by the buffer
        t0 = min(t for t, _ in routed[1][i])
        row = []
        for mark in routed:
            row.append(sorted(t - t0 for t, _ in mark[i]))
        for mark in shared:
            near = min(mark, key=lambda c: abs(min(t for t, _ in c) - t0))
            row.append(sorted(t - t0 for t, _ in near))
        rows.append(row)
    names = ["routed placed", "routed experts", "routed 1st stage", "routed done",
             "shared placed", "shared waited", "shared done"]
    print(f"{len(rows)} launches; µs from the routed product's first block knowing its experts")
    for k, name in enumerate(names):
        lo = statistics.median(r[k][0] for r in rows)
        mid = statistics.median(r[k][len(r[k]) // 2] for r in rows)
        hi = statistics.median(r[k][-1] for r in rows)
        print(f"{name:17s} first {lo:7.2f}  median {mid:7.2f}  last {hi:7.2f}")


if __name__ == "__main__":
    main()
