"""The peer of `bench-kernels`' matrix-vector table: torch's bf16 product of one row with a dense
weight (cuBLAS), on the same shapes, timed as `bench-kernels` times its wall column (calls in a
row, then a synchronisation; median of samples).

Runs on the lent GPU machine: `python3 scripts/peer-matvec.py [--calls 50] [--samples 21]`
"""

import argparse
import statistics
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--samples", type=int, default=21)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16")
    print("| shape | dense matvec ms (wall) | TB/s |")
    print("|---|---|---|")
    for shape in args.shapes.split(","):
        rows, cols = (int(d) for d in shape.split("x"))
        weight = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, cols, device="cuda", dtype=torch.bfloat16)
        for _ in range(args.calls):
            x @ weight.T
        torch.cuda.synchronize()
        times = []
        for _ in range(args.samples):
            start = time.perf_counter()
            for _ in range(args.calls):
                x @ weight.T
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / args.calls)
        ms = statistics.median(times) * 1e3
        print(f"| {shape} | {ms:.4f} | {rows * cols * 2 / (ms * 1e-3) / 1e12:.2f} |")


if __name__ == "__main__":
    main()
