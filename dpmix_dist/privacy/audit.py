"""The statistics of a one-run privacy audit (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training
Run", NeurIPS 2023): from canary scores and the secret inclusion bits to a lower bound on ε. numpy/scipy only.

The game. m canaries; canary j is in the training set iff S_j = +1, S ∈ {-1, +1}^m uniform (independent fair
bits). One training run, then every canary gets a score; the auditor guesses "in" for the k+ highest scores and
"out" for the k- lowest, abstains on the rest, and counts its correct guesses W among r = k+ + k- guesses.

Pure DP (δ = 0). If the run is ε-DP with respect to each canary (add/remove one canary: DP-SGD's accountant
bounds exactly this), then given the output and the bits revealed so far, each guess is right with probability
at most p = e^ε / (1 + e^ε); so W is stochastically dominated by B ~ Binomial(r, p) (their main theorem, δ = 0).

Approximate DP (δ > 0): the bound used here, and its proof (written for this module; the paper's δ term has a
different form, not reproduced here). Reveal the bits in index order; π_i = P[S_i = guess_i | output, S_<i].
(1) For every event E of (output, S_<i): P[guess i right, E] - p·P[guess i made, E] ≤ δ / (1 + e^ε).
    Fix S_-i; with A, B the outputs in E where the guess is +1, -1, the left side is
    ½(1 - p)[P+(A) + P-(B) - e^ε (P-(A) + P+(B))] ≤ ½(1 - p)·2δ, by (ε, δ)-DP applied to A and to B.
    Taking E = {π_i > p, i guessed}: E[(π_i - p)+ · 1(i guessed)] ≤ δ / (1 + e^ε).
(2) Realise S_i = guess_i iff U_i < π_i with U_i i.i.d. uniform (the same joint law). Then
    W ≤ B + X, B = Σ_guessed 1(U_i < p) ~ Binomial(r, p) exactly (the guessed set is a function of the output,
    the U_i are independent of it), and X = Σ_guessed 1(p ≤ U_i < π_i) ≥ 0 with E[X] ≤ μ = m·δ / (1 + e^ε).
(3) P[W ≥ v] ≤ P[B ≥ v] + Σ_{j≥1} P[B = v - j, X ≥ j], and Σ_j j·P[B = v - j, X ≥ j] ≤ E[X] ≤ μ; so
    the sum is at most the value of the fractional knapsack max Σ t_j s.t. 0 ≤ t_j ≤ P[B = v - j],
    Σ j·t_j ≤ μ, filled greedily from j = 1 (`_delta_terms`). For m = r = 1 the bound is (e^ε + δ)/(1 + e^ε):
    tight.
At δ = 0 this is exactly the Binomial tail. Setting δ = 0 for a mechanism that is only (ε, δ)-DP would be
anti-conservative (it could flag a correct mechanism), which is why δ is never dropped here.

From a bound to ε. For each ε on a grid of step `EPSILON_STEP`, `p_value_bound(ε)` bounds P[W ≥ v] for every
(ε, δ)-DP run; the lower bound is the largest grid ε such that it and every grid point below it is rejected at
level β. If the run is (ε*, δ)-DP, reporting more than ε* needs the test at the first grid point ≥ ε* to
reject, which happens with probability ≤ β: valid whether or not the bound is monotone in ε. Choosing the best
of G (k+, k-) settings after seeing the scores is paid for by testing each at β / G (Bonferroni).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

EPSILON_STEP = 0.01  # grid of ε values tested; lower bounds are multiples of it, rounded down
EPSILON_MAX = 60.0  # far beyond what any number of guesses a computer holds can show (ε ≈ log r)


def correct_guesses(scores: np.ndarray, inclusion: np.ndarray, num_plus: int, num_minus: int) -> tuple[int, int]:
    """(number of guesses r = k+ + k-, number correct): "in" for the k+ highest scores, "out" for the k- lowest.

    Args:
        scores: (m,) higher = more likely included. Ties are broken by canary index (a fixed, S-independent rule).
        inclusion: (m,) bool, True where the canary was in the training set (S_j = +1).
        num_plus, num_minus: k+ and k-, with k+ + k- ≤ m.
    """
    scores, inclusion = np.asarray(scores, dtype=np.float64), np.asarray(inclusion, dtype=bool)
    m = len(scores)
    if scores.shape != inclusion.shape or scores.ndim != 1:
        raise ValueError("scores and inclusion must be (m,) arrays of the same length")
    if num_plus < 0 or num_minus < 0 or num_plus + num_minus > m:
        raise ValueError(f"need 0 ≤ k+, k- and k+ + k- ≤ m = {m}, got k+={num_plus}, k-={num_minus}")
    if not np.isfinite(scores).all():
        raise ValueError("non-finite canary score")
    order = np.argsort(-scores, kind="stable")  # highest first
    guessed_in, guessed_out = order[:num_plus], order[m - num_minus :]
    correct = int(inclusion[guessed_in].sum()) + int((~inclusion[guessed_out]).sum())
    return num_plus + num_minus, correct


def _delta_terms(pmf_below: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Per row: max Σ_j t_j s.t. 0 ≤ t_j ≤ pmf_below[j-1] (= P[B = v - j]), Σ_j j·t_j ≤ mu, filled greedily
    from j = 1 (the cheapest probability first). pmf_below: (n, v), mu: (n,)."""
    n, v = pmf_below.shape
    if v == 0:
        return np.zeros(n)
    j = np.arange(1, v + 1)
    cost = np.cumsum(j * pmf_below, axis=1)  # increasing along j
    value = np.cumsum(pmf_below, axis=1)
    full = (cost <= mu[:, None]).sum(axis=1)  # items 1..full fit whole
    rows = np.arange(n)
    spent = np.where(full > 0, cost[rows, np.maximum(full - 1, 0)], 0.0)
    taken = np.where(full > 0, value[rows, np.maximum(full - 1, 0)], 0.0)
    partial = np.where(full < v, (mu - spent) / (full + 1), 0.0)
    return np.where(mu > 0, taken + partial, 0.0)


