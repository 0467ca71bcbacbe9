"""(ε, δ) of the Poisson-subsampled Gaussian mechanism, through opacus' accountants (contract item 7)."""

from __future__ import annotations

import functools

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import Domain
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("prv", "rdp")


@functools.lru_cache(maxsize=64)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """opacus' RDP of one step at its default orders. T steps have T times this: opacus computes it as exactly that
    product (`compute_rdp`), so reusing it is bit-identical, and it is the slow part (~0.2 s per (σ, q))."""
    return rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )


def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """What opacus' RDPAccountant.get_epsilon returns for this history, from the cached one-step RDP."""
    rdp = _rdp_of_one_step(noise_multiplier, sample_rate) * steps
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


class _PRVAccountant(PRVAccountant):
    """opacus' PRV accountant, with the RDP bound it sizes its discretization domain with computed once per (σ, q)
    instead of twice per call: a run asks for ε at ~70 step counts (evaluations, progress bar), ~0.5 s each in opacus
    and ~0.25 s here (the demo's profile). Same domain, same ε, bit for bit (tests/test_accounting.py compares
    the two).

    `_get_domain` is opacus' (1.5) remark-5.6 domain of Gopi et al. for one (σ, q) history entry; opacus is pinned,
    and the test fails if its result ever differs."""

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):
        if len(prvs) != 1:
            return super()._get_domain(prvs, num_self_compositions, eps_error, delta_error)
        (prv,), (steps,) = prvs, num_self_compositions
        sigma, q = prv.noise_multiplier, prv.sample_rate
        bound = max(
            _rdp_epsilon(sigma, q, steps, delta_error / 4),
            _rdp_epsilon(sigma, q, 1, delta_error / (8 * steps)),
        )
        half_width = max(bound, eps_error) + 3
        mesh_size = eps_error / np.sqrt(steps * np.log(12 / delta_error) / 2)
        return Domain.create_aligned(-half_width, half_width, mesh_size)


# Pure functions of their arguments, and slow (RDP calibration of a small data set takes ~10 s): the trainer, the
# CLI's report and every test asking again get the cached value.
@functools.lru_cache(maxsize=1024)
def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """ε after `steps` steps of the sampled Gaussian mechanism with (σ, q), at δ.

    PRV gives an upper bound within 0.01 (absolute) of the exact ε; RDP an upper bound from its orders.
    """
    if steps <= 0:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(noise_multiplier, sample_rate, steps, delta)
    acc = _PRVAccountant() if accountant == "prv" else create_accountant(mechanism=accountant)
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
