"""A/B of the layer-wise engine: the engine at a git revision against the working tree's, in one process, each DP
step timed right after a non-private step on the same model and batch (the ratio of the two cancels this VM's
drift, which moves a step's time by ±30% over minutes). Also checks that the two engines' clipped sums agree.

    python benchmarks/bench_engine_ab.py --base HEAD~1                       # ViT-Tiny 32 px, K = 1
    python benchmarks/bench_engine_ab.py --base HEAD~1 --case vit_tiny_32px --views 16 --pairs 60 --threads 1

A change of a few per cent needs 40-60 pairs and a second run: in one session the same engine's median ratio moved
between 1.28 and 1.45 from one run to the next (benchmarks/README.md, "sixth session"). Run it with nothing else on
the cores (`flock /work/cpu.lock ...` where the team shares a machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import BATCH, CASES, FULL_BATCH, FULL_CASES, build_case  # noqa: E402

ENGINE_FILES = ("layer_grads", "layerwise")


def load_engine_at(revision: str, into: Path):
    """The engine module (`privacy/layerwise.py` with its `layer_grads.py`) as it was at `revision`, imported under
    private names so that it sits beside the working tree's."""
    for name in ENGINE_FILES:
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{revision}:dpmix_dist/privacy/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        text = text.replace("from dpmix_dist.privacy import layer_grads as lg", "import base_layer_grads as lg")
        (into / f"base_{name}.py").write_text(text)
    sys.path.insert(0, str(into))
    spec = importlib.util.spec_from_file_location("base_layerwise", into / "base_layerwise.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["base_layerwise"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision of the engine to compare against (e.g. HEAD~1)")
    parser.add_argument("--case", default="vit_tiny_32px", choices=sorted({**CASES, **FULL_CASES}))
    parser.add_argument("--views", type=int, default=1, choices=(1, 16), help="K (the batch is bench_step's)")
    parser.add_argument("--pairs", type=int, default=40, help="non-private + DP pairs per engine")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from dpmix_dist.privacy import layerwise

    if args.threads:
        torch.set_num_threads(args.threads)
    batch = (FULL_BATCH if args.case in FULL_CASES else BATCH)[args.views]
    dp, x, y = build_case(args.case, batch, args.views)
    model, params = dp.model, dp.trainable_params()
    flat_x, flat_y = x.flatten(0, 1), y.flatten(0, 1)

    def nonprivate() -> None:
        F.cross_entropy(model(flat_x), flat_y).backward()
        for p in params.values():
            p.grad = None

    with tempfile.TemporaryDirectory() as tmp:
        base = load_engine_at(args.base, Path(tmp))
        engines = {
            f"base ({args.base})": base.LayerwiseClipper(dp.tail_module, params),
            "working tree": layerwise.LayerwiseClipper(dp.tail_module, params),
        }
        sums = [engine.clipped_sum(x, y, 1.0)[0] for engine in engines.values()]
        worst = max(
            float((sums[0][n] - sums[1][n]).abs().max() / sums[0][n].abs().max().clamp_min(1e-30)) for n in sums[0]
        )
        ratios: dict[str, list[float]] = {name: [] for name in engines}
        seconds: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.pairs):
            for name, engine in engines.items():  # the engines alternate, each right after a non-private step
                start = time.perf_counter()
                nonprivate()
                middle = time.perf_counter()
                engine.clipped_sum(x, y, 1.0)
                end = time.perf_counter()
                ratios[name].append((end - middle) / (middle - start))
                seconds[name].append(end - middle)
    print(f"{args.case}, K={args.views}, B={batch}, threads {torch.get_num_threads()}, {args.pairs} pairs each")
    print(f"largest difference of the two clipped sums: {worst:.2g} of a parameter's largest entry")
    for name in engines:
        r = sorted(ratios[name])
        print(
            f"{name:>24}: DP / non-private {statistics.median(r):.3f} (quartiles {r[len(r) // 4]:.3f}-"
            f"{r[(3 * len(r)) // 4]:.3f}), DP step median {1e3 * statistics.median(seconds[name]):.1f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
