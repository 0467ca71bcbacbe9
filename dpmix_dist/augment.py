"""DP-Mix groups: what one private example becomes in one step (contract item 2).

For example i at step t, every random choice (crop offsets, flips, synthetic images, mix pairs, λ) comes from
one generator seeded by (secret seed, "augment", t, i) alone, so the group is the same whatever the number of
processes, the micro-batch size, or which other examples were sampled. The group holds only i's own views
and public synthetic images:

- `self_aug`:   K views (random crop with reflect padding + horizontal flip by default).
- `dpmix_self`: the pool is the K views; M mixes λ·a + (1−λ)·b of two distinct pool members, λ ~ Beta(α, α),
  one λ per mix, the labels mixed by the same λ.
- `dpmix_diff`: the pool is the K views plus S synthetic images (uniform without replacement from the synthetic
  set; their labels are their prompt classes); mixes as above, from any two distinct pool members.

The group's members are the mixes, preceded by the pool when `include_unmixed` (so a group has K + S + M or M
members, counted exactly). The trainer clips the gradient of the group's mean loss once.

Synthetic draws are i.i.d. per (step, example) from the whole synthetic set, read through the same memory-mapped
shard cache as the private data: an endless, shuffled supply whose draws depend on (seed, step, i) only. A
streaming shuffle buffer would tie an example's draws to the order in which ranks consume the stream, i.e. to
the world size and micro-batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dpmix_dist.config import AugmentConfig
from dpmix_dist.data.shards import Split
from dpmix_dist.privacy.seeding import derive_seed


@dataclass(frozen=True)
class Draws:
    """The random choices of one step for a batch of b examples (K views, S synthetic, M mixes each)."""

    crops: np.ndarray  # (b, K, 2) int: top/left offsets into the padded image, in [0, 2·padding]
    padding: int  # reflect padding (pixels) the crops refer to
    flips: np.ndarray  # (b, K) bool: mirror view k horizontally
    synthetic: np.ndarray  # (b, S) int: indices into the synthetic set, distinct within an example
    pairs: np.ndarray  # (b, M, 2) int: two distinct pool members (pool = K views, then S synthetic)
    lams: np.ndarray  # (b, M) float64: λ of each mix, ~ Beta(α, α)


def draw(
    spec: AugmentConfig, secret_seed: int, step: int, indices: torch.Tensor, num_synthetic_images: int, padding: int
) -> Draws:
    """Each example's choices from its own generator (secret seed, "augment", step, global index); `padding` is
    the crop's reflect padding in pixels (`spec.padding_pixels(image_size)`)."""
    k, s, m = spec.num_views, spec.num_synthetic, spec.num_mixes
    pool = k + s
    b = len(indices)
    crops = np.zeros((b, k, 2), dtype=np.int64)
    flips = np.zeros((b, k), dtype=bool)
    synthetic = np.zeros((b, s), dtype=np.int64)
    pairs = np.zeros((b, m, 2), dtype=np.int64)
    lams = np.zeros((b, m), dtype=np.float64)
    for row, i in enumerate(indices.tolist()):
        rng = np.random.default_rng(derive_seed(secret_seed, "augment", step, i))
        crops[row] = rng.integers(0, 2 * padding + 1, size=(k, 2))
        flips[row] = rng.random(k) < 0.5
        if s:
            synthetic[row] = rng.choice(num_synthetic_images, size=s, replace=False)
        if m:
            first = rng.integers(0, pool, size=m)
            second = rng.integers(0, pool - 1, size=m)  # uniform over the other pool - 1 members (incl. the last)
            pairs[row, :, 0], pairs[row, :, 1] = first, second + (second >= first)
            lams[row] = rng.beta(spec.mix_alpha, spec.mix_alpha, size=m)
    return Draws(crops, padding, flips, synthetic, pairs, lams)


