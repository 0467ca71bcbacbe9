"""Accuracy against ε: run a config at several ε (× methods × replicates) as nested MLflow runs under one parent.

    python launch/sweep.py --config fmnist_effnet_lite0 --epsilons 1,2,4,8
    python launch/sweep.py --config fmnist_effnet_lite0 --epsilons 1,2,8 --methods dpsgd --seeds 0,1 data.image_size=32
    python launch/sweep.py --config NAME --epsilons 1,8 \
        --launcher "accelerate launch --config_file configs/accelerate/gpu_8.yaml"
    python launch/sweep.py --config fmnist_effnet_lite0 --epsilons 1,2,8 --methods dpsgd,self_aug --non-private dpsgd \
        self_aug:augment.num_views=3      # METHOD:KEY=VALUE applies to that method's runs only

`--non-private METHODS` adds one run per replicate of each of those methods with privacy.enabled=false (no
clipping, no noise: the ceiling), shown as the "non-private" column and as dashed lines in the plot.

Each combination is the finetune command (`python -m dpmix_dist.commands.finetune`, so no checkout is needed) with
privacy.target_epsilon, augment.method and its own output folder (OUTPUT/METHOD-epsE-repR). `--seeds` are
replicate labels, not seeds: every run draws its own secret seed.
The parent run receives a plot of final test accuracy against ε (one line per method, error bars = standard
deviation over replicates), the same as CSV and as a Markdown table. Interrupted (Ctrl-C, SIGTERM) and started
again with the same command, the sweep skips finished combinations and resumes the one it was in.

`--plan` checks every run's settings, then prints each point's guarantee (σ, q, steps, ε, δ) and an estimate of
each run's time and the sweep's total (timed on random pixels, never a private image), and exits: nothing is
trained, written or sent to MLflow.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dpmix_dist import summary as summary_json
from dpmix_dist.config import Config, load_config
from dpmix_dist.errors import ConfigError, run_command


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"every ε must be > 0, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/NAME(.yaml) or a path (the base of every run)")
    parser.add_argument("--epsilons", type=_floats, required=True, help="target ε values, e.g. 1,2,4,8")
    parser.add_argument("--methods", type=_names, default=None, help="augment.method values (default: the config's)")
    parser.add_argument(
        "--non-private",
        type=_names,
        default=[],
        metavar="METHODS",
        help="also run these methods without privacy (the ceiling), once per replicate",
    )
    parser.add_argument("--seeds", type=_names, default=["0"], help="replicate labels, e.g. 0,1,2 (not seeds)")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: runs/sweep-CONFIG")
    parser.add_argument(
        "--launcher",
        default="",
        help="command prefix for each run, e.g. 'accelerate launch --config_file ...' (default: this python)",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="check every run, print each point's guarantee and the estimated time, and exit without training",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="[METHOD:]KEY=VALUE",
        help="dotted overrides for every run, or only for METHOD's runs",
    )
    args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = Path("runs") / f"sweep-{Path(args.config).stem}"
    return args


def _combinations(args: argparse.Namespace, default_method: str) -> list[dict]:
    methods = args.methods or [default_method]
    private = [
        {"method": m, "epsilon": e, "replicate": r, "name": f"{m}-eps{e:g}-rep{r}"}
        for m in methods
        for e in args.epsilons
        for r in args.seeds
    ]
    return private + [
        {"method": m, "epsilon": math.inf, "replicate": r, "name": f"{m}-nonprivate-rep{r}"}
        for m in args.non_private
        for r in args.seeds
    ]


def _split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Common KEY=VALUE overrides, and METHOD:KEY=VALUE ones by method."""
    common, scoped = [], {}
    for item in overrides:
        head, _, rest = item.partition(":")
        if rest and "=" not in head:
            scoped.setdefault(head, []).append(rest)
        else:
            common.append(item)
    return common, scoped


def _run_overrides(common: list[str], scoped: dict[str, list[str]], combo: dict) -> list[str]:
    if math.isinf(combo["epsilon"]):
        privacy = ["privacy.enabled=false", "tracking.register_as="]  # the ceiling has no guarantee to register
    else:
        privacy = [f"privacy.target_epsilon={combo['epsilon']}"]
    return [*common, f"augment.method={combo['method']}", *scoped.get(combo["method"], []), *privacy]


