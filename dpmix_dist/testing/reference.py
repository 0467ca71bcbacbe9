"""The naive per-group reference that every clipping engine is checked against.

A python loop over the groups: for each group alone, the mean cross-entropy of its members (spelled out here, not
`privacy.clipping.group_loss`, so that the reference shares no code with the engines), `torch.autograd.grad` of it,
then the flat clip min(1, C / (‖g_i‖ + 1e-6)) and the sum. Slow on purpose: nothing is batched, vmapped or hooked,
so an engine that mixes examples, drops a layer or clips per parameter disagrees with it.

Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F


def naive_group_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over a group's K members of the cross-entropy; `targets` are class ids (K,) or soft labels (K, classes)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if not targets.is_floating_point():
        targets = F.one_hot(targets, log_probs.shape[-1])
    return -(targets.to(log_probs.dtype) * log_probs).sum() / len(logits)


def naive_group_grads(
    forward: Callable[[torch.Tensor], torch.Tensor],
    params: dict[str, torch.Tensor],
    inputs: Iterable[torch.Tensor],
    targets: Iterable[torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each group's gradient, by autograd on that group's mean loss alone.

    Args:
        forward: logits of one group's members, `forward(x)` for x of shape (K, ...); it must use `params`.
        params: the parameters to differentiate (requires_grad), by name.
        inputs: one (K, ...) tensor per group: a (B, K, ...) tensor or a list.
        targets: one (K,) tensor of class ids or (K, classes) of soft labels per group.

    Returns:
        (name -> (B, *param.shape) per-group gradients, in `params`' order; (B,) flat L2 norm of each group's
        gradient over all parameters).
    """
    per_group = [
        torch.autograd.grad(naive_group_loss(forward(x), y), list(params.values())) for x, y in zip(inputs, targets)
    ]
    grads = {name: torch.stack([g[i] for g in per_group]) for i, name in enumerate(params)}
    norms = torch.stack([torch.sqrt(sum(t.pow(2).sum() for t in g)) for g in per_group])
    return grads, norms


def naive_clipped_sum(grads: dict[str, torch.Tensor], norms: torch.Tensor, max_norm: float) -> dict[str, torch.Tensor]:
    """Σ_i min(1, C / (‖g_i‖ + 1e-6)) g_i, one group at a time, per parameter: flat clipping (one factor per group
    over all parameters) to C = `max_norm`, of `naive_group_grads`' output."""
    factors = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    return {name: sum(f * g[i] for i, f in enumerate(factors)) for name, g in grads.items()}
