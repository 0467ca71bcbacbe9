"""(ε, δ) of the Poisson-subsampled Gaussian mechanism, through opacus' accountants (contract item 7)."""

from __future__ import annotations

import functools

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("prv", "rdp")


# Pure functions of their arguments, and slow (RDP calibration of a small data set takes ~10 s): the trainer, the
# CLI's report and every test asking again get the cached value.
@functools.lru_cache(maxsize=1024)
def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """ε after `steps` steps of the sampled Gaussian mechanism with (σ, q), at δ.

    PRV gives an upper bound within 0.01 (absolute) of the exact ε; RDP an upper bound from its orders.
    """
    if steps <= 0:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Smallest σ (to opacus' tolerance) such that `steps` steps spend at most `target_epsilon`."""
    sigma = float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.01,
        )
    )
    # get_noise_multiplier stops inside [target - tol, target]; verify instead of trusting it.
    spent = epsilon_spent(sigma, sample_rate, steps, delta, accountant)
    if spent > target_epsilon:
        raise RuntimeError(f"calibration overshot: σ={sigma} spends ε={spent} > {target_epsilon}")
    return sigma


def max_steps_within(
    target_epsilon: float, noise_multiplier: float, sample_rate: float, delta: float, accountant: str, upper: int
) -> int:
    """Largest number of steps ≤ `upper` whose ε stays ≤ target (ε grows with steps: binary search)."""
    if epsilon_spent(noise_multiplier, sample_rate, upper, delta, accountant) <= target_epsilon:
        return upper
    low, high = 0, upper  # eps(low) <= target < eps(high)
    while high - low > 1:
        mid = (low + high) // 2
        if epsilon_spent(noise_multiplier, sample_rate, mid, delta, accountant) <= target_epsilon:
            low = mid
        else:
            high = mid
    return low


def planned_steps(epochs: float, sample_rate: float) -> int:
    """round(epochs / q), at least 1: one epoch is 1/q steps in expectation."""
    return max(1, int(round(epochs / sample_rate)))
