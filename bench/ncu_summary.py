#!/usr/bin/env python3
"""Per-kernel table from `ncu --csv --print-units base --metrics gpu__time_duration.sum,...`.

Usage: python3 bench/ncu_summary.py NCU.csv [--images N]

ncu writes one row per (kernel launch, metric); other lines (`==PROF==`, the profiled
program's own output) are skipped. Prints the launches and total GPU time, then per kernel
name: launches, microseconds, share of the total and DRAM GB/s, slowest first. If the CSV
cannot be read as expected, prints why and its first lines, so nothing measured is lost.
Used by scripts/gpu/run.sh for ncu.txt.
"""
import argparse
import collections
import csv
import sys


def column(head, *names):
    low = [h.strip().lower() for h in head]
    for n in names:
        if n.lower() in low:
            return low.index(n.lower())
    raise KeyError(f"none of {names} in the header {head}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--images", type=int, default=32)
    a = ap.parse_args()
    lines = [l for l in open(a.csv, errors="replace") if l.startswith('"')]
    try:
        rows = list(csv.reader(lines))
        head, body = rows[0], rows[1:]
        ids = column(head, "ID")
        ki = column(head, "Kernel Name", "Function Name")
        mi = column(head, "Metric Name")
        vi = column(head, "Metric Value")
    except (IndexError, KeyError) as e:
        print(f"cannot read {a.csv} as ncu CSV: {e}")
        print("".join(lines[:40]) or open(a.csv, errors="replace").read()[:4000])
        return 1
    launches = collections.defaultdict(dict)
    for r in body:
        try:
            launches[(r[ids], r[ki])][r[mi]] = float(r[vi].replace(",", "") or 0)
        except (ValueError, IndexError):
            continue
    per = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for (_, name), m in launches.items():
        p = per[name.split("(")[0].strip()]
        p[0] += 1
        p[1] += m.get("gpu__time_duration.sum", 0.0)
        p[2] += m.get("dram__bytes.sum", 0.0)
    total = sum(p[1] for p in per.values())
    if not total:
        print(f"no kernel times in {a.csv} ({len(body)} rows)")
        return 1
    print(f"one forward of {a.images} images: {len(launches)} launches, {total / 1e3:.1f} us of "
          f"GPU time ({total / a.images / 1e3:.2f} us per image)")
    print(f"{'kernel':<56} {'launches':>8} {'us':>10} {'share':>7} {'DRAM GB/s':>10}")
    for name, (n, t, b) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print(f"{name[:56]:<56} {n:>8} {t / 1e3:>10.1f} {100 * t / total:>6.1f}% {b / t if t else 0:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
