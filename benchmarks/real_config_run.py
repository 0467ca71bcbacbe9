"""Run a shipped real-world config end to end on synthetic data in the real CIFAR format, and time it.

The hub configs (ViT-B/16, ResNet-50 on CIFAR) need internet for weights and data; this runs their exact code
path with `model.weights=none` on a CIFAR-format tarball written here, so a GPU machine without internet can
check that the config works on CUDA and how long a DP step takes. Prints a JSON line last.

    python benchmarks/real_config_run.py --config vit_b16_cifar10 --num-train 4000 privacy.epochs=1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpmix_dist.testing.datagen import make_cifar_tarball

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="vit_b16_cifar10")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    num_classes = 100 if "cifar100" in args.config else 10
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tarball = make_cifar_tarball(tmp / "cifar.tar.gz", num_classes, args.num_train, args.num_test)
        shards = tmp / "shards"
        subprocess.run(
            [
                sys.executable,
                "launch/prepare_data.py",
                f"cifar{num_classes}",
                "--source",
                str(tarball),
                "--out",
                str(shards),
            ],
            cwd=REPO,
            check=True,
        )
        out = tmp / "run"
        cmd = [
            sys.executable,
            "launch/finetune.py",
            "--config",
            args.config,
            "--seed",
            "1",
            "--output-dir",
            str(out),
            f"data.root={shards}",
            f"data.cache_dir={tmp / 'cache'}",
            "model.weights=none",
            f"privacy.target_delta={0.1 / args.num_train}",
            "run.progress_bar=false",
            "tracking.enabled=false",
            *args.overrides,
        ]  # timing only: no MLflow (not on the GPU image)
        start = time.time()
        subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        wall = time.time() - start
        summary = json.loads((out / "summary.json").read_text())
    result = {
        "config": args.config,
        "device": summary["device"],
        "method": summary["method"],
        "group_size": summary.get("group_size", 1),
        "steps": summary["steps"],
        "expected_batch_size": summary["expected_batch_size"],
        "trainable_parameters": summary["trainable_parameters"],
        "train_seconds": summary["train_seconds"],
        "seconds_per_step": round(summary["train_seconds"] / summary["steps"], 3),
        "members_per_second": round(
            summary["steps"] * summary["expected_batch_size"] * summary.get("group_size", 1) / summary["train_seconds"],
            1,
        ),
        "wall_seconds": round(wall, 1),
        "zero_stage": summary["zero_stage"],
        "optimizer_state_bytes_per_rank": summary["optimizer_state_bytes_per_rank"],
        "peak_device_memory_bytes": summary.get("peak_device_memory_bytes"),  # GPU runs only
        "epsilon": summary["epsilon"],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
