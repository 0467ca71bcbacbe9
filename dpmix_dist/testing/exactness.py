"""The layer-wise engine's contract, checked on one model: its clipped sum equals the naive per-group reference for
every trainable parameter, or its constructor refuses the model (nothing may fail in the middle of a step: the
trainer's `performance.engine=auto` only falls back on a refusal at construction)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpmix_dist.privacy.layerwise import LayerwiseClipper, UnsupportedLayer
from dpmix_dist.testing.reference import naive_clipped_sum, naive_group_grads


def exact_or_refused(
    module: Callable[[torch.Tensor], torch.Tensor],
    params: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[UnsupportedLayer | None, dict[str, torch.Tensor], float]:
    """Either the engine's clipped sum equals the naive loop's for every trainable parameter, or the CONSTRUCTOR
    refuses.

    C is the median of the groups' norms: some groups are clipped, some not. Returns (the UnsupportedLayer or None,
    the naive clipped sum, C).
    """
    grads, norms = naive_group_grads(module, params, inputs, targets)
    max_norm = float(norms.median())
    expected = naive_clipped_sum(grads, norms, max_norm)
    assert torch.cat([g.flatten() for g in expected.values()]).abs().sum() > 0  # a vacuous check cannot fail
    try:
        engine = LayerwiseClipper(module, params)
    except UnsupportedLayer as exc:
        return exc, expected, max_norm
    got, _ = engine.clipped_sum(inputs, targets, max_norm)
    assert list(got) == list(expected)
    scale = max(float(g.abs().max()) for g in expected.values())
    for name in expected:
        assert_close(got[name], expected[name], name, scale)
    return None, expected, max_norm


def assert_close(got: torch.Tensor, expected: torch.Tensor, name: str, scale: float) -> None:
    """Equal to float32 round-off: 1e-4 relative, and 1e-5 of the tensor's largest entry absolute (at least 1e-7 of
    the largest entry of all the parameters: a gradient that is zero by symmetry is round-off in both)."""
    atol = 1e-5 * max(float(expected.abs().max()), 1e-2 * scale)
    err = float((got - expected).abs().max()) / max(float(expected.abs().max()), 1e-30)
    assert torch.allclose(got, expected, atol=atol, rtol=1e-4), f"{name}: error {err:.2g} of the largest entry"
