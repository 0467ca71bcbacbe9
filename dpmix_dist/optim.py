"""The optimizer and learning-rate schedule: post-processing of the private gradient (they see only noised sums)."""

from __future__ import annotations

import math

import torch

from dpmix_dist.config import OptimConfig


def build_optimizer(
    o: OptimConfig, params: list[torch.Tensor], total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """`optim.name` over `params`, with a constant or cosine (to zero at `total_steps`) learning rate."""
    if o.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        optimizer = cls(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.schedule == "cosine":
        schedule = lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps))  # noqa: E731
    else:
        schedule = lambda s: 1.0  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in the optimizer's state (momentum, Adam moments, step counters) held by this process."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
