"""Which timm architecture families the layer-wise clipping engine runs, and what forces the others to fall back.

Runs `dpmix_dist/testing/zoo.py`'s check, the one tests/test_zoo.py runs, on each family (tiny width and depth,
random weights; trainable = all parameters and = the last stage / block + head; K = 1 and 4 group members) and prints
a Markdown table: `layer-wise` where the engine's clipped sum equalled the naive per-group loop, else the classes its
constructor refused (then `performance.engine=auto` falls back to functorch, which the check also compares with the
naive loop). Nothing is timed: a correctness table, run offline in under a minute on 2 CPU cores.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/zoo_coverage.py
"""

from __future__ import annotations

import warnings

import timm
import torch

from dpmix_dist.privacy.layerwise import LayerwiseClipper, UnsupportedLayer
from dpmix_dist.testing.zoo import FAMILIES, FunctorchMismatch, build, check


def _cell(name: str, trainable: str) -> str:
    dp = build(name, trainable)
    try:
        LayerwiseClipper(dp.tail_module, dp.trainable_params())
        cell = "layer-wise"
    except UnsupportedLayer as exc:
        cell = "fallback: " + ", ".join(f"`{c}`" for c in exc.layers)
    try:
        for k in (1, 4):
            check(name, trainable, k)  # the engine, or else functorch, against the naive loop
    except FunctorchMismatch as exc:
        cell += f"; **functorch wrong** ({str(exc).splitlines()[0]})"
    except AssertionError as exc:  # tests/test_zoo.py fails too
        cell += f"; **layer-wise wrong** ({str(exc).splitlines()[0]})"
    return cell


def main() -> None:
    warnings.filterwarnings("ignore")  # vmap's "batching rule not implemented" performance notes
    torch.set_num_threads(1)
    print(f"timm {timm.__version__}, torch {torch.__version__}\n")
    print("| family | model | trainable: all | trainable: last stage / block + head |")
    print("|---|---|---|---|")
    for name, family in FAMILIES.items():
        model = getattr(family.build, "model", family.build.__name__)
        norm = ", BN → GroupNorm" if family.norm == "groupnorm" else ""
        print(f"| {name} | `{model}`{norm} | {_cell(name, 'all')} | {_cell(name, 'last')} |", flush=True)


if __name__ == "__main__":
    main()
