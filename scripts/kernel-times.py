#!/usr/bin/env python3
"""Sums the GPU time of each kernel in an Nsight Compute CSV log (`device-train.sh profile`).

Usage: kernel-times.py kernels.csv [--top N]
Prints, largest first: total ms, launches, mean µs, the kernel's name and its grid.
"""
import argparse
import collections
import csv
import io

# Nsight Compute's time units, in ms.
UNITS = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    with open(args.log, newline="") as f:
        # ncu prefixes its CSV with its own "==PROF==" lines.
        rows = csv.DictReader(io.StringIO("".join(l for l in f if l.startswith('"'))))
        totals = collections.defaultdict(lambda: [0.0, 0])
        for row in rows:
            if row["Metric Name"] != "gpu__time_duration.sum":
                continue
            scale = UNITS[row["Metric Unit"]]
            key = (row["Kernel Name"][:90], row["Grid Size"])
            totals[key][0] += float(row["Metric Value"].replace(",", "")) * scale
            totals[key][1] += 1
    everything = sum(ms for ms, _ in totals.values())
    print(f"{everything:.2f} ms in {sum(n for _, n in totals.values())} launches")
    for (name, grid), (ms, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{ms:9.3f} ms {n:6d} x {1e3 * ms / n:9.1f} µs  {100 * ms / everything:5.1f}%  {name} {grid}")


if __name__ == "__main__":
    main()
