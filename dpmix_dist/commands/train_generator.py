"""Train the offline class-conditional diffusion generator (DP-Mix_Diff) on PUBLIC images.

    python launch/train_diffusion.py --config fmnist_ddpm
    python launch/train_diffusion.py --config fmnist_ddpm train.steps=200 output_dir=models/quick

The data folder must not be the private part of a public/private split (see launch/prepare_data.py
--public-out): the generator's images count as public data only if it never saw a private example.
Writes OUTPUT_DIR/{unet,scheduler}/ (diffusers save_pretrained; the UNet holds the EMA weights) and
dpmix_generator.json (classes, image shape, the training data's split record). A checkpoint is kept every
two minutes while training; re-run with --resume to continue after an interruption.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dpmix_dist.commands import parser_for
from dpmix_dist.errors import run_command


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(__doc__, "configs/diffusion", "train.steps=200")
    parser.add_argument("--resume", action="store_true", help="continue the unfinished training in output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_command(lambda: _train(args, time.time()))


def _train(args: argparse.Namespace, started: float) -> int:
    from dpmix_dist.synthetic.config import load_diffusion_config
    from dpmix_dist.synthetic.diffusion import train_diffusion

    cfg = load_diffusion_config(args.config, args.overrides)
    try:
        info = train_diffusion(cfg, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("interrupted; re-run with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    short = {k: info[k] for k in ("steps", "batch_size", "final_loss_mean_last_100", "train_seconds")}
    print(json.dumps(short))
    print(f"done in {time.time() - started:.0f} s: generator in {cfg.output_dir}")
    return 0
