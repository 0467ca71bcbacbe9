"""Where the layer-wise engine's time goes, per layer type, next to non-private training (one process, one thread
count, the modes interleaved). Prints one table per case:

    python benchmarks/profile_layerwise.py --cases vit_tiny_32px:32:1,vit_small_224px:4:1,resnet50_gn_224px:4:1

For each layer type: how many layers, the path the engine took (direct per-group gradients or ghost norm), the
engine's own work on them (in the backward hooks: norms and per-group gradients; after it: the clipped sum) and the
non-private weight gradient of the same layers from the same A and B (one matmul or conv weight-gradient call each;
norm layers: their affine gradient summed over the batch). `extra` = engine work - that weight gradient, the layer
type's part of (DP step - non-private step); `rest` is what the step's forward and backward cost beyond that.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from bench_step import CASES, FULL_CASES  # noqa: E402

from dpmix_dist.models import build_dp_model  # noqa: E402
from dpmix_dist.privacy.layer_grads import conv_input  # noqa: E402
from dpmix_dist.privacy.layerwise import LayerwiseClipper  # noqa: E402


def _label(layer) -> str:
    mod, kind = layer.module, layer.rule.kind
    if kind == "conv":
        kh, kw = mod.kernel_size
        return f"Conv2d {kh}x{kw}" + (" grouped" if mod.groups > 1 else "")
    if kind == "linear":
        return "Linear (n, T, d)" if layer.inputs is not None and layer.inputs.dim() > 2 else "Linear (n, d)"
    return {"layer_norm": "LayerNorm", "group_norm": "GroupNorm", "vit_tokens": "cls/pos tokens"}.get(kind, kind)


def _nonprivate_wgrad(layer, a: torch.Tensor, b: torch.Tensor) -> None:
    """The weight gradient non-private training forms for this layer, over the whole batch."""
    mod, kind = layer.module, layer.rule.kind
    if kind == "linear":
        b.reshape(-1, b.shape[-1]).mT @ a.reshape(-1, a.shape[-1])
    elif kind == "conv":
        a, padding = conv_input(mod, a, layer.rule.same_pad)  # 'same' and reflect paddings replayed, as the engine does
        torch.ops.aten.convolution_backward(
            b,
            a,
            mod.weight,
            None,
            mod.stride,
            padding,
            mod.dilation,
            False,
            [0, 0],
            mod.groups,
            [False, True, False],
        )
    elif kind == "layer_norm" and not layer.channels_first:
        (F.layer_norm(a, mod.normalized_shape, eps=mod.eps) * b).flatten(0, -2).sum(0)
    elif kind == "group_norm":
        (F.group_norm(a, mod.num_groups, eps=mod.eps) * b).sum((0, 2, 3))


def profile(case: str, batch: int, num_views: int, repeats: int) -> None:
    spec = {**CASES, **FULL_CASES}[case]
    torch.manual_seed(0)
    dp = build_dp_model(spec["name"], spec["weights"], 10, norm=spec["norm"], trainable="all", image_size=spec["size"])
    model, params = dp.model, dp.trainable_params()
    x = torch.randn(batch, num_views, 3, spec["size"], spec["size"])
    y = torch.randint(0, 10, (batch, num_views))
    engine = LayerwiseClipper(dp.tail_module, params)
    work, wgrad = collections.defaultdict(float), collections.defaultdict(float)
    paths, labels = collections.defaultdict(set), {}
    receive, clipped = engine._receive, engine._clipped

    def timed_receive(layer, grad):
        labels[id(layer)] = label = _label(layer)
        a = layer.inputs
        start = time.perf_counter()
        receive(layer, grad)
        work[label] += time.perf_counter() - start
        paths[label].add("ghost" if layer.ghost else "direct")
        if a is not None and a.is_floating_point():
            start = time.perf_counter()
            _nonprivate_wgrad(layer, a, grad.view(layer.out_meta[0]))
            wgrad[label] += time.perf_counter() - start

    def timed_clipped(layer, factors):
        start = time.perf_counter()
        out = clipped(layer, factors)
        work[labels[id(layer)]] += time.perf_counter() - start
        return out

    def nonprivate():
        F.cross_entropy(model(x.flatten(0, 1)), y.flatten(0, 1)).backward()
        for p in params.values():
            p.grad = None

    engine._receive, engine._clipped = timed_receive, timed_clipped
    nonprivate(), engine.clipped_sum(x, y, 1.0)  # warm-up
    times = {"nonprivate": [], "dp": []}
    work.clear(), wgrad.clear()
    for _ in range(repeats):
        start = time.perf_counter()
        nonprivate()
        times["nonprivate"].append(time.perf_counter() - start)
        before = sum(wgrad.values())
        start = time.perf_counter()
        engine.clipped_sum(x, y, 1.0)
        times["dp"].append(time.perf_counter() - start - (sum(wgrad.values()) - before))  # without the reference
    np_step, dp_step = statistics.median(times["nonprivate"]), statistics.median(times["dp"])
    print(
        f"\n{case}, B={batch}, K={num_views}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}: "
        f"non-private {np_step:.3f} s, DP {dp_step:.3f} s ({dp_step / np_step:.2f}×), extra {dp_step - np_step:.3f} s"
    )
    print(f"{'layer type':18} {'n':>3} {'path':13} {'engine s':>9} {'np wgrad s':>10} {'extra s':>8} {'of extra':>8}")
    counts = collections.Counter(labels.values())
    extra_total = dp_step - np_step
    accounted = 0.0
    for label in sorted(work, key=lambda k: -(work[k] - wgrad.get(k, 0.0))):
        w, g = work[label] / repeats, wgrad.get(label, 0.0) / repeats
        accounted += w - g
        share = (w - g) / extra_total if extra_total > 0 else float("nan")
        path = "+".join(sorted(paths[label]))
        print(f"{label:18} {counts[label]:>3} {path:13} {w:9.4f} {g:10.4f} {w - g:8.4f} {share:8.0%}")
    rest = extra_total - accounted
    share = rest / extra_total if extra_total > 0 else float("nan")
    print(f"{'rest (fwd+bwd)':18} {'':>3} {'':13} {'':>9} {'':>10} {rest:8.4f} {share:8.0%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="vit_tiny_32px:32:1,vit_small_224px:4:1,resnet50_gn_224px:4:1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for item in args.cases.split(","):
        case, batch, num_views = item.split(":")
        profile(case, int(batch), int(num_views), args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
