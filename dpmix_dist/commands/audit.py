"""One-run privacy audit: train ONCE with canaries, then bound the run's ε from below (Steinke, Nasr & Jagielski,
"Privacy Auditing with One (1) Training Run", NeurIPS 2023).

    python launch/audit.py --config tiny_test data.root=DIR privacy.target_delta=1e-5
    python launch/audit.py --config fmnist_effnet_lite0 --gradient-canaries 5000 --input-canaries 1000

Each canary is put in the training set with probability 1/2 (secret bits from the OS CSPRNG). After the real
training run every canary is scored; the audit guesses "in" for the highest scores and "out" for the lowest,
counts correct guesses and reports the largest ε that the count rules out at the given confidence, for:

  gradient canaries (white-box): a gradient of norm C on one coordinate of the trainable parameters, sampled
      with probability q each step like an example and clipped like one; scored from the released noisy
      gradients of all steps (covered by DP-SGD's guarantee);
  input canaries (black-box): mislabelled images added to the private data; scored by the final model's loss.

A lower bound above the claimed ε (the run's accountant) means the implementation leaks more than it claims:
the report says FLAGGED and the command exits 1. A bound below it proves nothing about the claim's tightness
(one-run audits are loose, more so for subsampled training and large ε). Each (k+, k-) guess setting is tested
at (1 - confidence)/settings (Bonferroni) and the best bound is reported. The bound accounts for δ: choose
privacy.target_delta well below 1/m (m canaries of a type), or the δ term swamps it.

Outputs in --output-dir: the trainer's (config is not changed; model.safetensors and summary.json describe the
run WITH its canaries: not a model to publish) and audit.json (the figures printed). Runs in one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpmix_dist.commands import parser_for, timestamped_output_dir
from dpmix_dist.errors import run_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = parser_for(__doc__, overrides="privacy.target_delta=1e-5 (as for finetune.py)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where outputs go (default: runs/audit-CONFIG-YYYYmmdd-HHMMSS); must be new or empty",
    )
    parser.add_argument(
        "--gradient-canaries",
        type=int,
        default=1000,
        metavar="M",
        help="white-box gradient canaries (default 1000; at most the trainable parameters; 0: none)",
    )
    parser.add_argument(
        "--input-canaries",
        type=int,
        default=0,
        metavar="M",
        help="black-box input canaries, mislabelled images (default 0: none)",
    )
    parser.add_argument(
        "--canary-norm",
        type=float,
        default=None,
        help="gradient canaries' norm before clipping (default: C, privacy.max_grad_norm)",
    )
    parser.add_argument(
        "--canary-direction",
        choices=("dirac", "gaussian"),
        default="dirac",
        help="gradient canaries: one distinct coordinate each (dirac, default; M at most the trainable "
        "parameters) or random unit vectors (gaussian, any M)",
    )
    parser.add_argument(
        "--score",
        choices=("likelihood", "sum"),
        default="likelihood",
        help="gradient canaries' score from the released steps (default likelihood: the Neyman-Pearson "
        "score of 'sampled with probability q each step'; sum: the released gradient summed over steps)",
    )
    parser.add_argument("--confidence", type=float, default=0.95, help="of the lower bounds (default 0.95)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="fix the run's secret seed (sampling, noise) to reproduce an audit; default: OS CSPRNG",
    )
    parser.add_argument(
        "--audit-seed",
        type=int,
        default=None,
        help="fix the canaries' inclusion bits and design to reproduce an audit; default: OS CSPRNG",
    )
    parser.add_argument(
        "--keep-scores",
        action="store_true",
        help="also write audit_scores.npz (canary scores and bits; canaries are not private data)",
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    args = parser.parse_args(argv)
    timestamped_output_dir(args, "audit-")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _audit(parse_args(argv)))


def _audit(args: argparse.Namespace) -> int:
    from dpmix_dist.audit import AuditSettings, format_report, run_audit
    from dpmix_dist.checkpoint import Interrupted
    from dpmix_dist.config import load_config
    from dpmix_dist.privacy.seeding import fresh_secret_seed

    config = load_config(args.config, args.overrides)
    settings = AuditSettings(
        num_gradient_canaries=args.gradient_canaries,
        num_input_canaries=args.input_canaries,
        canary_norm=args.canary_norm,
        canary_direction=args.canary_direction,
        score=args.score,
        confidence=args.confidence,
    )
    if args.output_dir.exists() and any(args.output_dir.iterdir()):
        raise FileExistsError(f"--output-dir {args.output_dir} is not empty; choose a new folder")
    if args.seed is not None or args.audit_seed is not None:
        print(
            "WARNING: a fixed --seed / --audit-seed makes the run's noise or the canaries' bits predictable; "
            "use it only to reproduce an audit",
            file=sys.stderr,
        )
    seed = fresh_secret_seed() if args.seed is None else args.seed
    audit_seed = fresh_secret_seed() if args.audit_seed is None else args.audit_seed
    try:
        report = run_audit(
            config,
            settings,
            args.output_dir,
            secret_seed=seed,
            audit_seed=audit_seed,
            cpu=args.cpu,
            keep_scores=args.keep_scores,
        )
    except Interrupted:
        print("interrupted: an audit cannot be resumed (its canaries live in memory); run it again", file=sys.stderr)
        return 130
    (args.output_dir / "audit.json").write_text(json.dumps(report.to_dict(), indent=2))
    print(format_report(report))
    print(f"audit.json and the run's outputs in {args.output_dir}")
    return 1 if report.flagged else 0
