#!/usr/bin/env python3
"""Medians over runs of bench/run.sh output, and ratios between labels.

usage: summarize.py OUT... [--ratio A/B ...]
Prints a Markdown table of the median (and the spread of) IOPS, and the median
p50, p99 and CPU per I/O of every (label, job), then, for each --ratio A/B, the ratios A/B of those medians.
"""
import statistics
import sys
from collections import defaultdict

files, ratios = [], []
args = sys.argv[1:]
while args:
    a = args.pop(0)
    if a == "--ratio":
        ratios.append(args.pop(0).split("/"))
    else:
        files.append(a)

data = defaultdict(lambda: defaultdict(list))
order = []
for path in files:
    with open(path) as f:
        for line in f:
            if not line.startswith("label="):
                continue
            kv = dict(p.split("=", 1) for p in line.split())
            key = (kv["label"], kv["job"])
            if key not in data:
                order.append(key)
            for k in ("iops", "p50_us", "p99_us", "cpu_us_per_io"):
                if kv.get(k, "-") != "-":
                    data[key][k].append(float(kv[k]))


def med(key, k):
    v = data[key][k]
    return statistics.median(v) if v else float("nan")


print("| server | job | runs | IOPS (median) | IOPS min–max | p50 µs | p99 µs | CPU µs/IO |")
print("|---|---|---|---|---|---|---|---|")
for key in order:
    print(
        f"| {key[0]} | {key[1]} | {len(data[key]['iops'])} | {med(key, 'iops'):.0f} | "
        f"{min(data[key]['iops']):.0f}–{max(data[key]['iops']):.0f} | "
        f"{med(key, 'p50_us'):.1f} | {med(key, 'p99_us'):.1f} | {med(key, 'cpu_us_per_io'):.2f} |"
    )
for a, b in ratios:
    print()
    print(f"| job | IOPS {a}/{b} | best-run IOPS {a}/{b} | p50 {a}/{b} | p99 {a}/{b} | CPU/IO {a}/{b} |")
    print("|---|---|---|---|---|---|")
    for label, job in order:
        if label != a or (b, job) not in data:
            continue
        r = [med((a, job), k) / med((b, job), k) for k in ("iops", "p50_us", "p99_us", "cpu_us_per_io")]
        best = max(data[(a, job)]["iops"]) / max(data[(b, job)]["iops"])
        print(f"| {job} | {r[0]:.2f} | {best:.2f} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} |")
