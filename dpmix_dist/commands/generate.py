"""Render synthetic images per class (DP-Mix_Diff's public pool) into WebDataset shards.

    python launch/generate.py --config fmnist_ddpm                       # offline: the generator of train_diffusion.py
    accelerate launch launch/generate.py --config cifar100_sd            # Stable Diffusion, one slice per GPU
    python launch/generate.py --config fmnist_ddpm --check               # do the images carry their labels?

Each process renders a disjoint set of shards; the union equals a one-process run with the same seed. Killed and
started again, the job skips finished shards (a half-written shard is never taken for a finished one). Settings
that change the images cannot change between a run and its restart. Output: OUTPUT.DIR/train-*.tar (KEY.png,
KEY.cls, KEY.json with class, index and seed) and metadata.json (generator, templates, classes, counts, seeds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dpmix_dist.commands import parser_for
from dpmix_dist.errors import ConfigError, run_command


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(__doc__, "configs/generate", "output.images_per_class=50 generator.batch_size=8")
    parser.add_argument(
        "--check",
        action="store_true",
        help="instead of generating: train a classifier on real public images (check.real_data, "
        "default classes.from_data) and report how well it labels each class of the synthetic set",
    )
    parser.add_argument("--cache-dir", default=".cache/dpmix", help="decoded-shard cache (for --check)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_command(lambda: _generate(args, time.time()))


def _generate(args: argparse.Namespace, started: float) -> int:
    from dpmix_dist.synthetic.config import load_generate_config

    cfg = load_generate_config(args.config, args.overrides)
    if args.check:
        from dpmix_dist.synthetic.check import check_synthetic

        real = cfg.check.real_data or cfg.classes.from_data
        if not real:
            raise ConfigError("--check needs real public images: set check.real_data (or classes.from_data)")
        result = check_synthetic(cfg.output.dir, real, cfg.check, args.cache_dir)
        (Path(cfg.output.dir) / "check.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "per_class_synthetic_accuracy"}))
        return 0
    from dpmix_dist.distributed import Distributed
    from dpmix_dist.synthetic.generate import generate, resolve_classes

    resolve_classes(cfg)  # a bad class list fails before processes and pipelines start
    with Distributed() as dist:
        meta = generate(cfg, dist, progress=not args.no_progress)  # on the main process; None on the others
        done = lambda train: (
            f"done in {time.time() - started:.0f} s: {train['num_examples']} images of "  # noqa: E731
            f"{meta['num_classes']} classes in {len(train['shards'])} shard(s), world size "
            f"{dist.world_size}; {cfg.output.dir}/metadata.json"
        )
        dist.on_main(lambda: print(done(meta["splits"]["train"])))
    return 0
