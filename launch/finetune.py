"""Private fine-tuning of a timm backbone with DP-SGD.

    accelerate launch launch/finetune.py --config fmnist_effnet_lite0 privacy.target_epsilon=2
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml launch/finetune.py --config NAME

Writes to --output-dir: config.yaml (resolved), model.safetensors and summary.json (the guarantee and the
test accuracy). A checkpoint.pt is kept while the run is unfinished; it holds the secret seed, so treat it
like the private data. Re-run with --resume to continue an interrupted run exactly where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dpmix_dist.cli import run_finetune


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", required=True, help="configs/NAME(.yaml) or a path to a YAML file")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="dotted overrides, e.g. privacy.target_epsilon=2 optim.lr=0.5 performance.micro_batch_size=64",
    )  # fmt: skip
    parser.add_argument(
        "--output-dir", type=Path, default=None,
        help="where outputs go (default: runs/CONFIG-YYYYmmdd-HHMMSS); must be new or empty unless --resume",
    )  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue the unfinished run in --output-dir")
    parser.add_argument(
        "--seed", type=int, default=None,
        help="fix the secret seed (tests, reproductions). Default: drawn from the OS CSPRNG. A fixed seed makes "
        "the noise predictable to whoever knows it: the guarantee then rests on the seed staying secret",
    )  # fmt: skip
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


if __name__ == "__main__":
    sys.exit(run_finetune(parse_args()))
