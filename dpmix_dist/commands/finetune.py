"""Private fine-tuning of a timm backbone with DP-SGD.

    accelerate launch launch/finetune.py --config fmnist_effnet_lite0 privacy.target_epsilon=2
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml launch/finetune.py --config NAME

Writes to --output-dir: config.yaml (resolved), model.safetensors and summary.json (the guarantee and the
test accuracy). A checkpoint.pt is kept while the run is unfinished; it holds the secret seed, so treat it
like the private data. Re-run with --resume to continue an interrupted run exactly where it stopped.

--plan checks the settings as the run would (a bad one fails the same way), then prints the guarantee (σ, q,
steps, ε, δ, accountant), the group size, the trainable parameters and a wall-time estimate timed on random
pixels, and exits without training, writing anything or reading a private image.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path

from dpmix_dist.commands import parser_for, timestamped_output_dir
from dpmix_dist.config import dump_config, load_config
from dpmix_dist.errors import RankLost, run_command

SEED_WARNING = (
    "WARNING: --seed fixes the sampling and the noise. The (ε, δ) guarantee now rests on this seed staying "
    "secret: do not publish it, and never use a fixed seed for a model you release."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = parser_for(__doc__, overrides="privacy.target_epsilon=2 optim.lr=0.5 performance.micro_batch_size=64")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where outputs go (default: runs/CONFIG-YYYYmmdd-HHMMSS); must be new or empty unless --resume",
    )
    parser.add_argument("--resume", action="store_true", help="continue the unfinished run in --output-dir")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="fix the secret seed (tests, reproductions). Default: drawn from the OS CSPRNG. A fixed seed makes "
        "the noise predictable to whoever knows it: the guarantee then rests on the seed staying secret",
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="check the settings, print the guarantee and a time estimate, and exit without training",
    )
    args = parser.parse_args(argv)
    timestamped_output_dir(args)
    return args


def main(argv: list[str] | None = None) -> int:
    return run_finetune(parse_args(argv))


def _check_output_dir(output_dir: Path, resume: bool) -> None:
    if resume:
        if not (output_dir / "checkpoint.pt").is_file():
            raise FileNotFoundError(f"--resume: {output_dir} holds no unfinished run (no checkpoint.pt)")
    elif output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(
            f"--output-dir {output_dir} is not empty; choose a new folder, or pass --resume to continue its run"
        )


def run_finetune(args: argparse.Namespace) -> int:
    """Check the settings (in a second, before heavy imports), then train with every rank; the exit status."""
    return run_command(lambda: _finetune(args, time.time()))


def _finetune(args: argparse.Namespace, started: float) -> int:
    config = load_config(args.config, args.overrides)
    if args.plan and args.resume:
        raise ValueError("--plan shows the plan of a new run; drop --resume (a resumed run keeps its plan)")
    _check_output_dir(args.output_dir, args.resume)
    if config.tracking.enabled:
        from dpmix_dist.tracking import check_uri, resolve_uri

        check_uri(resolve_uri(config.tracking))

    # Heavy imports after the cheap checks: a typo in the config fails in a second.
    from dpmix_dist.checkpoint import CHECKPOINT
    from dpmix_dist.distributed import Distributed

    output_dir = args.output_dir
    try:
        with Distributed(cpu=args.cpu, collective_timeout_s=config.run.collective_timeout_s) as dist:
            if args.plan:
                from dpmix_dist.plan import plan_run

                return plan_run(config, dist, Path(args.config).stem, started)
            output_dir = Path(dist.broadcast_object(str(args.output_dir)))  # the main process's default name
            return _train(config, args, dist, output_dir, started)
    except RankLost as lost:  # raised on every rank that is left; each says it (exit status 3)
        if (output_dir / CHECKPOINT).is_file():
            how = f"Continue from its last checkpoint with the same command plus --resume --output-dir {output_dir}"
        else:
            how = f"No checkpoint was written to {output_dir} (as seen from this node) yet: start the run again"
        raise RankLost(f"{lost}. {how}") from None


def _train(config, args: argparse.Namespace, dist, output_dir: Path, started: float) -> int:
    """Every rank, inside the process group: the seed, the trainer, the run, the final messages."""
    from dpmix_dist.checkpoint import Interrupted
    from dpmix_dist.train import Trainer

    secret, error = dist.on_main(_main_process_seed, args, output_dir) or (None, None)
    error = dist.broadcast_object(error)  # a message, never the seed
    if error:
        raise ValueError(error)
    trainer = Trainer(config, dist, output_dir, dist.broadcast_secret(secret))
    if args.resume:
        trainer.resume()
    tracker = dist.on_main(_announce, config, trainer, output_dir, args, dist.world_size)
    try:
        summary = trainer.train()
    except RankLost:  # the MLflow run ends as KILLED, like an interrupted one, and can be resumed the same way
        if tracker is not None:
            tracker.end_interrupted()
        raise
    except Interrupted as stopped:
        if tracker is not None:
            tracker.end_interrupted()
        dist.print(
            f"interrupted: {stopped}; checkpoint written. Continue with the same command plus "
            f"--resume --output-dir {output_dir}",
            stderr=True,
        )
        return 130
    if tracker is not None:
        with _signals_deferred() as received:  # the run is finished: Ctrl-C now would only lose its record
            _finish_tracker(tracker, config, trainer, summary, dist.world_size)
        if received:
            print(
                "stop signal received while logging the finished run to MLflow; the record was completed first",
                file=sys.stderr,
            )
    dist.print(
        json.dumps({k: v for k, v in summary.items() if k not in ("history", "classes", "image_shape")}, indent=2)
    )
    dist.print(
        f"done in {time.time() - started:.0f} s (data, model and features included): {summary['eval_split']} "
        f"accuracy {summary[trainer.accuracy_key]:.4f} at ε={summary['epsilon']:.3f}, δ={summary['delta']:g}; "
        f"outputs in {output_dir}"
    )
    return 0


def _main_process_seed(args: argparse.Namespace, output_dir: Path) -> tuple[int | None, str | None]:
    """The secret seed (from the checkpoint when resuming, --seed, or the OS CSPRNG) and an error message or None."""
    from dpmix_dist.checkpoint import CorruptCheckpoint, read_seed
    from dpmix_dist.privacy.seeding import fresh_secret_seed

    if args.resume:
        try:
            secret = read_seed(output_dir)
        except CorruptCheckpoint as exc:  # every rank reports it (raised here alone, it would leave them waiting)
            return None, str(exc)
        if args.seed is not None and args.seed != secret:
            return None, "--seed differs from the seed of the run being resumed; drop --seed (the checkpoint keeps it)"
        return secret, None
    if args.seed is not None:
        print(SEED_WARNING, file=sys.stderr)
        return args.seed, None
    return fresh_secret_seed(), None


def _announce(config, trainer, output_dir: Path, args: argparse.Namespace, world_size: int):
    """The main process before the first step: config.yaml, the tracker, warnings and the plan. Returns the tracker."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(dump_config(config))
    tracker = _start_tracker(config, trainer, output_dir, args, world_size) if config.tracking.enabled else None
    g = trainer.guarantee
    if config.tracking.log_train_loss:
        print(
            "WARNING: tracking.log_train_loss=true: the mean loss on the sampled PRIVATE examples is recorded "
            "without noise (train_loss_not_private in the history, summary and MLflow); it is NOT covered by "
            "the (ε, δ) guarantee. Do not share those records beyond those trusted with the data.",
            file=sys.stderr,
            flush=True,
        )
    if not g.private:
        print(
            "WARNING: privacy.enabled=false: NON-PRIVATE fine-tuning (no clipping, no noise, ε = ∞), a ceiling "
            "for comparisons. Never publish this model as private.",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"{'DP-SGD' if g.private else 'non-private SGD'}: target ε={config.privacy.target_epsilon:g} at δ={g.delta:g} "
        f"({g.accountant}); σ={g.noise_multiplier:.4f}, q={g.sample_rate:.5f}, {g.steps} steps, C={g.max_grad_norm:g}, "
        f"world size {world_size}, {sum(p.numel() for p in trainer.params.values()):,} trainable parameters",
        flush=True,
    )
    return tracker


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM (record them) for the duration of the block."""
    received: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: received.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_tracker(config, trainer, output_dir: Path, args: argparse.Namespace, world_size: int):
    """The main process's MLflow run: params, the planned guarantee as tags, metrics at every evaluation."""
    from dpmix_dist.tracking import Tracker, guarantee_tags
    from dpmix_dist.train import NOT_PRIVATE_LOSS

    g = trainer.guarantee
    planned = {
        "epsilon": g.epsilon(g.steps),
        "delta": g.delta,
        "noise_multiplier": g.noise_multiplier,
        "max_grad_norm": g.max_grad_norm,
        "sample_rate": g.sample_rate,
        "steps": g.steps,
        "accountant": g.accountant,
    }
    tags = guarantee_tags(planned, config, trainer.metadata["name"], world_size)
    resume_id = None
    run_file = output_dir / "mlflow_run.json"
    if args.resume and run_file.is_file():
        resume_id = json.loads(run_file.read_text())["run_id"]
    name = config.tracking.run_name or (
        f"{Path(args.config).stem}-{config.augment.method}-eps{config.privacy.target_epsilon:g}"
    )
    tracker = Tracker(config.tracking, output_dir, log=lambda m: print(m, file=sys.stderr, flush=True))
    tracker.start(config, tags, name, resume_run_id=resume_id)

    def on_eval(record: dict) -> None:
        metrics = {trainer.accuracy_key: record[trainer.accuracy_key]}
        if math.isfinite(record["epsilon"]):  # a non-private run has no ε to plot
            metrics["epsilon"] = record["epsilon"]
        loss = record.get(NOT_PRIVATE_LOSS)  # only with tracking.log_train_loss=true, under a name that warns
        if loss is not None and loss == loss:  # not NaN
            metrics[NOT_PRIVATE_LOSS] = loss
        tracker.log_metrics(record["step"], metrics)

    trainer.on_eval = on_eval
    return tracker


def _finish_tracker(tracker, config, trainer, summary: dict, world_size: int) -> None:
    import copy

    from dpmix_dist.tracking import guarantee_tags

    example = trainer.inputs.public_example()
    model = copy.deepcopy(trainer.dp_model.model).cpu().eval()  # loadable without the training device
    tags = guarantee_tags(summary, config, summary["dataset"], world_size)
    tracker.finish(summary, model, example, tags, config, trainer.metadata)
    if tracker.model_version:
        print(
            f"registered models:/{config.tracking.register_as}/{tracker.model_version} with "
            f"(ε={summary['epsilon']:.3f}, δ={summary['delta']:g}); MLflow {tracker.uri}, run {tracker.run_id}",
            flush=True,
        )


if __name__ == "__main__":  # `python -m dpmix_dist.commands.finetune`, as sweeps launch each run
    sys.exit(main())
