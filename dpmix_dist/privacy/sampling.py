"""Poisson sampling of the logical batch, distributed over ranks (contract item 1).

Example i joins step t's batch iff u(seed, t)[i] < q, where u is one uniform vector over the *global* set,
drawn identically on every rank. Rank r owns the examples i ≡ r (mod W) and keeps only the sampled ones it
owns, so the union over ranks is exactly Poisson sampling of the whole set with rate q, whatever W is.
"""

from __future__ import annotations

import torch

from dpmix_dist.privacy import secure_random
from dpmix_dist.privacy.seeding import generator


def owned_indices(num_examples_global: int, rank: int, world_size: int) -> torch.Tensor:
    """Global indices of the private examples rank `rank` holds: a disjoint, covering partition."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return torch.arange(rank, num_examples_global, world_size, dtype=torch.long)


def poisson_mask(
    secret_seed: int, step: int, num_examples_global: int, sample_rate: float, secure: bool = False
) -> torch.Tensor:
    """Bool mask over the global set: True where the example joins step `step` (each with prob. q). `secure`:
    from the cryptographic stream of `secure_random` instead of torch's generator."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    if secure:
        uniforms = torch.from_numpy(secure_random.uniforms(secret_seed, "sample", step, count=num_examples_global))
    else:
        uniforms = torch.rand(
            num_examples_global, generator=generator(secret_seed, "sample", step), dtype=torch.float64
        )
    return uniforms < sample_rate


def sample_local(
    secret_seed: int, step: int, owned: torch.Tensor, num_examples_global: int, sample_rate: float, secure: bool = False
) -> torch.Tensor:
    """Sorted global indices among `owned` that join step `step`. May be empty; the rank still takes part."""
    mask = poisson_mask(secret_seed, step, num_examples_global, sample_rate, secure)
    return owned[mask[owned]]
