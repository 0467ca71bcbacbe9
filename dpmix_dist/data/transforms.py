"""uint8 images (N, H, W, C) -> normalized float model input (N, 3, S, S), on the fly, per micro-batch."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_model_input(
    images: np.ndarray | torch.Tensor,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Scale to [0, 1], grey -> RGB, resize (bilinear, antialiased) to `image_size`, normalize."""
    x = torch.from_numpy(np.require(images, requirements=["W"])).to(device)  # a read-only memmap view is copied
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t
