"""`--plan`: what a run would spend and how long it would take, shown before it reads a private example.

The trainer is built exactly as a run builds it, with `load_data=False`: every check a run makes before its first
step except decoding the shards, so a bad setting fails here with the run's own error. The guarantee comes from the
config and the number of private examples N (metadata) through the run's own planner (`train.plan_guarantee`).

A short probe then times the run's own code on random pixels of the private images' stored shape, never on a
private image: the frozen prefix per image (the feature pass), one micro-batch of `Trainer.accumulate` (groups,
per-group clipping) and the step's noise and update, and the evaluation per image. The estimate multiplies these
by the planned counts. Nothing is trained for keeps, written or logged; the probe's update is thrown away with the
trainer, and its noise comes from a fresh CSPRNG seed like a run's.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dpmix_dist import summary as summary_json
from dpmix_dist.data.shards import Split
from dpmix_dist.data.store import ExampleStore
from dpmix_dist.privacy.guarantee import Guarantee
from dpmix_dist.privacy.sampling import owned_indices

PROBE_IMAGES = 128  # at most this many random images per timed prefix / evaluation call


@dataclass(frozen=True)
class Probe:
    """Seconds measured on this machine (per rank) with random pixels."""

    setup_seconds: float  # config to a built trainer: model, σ calibration, engine (what this plan itself took)
    prefix_seconds_per_image: float  # the frozen prefix on one image, input transform included (the feature pass)
    accumulate_seconds_per_example: float  # `Trainer.accumulate`: its group, per-group clipped gradient, summed
    finish_seconds: float  # once per step: sum over ranks, noise, scaling and the optimizer update
    eval_seconds_per_image: float  # what evaluation costs per image (the tail alone when its features are cached)
    threads: int
    device: str


def _timed(fn, device: torch.device) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def _random_images(count: int, shape: list[int], generator: torch.Generator) -> np.ndarray:
    return torch.randint(0, 256, (count, *shape), dtype=torch.uint8, generator=generator).numpy()


def examples_per_rank(trainer) -> float:
    """The expected number of examples a rank holds in one step: q·N / W (q·N is the config's expected batch)."""
    return trainer.config.privacy.expected_batch_size / trainer.dist.world_size


def probe(trainer, setup_seconds: float) -> Probe:
    """Time the run's code on random pixels (see the module docstring); every rank runs it (the step reduces)."""
    inputs, device, config = trainer.inputs, trainer.dist.device, trainer.config
    shape = trainer.metadata["splits"]["train"]["image_shape"]
    generator = torch.Generator().manual_seed(0)  # random pixels, not a secret: they never meet private data
    prefix, tail = trainer.dp_model.cut.prefix, trainer.dp_model.cut.tail
    batch = min(config.performance.eval_batch_size, PROBE_IMAGES)
    with torch.no_grad():
        images = _random_images(batch, shape, generator)
        prefix(inputs.to_input(images))  # warm-up: lazy initialisation, and kernels chosen for this shape
        prefix_seconds, features = _timed(lambda: prefix(inputs.to_input(images)), device)
        tail(features)
        tail_seconds, _ = _timed(lambda: tail(features), device)
    eval_per_image = (tail_seconds if inputs.caches(config.data.eval_split) else prefix_seconds + tail_seconds) / batch

    # Two steps as train_step takes them, on a store of random images, each one micro-batch of the size the run's
    # steps use; the first is a warm-up (as above), the second is timed.
    count = max(1, min(config.performance.micro_batch_size, math.ceil(examples_per_rank(trainer))))
    num_classes = trainer.metadata["num_classes"]
    labels = torch.randint(0, num_classes, (count,), generator=generator).numpy()
    store = ExampleStore(
        Split(_random_images(count, shape, generator), labels),
        torch.arange(count),
        inputs.to_input,
        prefix,
        cache_features=inputs.caches("train"),
        batch_size=config.performance.eval_batch_size,
    )
    mechanism, chunk = trainer.mechanism, torch.arange(count)
    for step in range(2):  # the second one's times count
        mechanism.begin_step(step)
        accumulate_seconds, _ = _timed(lambda: trainer.accumulate(store, chunk), device)
        finish_seconds, _ = _timed(lambda: trainer.update.step(mechanism.finish_step()), device)
    return Probe(
        setup_seconds=setup_seconds,
        prefix_seconds_per_image=prefix_seconds / batch,
        accumulate_seconds_per_example=accumulate_seconds / count,
        finish_seconds=finish_seconds,
        eval_seconds_per_image=eval_per_image,
        threads=torch.get_num_threads(),
        device=device.type,
    )


def num_evaluations(trainer, guarantee: Guarantee) -> int:
    """How many evaluations `Trainer.train` runs (every run.eval_every_epochs, and after the last step)."""
    every = max(1, round(trainer.config.run.eval_every_epochs / guarantee.sample_rate))
    return guarantee.steps // every + (1 if guarantee.steps % every else 0)


def estimate(trainer, measured: Probe, guarantee: Guarantee) -> dict[str, float]:
    """Seconds per phase of a run of `steps` steps, per rank (the ranks run in parallel)."""
    rank, world = trainer.dist.rank, trainer.dist.world_size
    splits, inputs = trainer.metadata["splits"], trainer.inputs
    owned = {name: len(owned_indices(info["num_examples"], rank, world)) for name, info in splits.items()}
    eval_split = trainer.config.data.eval_split
    feature_images = sum(owned[split] for split in ("train", eval_split) if inputs.caches(split))
    if inputs.caches("synthetic"):
        feature_images += len(inputs.groups.synthetic)
    step = measured.accumulate_seconds_per_example * examples_per_rank(trainer) + measured.finish_seconds
    seconds = {
        "setup": measured.setup_seconds,
        "frozen_features": feature_images * measured.prefix_seconds_per_image,
        "steps": guarantee.steps * step,
        "evaluation": num_evaluations(trainer, guarantee) * owned[eval_split] * measured.eval_seconds_per_image,
    }
    seconds["total"] = sum(seconds.values())
    return {key: round(value, 2) for key, value in seconds.items()}


def describe(trainer, measured: Probe, guarantee: Guarantee, config_name: str) -> dict:
    """The plan of one run as a JSON-ready dict (the names of summary.json where they are the same values)."""
    config, g = trainer.config, guarantee
    group_size = trainer.groups.group_size if trainer.groups is not None else 1
    plan = {
        "config": config_name,
        "private": g.private,
        "epsilon": g.epsilon(g.steps),
        "target_epsilon": g.target_epsilon,
        "delta": g.delta,
        "accountant": g.accountant,
        "noise_multiplier": g.noise_multiplier,
        "sample_rate": g.sample_rate,
        "steps": g.steps,
        "epochs": config.privacy.epochs,
        "expected_batch_size": g.expected_batch_size,
        "max_grad_norm": g.max_grad_norm,
        "num_train_examples": trainer.num_train,
        "world_size": trainer.dist.world_size,
        "method": config.augment.method,
        "group_size": group_size,
        "members_per_step": group_size * g.expected_batch_size,
        "micro_batch_size": config.performance.micro_batch_size,
        "micro_batches_per_step_per_rank": math.ceil(examples_per_rank(trainer) / config.performance.micro_batch_size),
        "model": config.model.name,
        "trainable": config.model.trainable,
        "trainable_parameters": sum(p.numel() for p in trainer.params.values()),
        "engine": "functorch" if trainer.engine is None else "layerwise",
        "zero_stage": trainer.zero_stage,
        "evaluations": num_evaluations(trainer, g),
        "estimated_seconds": estimate(trainer, measured, g),
        "probe": asdict(measured),
    }
    # ∞ (ε, target ε, C of the non-private ceiling) as null: strict JSON, as in summary.json
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in plan.items()}


