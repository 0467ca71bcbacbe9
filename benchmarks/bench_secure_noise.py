"""What `privacy.secure_noise=true` costs per step, side by side with the default streams.

    .venv/bin/python benchmarks/bench_secure_noise.py

Rows: the noise of one step for a flat gradient of d coordinates (d = the offline default's head, ViT-S/16 and
ResNet-50 with everything trainable), and the Poisson mask over N private examples; each timed as the
median of repeated calls (torch generator vs the SHAKE-256 stream with the four-draw Gaussian). The last line is
JSON with the seconds and the ratios. Run it on quiet cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dpmix_dist.privacy.noise import gaussian_noise_slice
from dpmix_dist.privacy.sampling import poisson_mask

SIZES = {"head of the offline default": 12_810, "ViT-S/16": 22_050_664, "ResNet-50": 25_557_032}


def _seconds(fn, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        fn(i)
        if i:  # the first call warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-examples", type=int, default=50_000, help="N for the Poisson mask")
    args = parser.parse_args()
    rows = {}
    for name, numel in SIZES.items():
        plain = _seconds(lambda i, n=numel: gaussian_noise_slice(7, i, 0, n, 1.0), args.repeats)
        secure = _seconds(lambda i, n=numel: gaussian_noise_slice(7, i, 0, n, 1.0, secure=True), args.repeats)
        rows[name] = {
            "coordinates": numel,
            "torch_s": round(plain, 4),
            "secure_s": round(secure, 4),
            "ratio": round(secure / plain, 1),
        }
        times = f"torch {plain:8.4f} s  secure {secure:8.4f} s  ({secure / plain:.1f}×)"
        print(f"noise, {name:28s} {numel:>11,d} coords: {times}")
    n = args.num_examples
    plain = _seconds(lambda i: poisson_mask(7, i, n, 0.01), args.repeats * 10)
    secure = _seconds(lambda i: poisson_mask(7, i, n, 0.01, secure=True), args.repeats * 10)
    rows[f"Poisson mask, N={n}"] = {
        "torch_s": round(plain, 5),
        "secure_s": round(secure, 5),
        "ratio": round(secure / plain, 1),
    }
    times = f"torch {plain * 1e3:.2f} ms  secure {secure * 1e3:.2f} ms  ({secure / plain:.1f}×)"
    print(f"Poisson mask over {n:,d} examples: {times}")
    print(json.dumps({"threads": torch.get_num_threads(), **rows}))


if __name__ == "__main__":
    main()
