"""The guarantee of a run, planned before training from plain numbers (contract item 7).

`plan` fixes σ and the number of steps so that the planned steps spend at most the target ε at δ; the trainer
never takes a step beyond `Guarantee.steps`. The sampler's q and the accountant's q are the same value,
`expected_batch_size / num_examples`. Imports the accountant only: no config, no data, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpmix_dist.privacy import accounting


@dataclass(frozen=True)
class Guarantee:
    """The published part of a run: what (ε, δ) it spends and how. `accountant` "none" = the non-private ceiling."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    max_grad_norm: float
    expected_batch_size: int
    target_epsilon: float = math.inf

    @property
    def private(self) -> bool:
        return self.accountant != "none"

    def epsilon(self, steps: int | None = None) -> float:
        """ε spent after `steps` steps (default: all planned)."""
        steps = self.steps if steps is None else steps
        if not self.private:
            return math.inf
        return accounting.epsilon_spent(self.noise_multiplier, self.sample_rate, steps, self.delta, self.accountant)

    def epsilon_bound(self, step: int, points: int = 50) -> float:
        """An upper bound on ε after `step` steps, cheap enough for every step of a progress bar: the exact ε at
        the first of at most `points` grid steps (spread over the run) at or after `step` (ε grows with steps).
        At most `points` accountant calls per run (PRV takes 0.1-0.6 s each); exact at the grid and the end."""
        if not self.private:
            return math.inf
        if step <= 0:
            return 0.0
        n = min(points, self.steps)
        grid = -(-step * n // self.steps)  # the smallest i with i·steps/n >= step
        return self.epsilon(min(self.steps, -(-grid * self.steps // n)))


def plan(
    num_examples: int,
    *,
    expected_batch_size: int,
    epochs: float,
    target_epsilon: float,
    delta: float,
    max_grad_norm: float,
    accountant: str,
    noise_multiplier: float | None = None,
    private: bool = True,
) -> Guarantee:
    """σ (calibrated unless given) and the number of steps, fixed before training so that ε never exceeds the
    target. `private=False` plans the non-private ceiling: same batches and steps, C = ∞ (no clipping), σ = 0."""
    sample_rate = expected_batch_size / num_examples  # the sampler and the accountant share this value
    steps = accounting.planned_steps(epochs, sample_rate)
    if not private:
        return Guarantee(0.0, sample_rate, steps, delta, "none", math.inf, expected_batch_size)
    if noise_multiplier is None:
        sigma = accounting.calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)
    else:
        sigma = noise_multiplier
        steps = accounting.max_steps_within(target_epsilon, sigma, sample_rate, delta, accountant, steps)
        if steps == 0:
            raise ValueError(
                f"privacy.noise_multiplier={sigma} spends more than ε={target_epsilon} in one step; "
                "raise it or leave it null to calibrate"
            )
    return Guarantee(sigma, sample_rate, steps, delta, accountant, max_grad_norm, expected_batch_size, target_epsilon)
