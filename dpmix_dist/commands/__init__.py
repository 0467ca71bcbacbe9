"""The command-line programs behind the `launch/*.py` scripts, one module each (prepare, train_generator, generate,
finetune, audit; the sweep lives in dpmix_dist/sweep.py). Each module's docstring is its `--help` text; every
`main` runs its body through `errors.run_command` (a user error: one `error:` line, exit 2)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def parser_for(
    doc: str | None, configs: str = "configs", overrides: str = "privacy.target_epsilon=2"
) -> argparse.ArgumentParser:
    """A command's parser: its module docstring as the help text, `--config` (a shipped name under `configs` or a
    path) and dotted `KEY=VALUE` overrides (`overrides` is the example shown)."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", required=True, help=f"{configs}/NAME(.yaml) or a path to a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"dotted overrides, e.g. {overrides}")
    return parser


def timestamped_output_dir(args: argparse.Namespace, prefix: str = "") -> None:
    """Fill in the default --output-dir: runs/[PREFIX-]CONFIG-YYYYmmdd-HHMMSS."""
    if args.output_dir is None:
        args.output_dir = Path("runs") / f"{prefix}{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