def _table(rows: list[dict]) -> tuple[str, str, dict]:
    """CSV of every run, a Markdown table of mean ± std per (method, ε), and the series for the plot."""
    buffer = io.StringIO()
    metric = next(k for k in rows[0] if k.endswith("_accuracy"))  # test_accuracy, or validation_accuracy when tuning
    writer = csv.DictWriter(
        buffer,
        fieldnames=[
            "method",
            "target_epsilon",
            "replicate",
            metric,
            "epsilon_spent",
            "delta",
            "steps",
            "noise_multiplier",
            "num_train_examples",
            "group_size",
            "train_seconds",
        ],
    )
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in writer.fieldnames})
    methods = sorted({r["method"] for r in rows})
    epsilons = sorted({r["target_epsilon"] for r in rows})
    series: dict[str, list[tuple[float, float, float, int]]] = {}
    lines = [
        "| method | " + " | ".join("non-private" if math.isinf(e) else f"ε = {e:g}" for e in epsilons) + " |",
        "|---|" + "---|" * len(epsilons),
    ]
    for method in methods:
        cells = []
        for e in epsilons:
            accs = [100 * r[metric] for r in rows if r["method"] == method and r["target_epsilon"] == e]
            if not accs:
                cells.append("–")
                continue
            mean = statistics.fmean(accs)
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            series.setdefault(method, []).append((e, mean, std, len(accs)))
            cells.append(f"{mean:.2f} ± {std:.2f} (n={len(accs)})" if len(accs) > 1 else f"{mean:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return buffer.getvalue(), "\n".join(lines) + "\n", series


def _plot(series: dict, path: Path, title: str, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for i, (method, points) in enumerate(sorted(series.items())):
        color = f"C{i}"
        finite = [p for p in points if math.isfinite(p[0])]
        if finite:
            eps, mean, std, _ = zip(*finite)
            ax.errorbar(eps, mean, yerr=std, marker="o", capsize=3, label=method, color=color)
        for _, mean, _, _ in (p for p in points if not math.isfinite(p[0])):  # the non-private ceiling
            ax.axhline(mean, linestyle="--", color=color, label=f"{method}, non-private")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ε (target; δ fixed)")
    ax.set_ylabel(f"final {metric.replace('_', ' ')} (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plan(args: argparse.Namespace) -> tuple[Config, list[dict], list[str], dict[str, list[str]]]:
    """(the first run's config, every combination, common overrides, per-method overrides), every run's config
    loaded and checked; raises ConfigError naming the first bad one."""
    common, scoped = _split_overrides(args.overrides)
    default_method = None if args.methods else load_config(args.config, common).augment.method
    combos = _combinations(args, default_method)
    unknown = sorted(set(scoped) - {c["method"] for c in combos})
    if unknown:
        raise ConfigError(
            f"overrides for {', '.join(unknown)}, which this sweep does not run (--methods / --non-private)"
        )
    kinds = {(c["method"], math.isinf(c["epsilon"])): c for c in combos}
    configs = [load_config(args.config, _run_overrides(common, scoped, combo)) for combo in kinds.values()]
    return configs[0], combos, common, scoped


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    return run_command(lambda: _sweep(parse_args(argv), started))


def _plan_points(args: argparse.Namespace, combos: list[dict], common: list[str], scoped: dict) -> list[tuple]:
    """(name, kind, config) for each (method, ε) of the grid, replicates left out (they plan alike)."""
    points = {}
    for combo in combos:
        name = combo["name"].rsplit("-rep", 1)[0]
        kind = combo["method"] + (", non-private" if math.isinf(combo["epsilon"]) else "")
        if name not in points:
            points[name] = (name, kind, load_config(args.config, _run_overrides(common, scoped, combo)))
    return list(points.values())


def _sweep(args: argparse.Namespace, started: float) -> int:
    config, combos, common, scoped = plan(args)  # every run's settings, checked before the first run starts
    from dpmix_dist.tracking import check_uri, experiment_id, resolve_uri

    uri = resolve_uri(config.tracking)
    check_uri(uri)
    if args.plan:
        from dpmix_dist.plan import plan_sweep

        points = _plan_points(args, combos, common, scoped)
        return plan_sweep(points, Path(args.config).stem, len(args.seeds), started)
    out = args.output_dir
    state_path = out / "sweep.json"
    request = {
        "config": args.config,
        "overrides": args.overrides,
        "combinations": [c["name"] for c in combos],
        "uri": uri,
        "experiment": config.tracking.experiment,
    }
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state["request"] != request:
            raise ConfigError(f"{out} holds a sweep with other settings; use a new --output-dir, or the same command")
        parent_id = state["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
    else:
        out.mkdir(parents=True, exist_ok=True)
        try:
            exp_id = experiment_id(client, uri, config.tracking.experiment)
            parent = client.create_run(
                exp_id,
                run_name=f"sweep-{Path(args.config).stem}",
                tags={
                    "sweep.config": Path(args.config).stem,
                    "sweep.epsilons": ",".join(f"{e:g}" for e in args.epsilons),
                    "sweep.methods": ",".join(sorted({c["method"] for c in combos})),
                    "sweep.replicates": ",".join(args.seeds),
                    "sweep.overrides": " ".join(args.overrides),
                },
            )
        except Exception as exc:  # noqa: BLE001 - no parent run, no sweep: say why
            raise ConfigError(
                f"tracking.uri {uri}: cannot create the sweep's parent run ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); is the server up?"
            ) from None
        parent_id = parent.info.run_id
        state_path.write_text(json.dumps({"request": request, "parent_run_id": parent_id}, indent=2))

    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    started = time.time()
    finished = [c for c in combos if (out / c["name"] / "summary.json").is_file()]
    if finished:
        print(f"resuming the sweep: skipping {len(finished)} finished combination(s)", flush=True)
    for i, combo in enumerate(combos, 1):
        run_dir = out / combo["name"]
        if (run_dir / "summary.json").is_file():
            continue
        resume = (run_dir / "checkpoint.pt").is_file()
        if run_dir.exists() and not resume:  # a run that died before its first checkpoint: start it again
            shutil.rmtree(run_dir)
        cmd = [
            *launcher,
            "-m",  # the installed package's command (python -m, accelerate launch -m, torchrun -m): no checkout needed
            "dpmix_dist.commands.finetune",
            "--config",
            args.config,
            "--output-dir",
            str(run_dir),
            *_run_overrides(common, scoped, combo),
            f"tracking.uri={uri}",
            f"tracking.parent_run_id={parent_id}",
            f"tracking.run_name={combo['name']}",
            *(["--resume"] if resume else []),
        ]
        print(f"[{i}/{len(combos)}] {combo['name']}{' (resuming)' if resume else ''}", flush=True)
        proc = subprocess.Popen(cmd)
        interrupted = False
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reached the run too: let it checkpoint (or finish its record)
                interrupted = True
        # 130: the run checkpointed and stopped; -SIGINT: Ctrl-C arrived as it exited, after its outputs and record
        if code in (130, -signal.SIGINT) or (interrupted and code == 0):
            print(f"sweep interrupted in {combo['name']}; run the same command again to continue", file=sys.stderr)
            client.set_terminated(parent_id, status="KILLED")
            return 130
        if code != 0:
            print(
                f"error: {combo['name']} failed (exit {code}); fix it and run the same command again", file=sys.stderr
            )
            client.set_terminated(parent_id, status="FAILED")
            return 2

    rows = []
    for combo in combos:
        s = summary_json.read(out / combo["name"] / "summary.json")
        rows.append(
            {
                "method": combo["method"],
                "target_epsilon": combo["epsilon"],
                "replicate": combo["replicate"],
                f"{s['eval_split']}_accuracy": s[f"{s['eval_split']}_accuracy"],
                "epsilon_spent": s["epsilon"],
                "delta": s["delta"],
                "steps": s["steps"],
                "noise_multiplier": s["noise_multiplier"],
                "num_train_examples": s["num_train_examples"],
                "group_size": s["group_size"],
                "train_seconds": s["train_seconds"],
            }
        )
    table_csv, table_md, series = _table(rows)
    (out / "results.csv").write_text(table_csv)
    (out / "results.md").write_text(table_md)
    shown = [
        o for o in args.overrides if not o.startswith(("tracking.", "run.", "performance.", "data.root", "data.cache"))
    ]
    metric = next(k for k in rows[0] if k.endswith("_accuracy"))
    _plot(
        series,
        out / "accuracy_vs_epsilon.png",
        f"{Path(args.config).stem} ({len(args.seeds)} replicate(s)) {' '.join(shown)}"[:80],
        metric,
    )
    for name in ("results.csv", "results.md", "accuracy_vs_epsilon.png"):
        client.log_artifact(parent_id, str(out / name))
    client.set_terminated(parent_id, status="FINISHED")
    print(table_md)
    print(
        f"sweep done in {time.time() - started:.0f} s: {len(combos)} runs under parent run {parent_id} ({uri}); "
        f"{out}/results.csv, results.md, accuracy_vs_epsilon.png"
    )
    return 0


def _terminate(signum, frame):  # SIGTERM (a preempted job) behaves like Ctrl-C
    raise KeyboardInterrupt


def run_from_command_line() -> int:
    """`launch/sweep.py`: Ctrl-C and SIGTERM stop the sweep after its current run's checkpoint."""
    # Explicitly, for both: a process started in the background of a shell inherits SIGINT *ignored*, and Python
    # then never turns Ctrl-C into KeyboardInterrupt; the sweep would run on after its current run stopped.
    signal.signal(signal.SIGINT, _terminate)
    signal.signal(signal.SIGTERM, _terminate)
    return main()