def p_value_bounds(
    num_correct: int, num_guesses: int, num_canaries: int, epsilons, delta: float, exact_above: float = 0.0
) -> np.ndarray:
    """Upper bounds on P[W ≥ num_correct] for every (ε, δ)-DP run, one per ε (see the module docstring), ≤ 1.

    Where P[B ≥ v] + m·δ/(1 + e^ε) (valid, looser) is ≤ `exact_above`, or P[B ≥ v] alone is above it, that is
    returned instead of the exact knapsack: a test at level `exact_above` decides the same with either."""
    v, r, m = int(num_correct), int(num_guesses), int(num_canaries)
    epsilons = np.atleast_1d(np.asarray(epsilons, dtype=np.float64))
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 ≤ correct ≤ guesses ≤ canaries, got {v}, {r}, {m}")
    if (epsilons < 0).any() or not 0 <= delta < 1:
        raise ValueError(f"need ε ≥ 0 and 0 ≤ δ < 1, got ε={epsilons}, δ={delta}")
    if v == 0:
        return np.ones_like(epsilons)
    p = 1.0 / (1.0 + np.exp(-epsilons))  # e^ε / (1 + e^ε), without overflow
    bound = stats.binom.sf(v - 1, r, p)
    mu = m * delta * (1.0 - p)  # m·δ / (1 + e^ε)
    exact = (mu > 0) & (bound + mu > exact_above)
    if exact_above > 0:  # where the tail alone exceeds it, so does every bound: no need for the exact one
        exact &= bound <= exact_above
    if exact.any():
        p_x, mu_x = p[exact], mu[exact]
        # P[B = v-1], P[B = v-2], ...: only as many as the greedy fill reaches (it stops inside the first `count`
        # items unless all of them fit whole), growing fourfold until it does.
        count = min(v, 64)
        while True:
            below = stats.binom.pmf(np.arange(v - 1, v - 1 - count, -1)[None, :], r, p_x[:, None])
            exhausted = (np.cumsum(np.arange(1, count + 1) * below, axis=1)[:, -1] <= mu_x).any()
            if count == v or not exhausted:
                break
            count = min(v, 4 * count)
        bound[exact] += _delta_terms(below, mu_x)
    bound[~exact] += mu[~exact]
    return np.minimum(bound, 1.0)


