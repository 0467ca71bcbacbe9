"""Per-example (per-group) gradients and flat clipping (contract items 2-3).

A *group* is everything derived from one private example: its views (and mixes with its own views
or with public synthetic images). The group's gradient is the gradient of the mean loss over its members;
it is clipped once, to L2 norm <= C over all trainable parameters together.

This engine is exact and generic (torch.func: vmap over groups of grad of the group loss); it materialises
per-example gradients, so its memory grows with micro-batch size x trainable parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch.func import grad_and_value, vmap

Forward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def group_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over a group's members; `targets` are class ids (G,) or soft labels (G, classes)."""
    return F.cross_entropy(logits.float(), targets)


def per_example_grads(
    forward: Forward, params: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradient (and value) of each group's mean loss w.r.t. `params`.

    Args:
        forward: `forward(params, x)` -> logits, for a batch `x` of one group's members (G, ...).
        params: the trainable parameters (detached tensors), by name.
        inputs: (B, G, ...) — B groups of G members each.
        targets: (B, G) class ids or (B, G, num_classes) soft labels.

    Returns:
        (name -> (B, *param.shape) per-group gradients, (B,) per-group losses).
    """

    def loss_of_group(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return group_loss(forward(p, x), y)

    return vmap(grad_and_value(loss_of_group), in_dims=(None, 0, 0))(params, inputs, targets)


def per_example_norms(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B,) L2 norms of each example's gradient over all parameters together (flat clipping), in fp32."""
    squares = [g.detach().float().flatten(1).pow(2).sum(1) for g in grads.values()]
    return torch.stack(squares, dim=0).sum(0).sqrt()


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, C / norm): scaled gradients have norm < C. A non-finite norm is an error, never clipped away."""
    if not torch.isfinite(norms).all():
        raise FloatingPointError(
            "non-finite per-example gradient: lower optim.lr or check the input data; "
            "clipping a NaN/inf gradient would silently poison the update"
        )
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


def clipped_sum(grads: Mapping[str, torch.Tensor], max_grad_norm: float) -> dict[str, torch.Tensor]:
    """Σ_i clip(g_i) per parameter, in fp32: each example contributes at most C in L2 norm."""
    factors = clip_factors(per_example_norms(grads), max_grad_norm)
    return {name: torch.einsum("b,b...->...", factors, g.float()) for name, g in grads.items()}
