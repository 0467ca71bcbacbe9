"""Contract item 7: ε from opacus' accountants vs independent implementations; calibration never overshoots."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from dpmix_dist.privacy import accounting

CASES = [  # (σ, q, steps, δ): a demo-like run (ε≈8), a small-batch run (ε≈1.7), a short high-noise run (ε≈0.14)
    (0.82, 2000 / 60000, 600, 1e-5),
    (1.1, 256 / 50000, 5000, 1e-5),
    (3.0, 0.01, 100, 1e-6),
]


def _log_a_by_quadrature(q: float, sigma: float, alpha: float) -> float:
    """log E_{z~N(0,σ²)}[((1-q) + q·exp((2z-1)/(2σ²)))^α], by numerical integration (Mironov et al. 2019)."""

    def integrand(z: float) -> float:
        log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
        return math.exp(stats.norm.logpdf(z, scale=sigma) + alpha * log_ratio)

    # The mass lies within a few σ of 0 and of α (where the q-term peaks); beyond ±40σ it is below 1e-300.
    lo, hi = -40 * sigma, alpha + 40 * sigma
    value, _ = integrate.quad(integrand, lo, hi, points=[0.0, float(alpha)], limit=1000, epsabs=0, epsrel=1e-11)
    return math.log(value)


@pytest.mark.parametrize("sigma,q", [(0.82, 0.0333), (1.5, 0.01), (0.7, 0.2)])
@pytest.mark.parametrize("alpha", [2, 8, 20])
def test_rdp_per_order_matches_quadrature(sigma, q, alpha):
    from opacus.accountants.analysis.rdp import compute_rdp

    opacus_rdp = float(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0])
    ours = _log_a_by_quadrature(q, sigma, alpha) / (alpha - 1)
    assert opacus_rdp == pytest.approx(ours, rel=1e-6)


@pytest.mark.parametrize("sigma,q,steps,delta", CASES)
def test_rdp_epsilon_matches_dp_accounting(sigma, q, steps, delta):
    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # the orders opacus searches
    independent = dp_accounting.rdp.RdpAccountant(orders).compose(event).get_epsilon(delta)
    ours = accounting.epsilon_spent(sigma, q, steps, delta, "rdp")
    assert ours == pytest.approx(independent, rel=0.01)


@pytest.mark.parametrize("sigma,q,steps,delta", CASES)
def test_prv_epsilon_matches_dp_accounting_pld(sigma, q, steps, delta):
    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    independent = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(delta)
    ours = accounting.epsilon_spent(sigma, q, steps, delta, "prv")
    # opacus' PRV returns an upper bound within 0.01 (absolute) of the true ε: within 1% once ε >= 1,
    # and never below the true value.
    assert ours >= independent * (1 - 1e-3)
    assert ours == pytest.approx(independent, rel=0.01, abs=0.011)


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
@pytest.mark.parametrize("target", [1.0, 8.0])
def test_calibration_reaches_but_never_exceeds_target(accountant, target):
    q, steps, delta = 1000 / 60000, 600, 1e-5
    sigma = accounting.calibrate_noise_multiplier(target, delta, q, steps, accountant)
    spent = accounting.epsilon_spent(sigma, q, steps, delta, accountant)
    assert target - 0.02 <= spent <= target


def test_max_steps_within_is_the_last_step_under_target():
    sigma, q, delta, target = 1.0, 0.02, 1e-5, 2.0
    steps = accounting.max_steps_within(target, sigma, q, delta, "rdp", upper=10_000)
    assert 0 < steps < 10_000
    assert accounting.epsilon_spent(sigma, q, steps, delta, "rdp") <= target
    assert accounting.epsilon_spent(sigma, q, steps + 1, delta, "rdp") > target


def test_planned_steps_is_epochs_over_q():
    assert accounting.planned_steps(10, 2000 / 60000) == 300
    assert accounting.planned_steps(0.001, 0.5) == 1


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    e = lambda sigma, steps: accounting.epsilon_spent(sigma, 0.01, steps, 1e-5, "rdp")  # noqa: E731
    assert e(1.0, 100) < e(1.0, 200)
    assert e(2.0, 100) < e(1.0, 100)


def test_progress_bar_epsilon_is_an_upper_bound_exact_at_the_end_and_cheap():
    """The bar's ε (every step) never under-states what was spent, is exact at the last step, grows with the
    steps, and costs at most 50 accountant evaluations per run (not one per step)."""
    from dpmix_dist.privacy.guarantee import Guarantee

    g = Guarantee(1.1, 0.01, 137, 1e-5, "rdp", 1.0, 100)
    exact = [g.epsilon(s) for s in range(g.steps + 1)]
    bound = [g.epsilon_bound(s) for s in range(g.steps + 1)]
    assert bound[0] == 0.0 and bound[-1] == exact[-1]
    assert all(b >= e for b, e in zip(bound, exact)) and bound == sorted(bound)
    assert len(set(bound[1:])) <= 50 and bound[1] > 0
    assert Guarantee(0.0, 0.01, 10, 1e-5, "none", float("inf"), 100).epsilon_bound(3) == float("inf")


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
@pytest.mark.parametrize("sigma,q,steps,delta", CASES)
def test_epsilon_with_the_one_step_rdp_reused_is_opacus_epsilon_bit_for_bit(sigma, q, steps, delta, accountant):
    """`epsilon_spent` reuses one step's RDP across step counts (a run asks for ε at ~70 of them); opacus' own
    accountant, recomputing everything, must give the very same float."""
    from opacus.accountants import create_accountant

    for t in (1, steps // 3, steps):
        reference = create_accountant(mechanism=accountant)
        reference.history = [(sigma, q, t)]
        assert accounting.epsilon_spent(sigma, q, t, delta, accountant) == float(reference.get_epsilon(delta=delta))
