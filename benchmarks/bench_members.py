"""Group members per second through the frozen prefix (what a head-only DP-Mix run pays per member), side by side.

    .venv/bin/python benchmarks/bench_members.py                 # EfficientNet-Lite0 (offline weights), 32 px
    .venv/bin/python benchmarks/bench_members.py --image-size 64 --batch 512
    .venv/bin/python benchmarks/bench_members.py --image-size 64 --batch 64   # the demo's frozen pass

Each row: the frozen prefix of the offline default's model on one batch of random inputs, timed as the median of
repeated calls after a warm-up: NCHW vs channels-last memory layout, fp32 vs bf16 autocast, torch.no_grad vs
torch.inference_mode, and (fp32 no_grad) the prefix with its BatchNorms folded into the convolutions
(`performance.fold_frozen_norm`, dpmix_dist/fold.py; the copy is made per layout). The last line is JSON with the
ratios against fp32 NCHW no_grad. Run it on quiet cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from dpmix_dist.fold import folded_prefix
from dpmix_dist.models import build_dp_model


def _members_per_s(prefix, x: torch.Tensor, bf16: bool, inference: bool, repeats: int) -> float:
    grad_mode = torch.inference_mode() if inference else torch.no_grad()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    with grad_mode, autocast:
        for i in range(repeats + 1):
            start = time.perf_counter()
            prefix(x)
            if i:  # the first call warms up
                times.append(time.perf_counter() - start)
    return len(x) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024, help="members per prefix call (micro-batch 64 × group 16)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    dp = build_dp_model(
        "tf_efficientnet_lite0", "pypi:efficientnet_lite0", 10, trainable="head", image_size=args.image_size
    )
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    rows = {}
    for layout in ("nchw", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        dp.model.to(memory_format=fmt)
        xl = x.contiguous(memory_format=fmt)
        for bf16 in (False, True):
            for inference in (False, True):
                name = f"{layout:13} {'bf16' if bf16 else 'fp32'} {'inference_mode' if inference else 'no_grad':14}"
                rows[name] = _members_per_s(dp.cut.prefix, xl, bf16, inference, args.repeats)
                print(f"{name} {rows[name]:8.0f} members/s", flush=True)
        name = f"{layout:13} fp32 no_grad         folded"
        rows[name] = _members_per_s(folded_prefix(dp, xl[:1]), xl, False, False, args.repeats)
        print(f"{name} {rows[name]:8.0f} members/s", flush=True)
    base = rows[next(iter(rows))]
    names = {k: "/".join(k.split()) for k in rows}
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "image_size": args.image_size,
                "batch": args.batch,
                "members_per_s": {names[k]: round(v) for k, v in rows.items()},
                "ratio_vs_fp32_nchw_no_grad": {names[k]: round(v / base, 2) for k, v in rows.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
