"""Gaussian noise for the summed clipped gradient (contract item 5)."""

from __future__ import annotations

import torch


def gaussian_noise_like(summed: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """N(0, std²) per coordinate, in fp32, from `gen` (seeded identically on every rank)."""
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    return torch.randn(summed.shape, generator=gen, device=summed.device, dtype=torch.float32) * std