def duration(seconds: float) -> str:
    """1 h 2 min, 6 min 12 s, 25 s, 0.4 s."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def format_plan(plan: dict) -> str:
    """The plan as a few lines for a person (the JSON follows it on stdout)."""
    p, t = plan, plan["estimated_seconds"]
    if p["private"]:
        guarantee = (
            f"ε = {p['epsilon']:.3f} (target {p['target_epsilon']:g}) at δ = {p['delta']:g}, {p['accountant']} "
            f"accountant; σ = {p['noise_multiplier']:.4f}, C = {p['max_grad_norm']:g}"
        )
    else:
        guarantee = "NONE: privacy.enabled=false (no clipping, no noise, ε = ∞), a ceiling never to publish"
    member = "member" if p["group_size"] == 1 else "members"
    probe = p["probe"]
    return "\n".join(
        [
            f"plan of {p['config']} (nothing trained or written; no private example read):",
            f"  guarantee   {guarantee}",
            f"  sampling    q = {p['sample_rate']:.5g} (expected batch {p['expected_batch_size']:,} of "
            f"N = {p['num_train_examples']:,}), {p['steps']:,} steps ({p['epochs']:g} epochs)",
            f"  groups      {p['method']}: {p['group_size']} {member} per example, ~{p['members_per_step']:,} per "
            f"step; micro-batches of {p['micro_batch_size']:,} examples, {p['micro_batches_per_step_per_rank']} per "
            f"step per rank, world size {p['world_size']}",
            f"  trainable   {p['trainable_parameters']:,} parameters of {p['model']} (model.trainable="
            f"{p['trainable']}), {p['engine']} engine, ZeRO stage {p['zero_stage']}",
            f"  time        ≈ {duration(t['total'])} ({probe['device']}, {probe['threads']} thread(s), measured on "
            f"random pixels): set-up {duration(t['setup'])}, frozen features {duration(t['frozen_features'])}, "
            f"{p['steps']:,} steps {duration(t['steps'])}, {p['evaluations']} evaluations "
            f"{duration(t['evaluation'])}; not counted: decoding the shards (once per node), MLflow",
        ]
    )


def plan_run(config, dist, config_name: str, started: float) -> int:
    """`finetune --plan`: build and check as a run would, probe, print the plan (main process) and exit 0."""
    from dpmix_dist.privacy.seeding import fresh_secret_seed
    from dpmix_dist.train import Trainer

    # The probe's noise is drawn like a run's, from a fresh CSPRNG seed that is never shown (nor used again).
    secret = dist.broadcast_secret(dist.on_main(fresh_secret_seed))
    trainer = Trainer(config, dist, output_dir=None, secret_seed=secret, load_data=False)
    measured = probe(trainer, setup_seconds=time.time() - started)
    plan = describe(trainer, measured, trainer.guarantee, config_name)
    dist.print(format_plan(plan))
    dist.print(summary_json.dumps(plan))
    return 0


def plan_sweep(points: list[tuple[str, str, object]], config_name: str, replicates: int, started: float) -> int:
    """`sweep --plan`: `points` are (name, kind, config) for each (method, ε) of the grid, checked already; one
    trainer is built and probed per kind (a method, private or not), each point's guarantee planned from its own
    config. Prints each kind's plan, a table of the points and the total, at world size 1 (this process)."""
    from dpmix_dist.distributed import Distributed
    from dpmix_dist.privacy.seeding import fresh_secret_seed
    from dpmix_dist.train import Trainer, plan_guarantee

    imported = time.time() - started
    rows, runs, total, seen = [], [], 0.0, set()
    with Distributed() as dist:
        kinds: dict[str, tuple] = {}
        for name, kind, config in points:
            if kind not in kinds:
                built = time.time()
                trainer = Trainer(config, dist, output_dir=None, secret_seed=fresh_secret_seed(), load_data=False)
                kinds[kind] = (trainer, probe(trainer, setup_seconds=imported + time.time() - built))
                print(format_plan(describe(trainer, kinds[kind][1], trainer.guarantee, f"{config_name}, {kind}")))
            trainer, measured = kinds[kind]
            point = describe(trainer, measured, plan_guarantee(config, trainer.num_train), config_name)
            seconds = point["estimated_seconds"]
            # The first run of a kind computes the frozen features; the next ones load them from data.cache_dir.
            perf = config.performance
            on_disk = perf.cache_frozen_features and perf.feature_cache_on_disk
            for replicate in range(replicates):
                reused = on_disk and (kind in seen or replicate > 0)
                total += seconds["total"] - (seconds["frozen_features"] if reused else 0.0)
            seen.add(kind)
            runs.append({"name": name, **point})
            epsilon = f"{point['epsilon']:.3f} ({point['target_epsilon']:g})" if point["private"] else "∞ (non-private)"
            rows.append(
                f"| {name} | {epsilon} | {point['delta']:g} | {point['noise_multiplier']:.4f} | "
                f"{point['sample_rate']:.5g} | {point['steps']:,} | {point['group_size']} | "
                f"{duration(seconds['total'])} |"
            )
    print(
        f"\nplan of the sweep over {config_name}: {len(points)} points × {replicates} replicate(s) = "
        f"{len(points) * replicates} runs"
    )
    print("| run | ε (target) | δ | σ | q | steps | group size | time (with the frozen features) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(
        f"total ≈ {duration(total)}, one run after another at world size 1 (a --launcher with W processes divides "
        "each run's steps and frozen features by about W); the frozen features are computed by the first run of "
        "each method and loaded from data.cache_dir/features by the others"
    )
    print(summary_json.dumps({"runs": runs, "replicates": replicates, "estimated_seconds_total": round(total, 2)}))
    return 0