def p_value_bound(num_correct: int, num_guesses: int, num_canaries: int, epsilon: float, delta: float) -> float:
    """`p_value_bounds` at one ε."""
    return float(p_value_bounds(num_correct, num_guesses, num_canaries, [epsilon], delta)[0])


def epsilon_lower_bound(num_correct: int, num_guesses: int, num_canaries: int, delta: float, alpha: float) -> float:
    """The largest grid ε such that every grid ε' ≤ ε is rejected at level `alpha` (0 if none is).

    With probability ≥ 1 - alpha this does not exceed the ε of an (ε, δ)-DP run.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    grid = np.arange(0.0, EPSILON_MAX + EPSILON_STEP / 2, EPSILON_STEP)
    chunk = 128
    for start in range(0, len(grid), chunk):  # in order from ε = 0, a chunk at a time; stop at the first failure
        bounds = p_value_bounds(num_correct, num_guesses, num_canaries, grid[start : start + chunk], delta, alpha)
        failed = np.flatnonzero(bounds > alpha)
        if len(failed):
            k = start + int(failed[0])
            return 0.0 if k == 0 else float(np.round(grid[k - 1], 10))
    return float(grid[-1])


@dataclass(frozen=True)
class GuessResult:
    num_plus: int
    num_minus: int
    num_guesses: int
    num_correct: int
    epsilon_lower_bound: float  # at this setting's share of the confidence (Bonferroni)


@dataclass(frozen=True)
class AuditResult:
    """The best lower bound over the (k+, k-) settings, each tested at (1 - confidence) / len(settings)."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    num_canaries: int
    num_included: int
    best: GuessResult
    settings: tuple[GuessResult, ...]


def default_guess_settings(num_canaries: int) -> tuple[tuple[int, int], ...]:
    """(k+, k-) pairs fixed before any score is seen: symmetric guesses on 2%, 10%, 30% and 100% of the
    canaries, and "in"-only guesses on the top 2% and 10% (for scores, like a loss, informative on one side)."""
    m = num_canaries
    pairs = [(max(1, round(f * m / 2)),) * 2 for f in (0.02, 0.1, 0.3)] + [(m // 2, m - m // 2)]
    pairs += [(max(1, round(f * m)), 0) for f in (0.02, 0.1)]
    return tuple(dict.fromkeys(p for p in pairs if sum(p) <= m))  # distinct, in order


def audit(
    scores: np.ndarray,
    inclusion: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    settings: Sequence[tuple[int, int]] | None = None,
) -> AuditResult:
    """The ε lower bound at `confidence` from one run's canary scores, best over `settings` (Bonferroni).

    Args:
        scores: (m,) canary scores, higher = more likely included; computed without looking at `inclusion`.
        inclusion: (m,) bool, the secret bits (True = in the training set).
        delta: the δ of the guarantee being audited.
        confidence: 1 - β for the reported bound, over all settings together.
        settings: (k+, k-) pairs chosen before seeing the scores; default `default_guess_settings(m)`.
    """
    inclusion = np.asarray(inclusion, dtype=bool)
    m = len(inclusion)
    if m == 0:
        raise ValueError("no canaries to audit")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    settings = tuple(settings) if settings is not None else default_guess_settings(m)
    if not settings:
        raise ValueError("no (k+, k-) setting to test")
    alpha = (1.0 - confidence) / len(settings)
    results = []
    for num_plus, num_minus in settings:
        r, v = correct_guesses(scores, inclusion, num_plus, num_minus)
        results.append(GuessResult(num_plus, num_minus, r, v, epsilon_lower_bound(v, r, m, delta, alpha)))
    best = max(results, key=lambda g: g.epsilon_lower_bound)
    return AuditResult(best.epsilon_lower_bound, confidence, delta, m, int(inclusion.sum()), best, tuple(results))