def self_augment(
    x: torch.Tensor, crops: np.ndarray, flips: np.ndarray, spec: AugmentConfig, padding: int
) -> torch.Tensor:
    """(b, C, H, W) -> (b, K, C, H, W): view k of example r is x[r] reflect-padded by `padding` pixels, cropped at
    crops[r, k] and mirrored where flips[r, k] (each only if its transform is in `spec.transforms`). One gather for
    all views."""
    b, c, h, w = x.shape
    pad = padding if "crop" in spec.transforms else 0
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad else x
    offsets = torch.from_numpy(crops if pad else np.zeros_like(crops)).to(x.device)
    flip = torch.from_numpy(flips if "flip" in spec.transforms else np.zeros_like(flips)).to(x.device)
    ys = offsets[..., 0:1] + torch.arange(h, device=x.device)  # (b, K, H)
    cols = torch.arange(w, device=x.device)
    xs = offsets[..., 1:2] + torch.where(flip[..., None], w - 1 - cols, cols)  # (b, K, W)
    rows_b = torch.arange(b, device=x.device).view(b, 1, 1, 1, 1)
    chans = torch.arange(c, device=x.device).view(1, 1, c, 1, 1)
    return padded[rows_b, chans, ys[:, :, None, :, None], xs[:, :, None, None, :]]


class GroupBuilder:
    """Builds the (b, G, C, H, W) members and their targets for a batch of private examples.

    Args:
        spec: the `augment` config section.
        num_classes: label space (soft labels are (b, G, num_classes)).
        to_input: uint8 images (n, H, W, C) -> normalized model input (n, 3, S, S).
        image_size: S, the side of the model input (sets the crop padding in pixels).
        synthetic: the decoded synthetic set (public), for `dpmix_diff`.
    """

    def __init__(
        self,
        spec: AugmentConfig,
        num_classes: int,
        to_input: Callable[[np.ndarray], torch.Tensor],
        image_size: int,
        synthetic: Split | None = None,
    ) -> None:
        if spec.method == "dpsgd":
            raise ValueError("dpsgd has no groups to build (one unaugmented view per example)")
        if spec.method == "dpmix_diff" and synthetic is None:
            raise ValueError("dpmix_diff needs the synthetic set")
        self.spec, self.num_classes, self._to_input, self.synthetic = spec, num_classes, to_input, synthetic
        self.soft = spec.method in ("dpmix_self", "dpmix_diff")
        self.padding = spec.padding_pixels(image_size)

    @property
    def group_size(self) -> int:
        s = self.spec
        return (s.num_views + s.num_synthetic if s.include_unmixed else 0) + s.num_mixes

    def draws(self, secret_seed: int, step: int, indices: torch.Tensor) -> Draws:
        num_synthetic_images = len(self.synthetic) if self.synthetic is not None else 0
        return draw(self.spec, secret_seed, step, indices, num_synthetic_images, self.padding)

    def build(self, draws: Draws, images: np.ndarray, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Members (b, G, 3, S, S) and targets: class ids (b, G) for self_aug, soft labels (b, G, classes) else."""
        views = self_augment(
            self._to_input(images), draws.crops, draws.flips, self.spec, draws.padding
        )  # (b, K, 3, S, S)
        b, k = views.shape[:2]
        if not self.soft:
            return views, labels.view(b, 1).expand(b, k).to(views.device)
        pool, pool_labels = views, F.one_hot(labels, self.num_classes).float().view(b, 1, -1).expand(b, k, -1)
        if self.spec.num_synthetic:
            flat = draws.synthetic.reshape(-1)
            syn = self._to_input(np.asarray(self.synthetic.images[flat])).view(b, -1, *views.shape[2:])
            syn_labels = F.one_hot(torch.from_numpy(self.synthetic.labels[flat]), self.num_classes).float()
            pool = torch.cat([pool, syn], dim=1)
            pool_labels = torch.cat([pool_labels, syn_labels.view(b, -1, self.num_classes)], dim=1)
        pool_labels = pool_labels.to(views.device)
        rows = torch.arange(b, device=views.device)[:, None]
        first, second = (torch.from_numpy(draws.pairs[..., j]).to(views.device) for j in (0, 1))
        lam = torch.from_numpy(draws.lams).to(views.device, torch.float32)  # (b, M)
        mixes = lam[..., None, None, None] * pool[rows, first] + (1 - lam[..., None, None, None]) * pool[rows, second]
        mix_labels = lam[..., None] * pool_labels[rows, first] + (1 - lam[..., None]) * pool_labels[rows, second]
        if self.spec.include_unmixed:
            return torch.cat([pool, mixes], dim=1), torch.cat([pool_labels, mix_labels], dim=1)
        return mixes, mix_labels
