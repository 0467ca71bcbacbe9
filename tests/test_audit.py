"""The one-run privacy audit (contract: "a one-run canary audit flags deliberately broken mechanisms ... and never
flags the correct one").

Statistics (`dpmix_dist/privacy/audit.py`) against references: the exact Binomial tail (δ = 0), mechanisms whose
(ε, δ) is known exactly (randomized response, with and without a δ-probability leak), coverage over seeds.

Harness (`dpmix_dist/audit.py`): its parts, then real training runs of the tiny config with canaries (marked
`slow`: end-to-end runs, ~40 s together; `make test` runs them). The broken mechanisms are built HERE (subclasses
of the real `PrivateGradient` / `GradientCanaries`, passed through `run_audit`'s test-only arguments); no
production setting can turn them on.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, offline_env
from scipy import optimize, stats

from dpmix_dist.audit import AuditSettings, GradientCanaries, StoreWithCanaries, input_canary_split, run_audit
from dpmix_dist.config import load_config
from dpmix_dist.data.shards import Split, write_dataset
from dpmix_dist.data.sources import RawDataset, RawSplit
from dpmix_dist.data.store import ExampleStore
from dpmix_dist.privacy import audit as A
from dpmix_dist.privacy.mechanism import PrivateGradient
from dpmix_dist.testing.datagen import class_images

HEAD = ("model.trainable=head", "model.num_trainable_blocks=null")  # tiny_test trains its last 2 blocks: the head only


def _p(epsilon: float) -> float:
    return math.exp(epsilon) / (1 + math.exp(epsilon))


# ---------------------------------------------------------------------------------------------- statistics


def test_correct_guesses_takes_the_top_k_plus_as_in_and_the_bottom_k_minus_as_out():
    scores = np.array([5.0, 1.0, 4.0, 0.0, 3.0, 2.0])
    included = np.array([True, False, False, False, True, True])
    assert A.correct_guesses(scores, included, 2, 0) == (2, 1)  # guesses 0 (in: right) and 2 (in: wrong)
    assert A.correct_guesses(scores, included, 0, 2) == (2, 2)  # 3 and 1 are out: both right
    assert A.correct_guesses(scores, included, 3, 3) == (6, 4)
    with pytest.raises(ValueError):
        A.correct_guesses(scores, included, 4, 3)


def test_at_delta_zero_the_bound_is_the_binomial_tail_and_the_lower_bound_its_root():
    for v, r, m in [(50, 50, 100), (80, 100, 1000), (450, 500, 1000), (19, 20, 40)]:
        for epsilon in (0.0, 0.5, 2.0):
            tail = stats.binom.sf(v - 1, r, _p(epsilon))
            assert A.p_value_bound(v, r, m, epsilon, 0.0) == pytest.approx(tail, rel=1e-12)
        root = optimize.brentq(lambda e, v=v, r=r: stats.binom.sf(v - 1, r, _p(e)) - 0.05, 0, 50)
        lower = A.epsilon_lower_bound(v, r, m, 0.0, 0.05)
        assert root - A.EPSILON_STEP < lower <= root
    assert A.epsilon_lower_bound(30, 60, 60, 0.0, 0.05) == 0.0  # chance level: no evidence at all


def test_one_guess_bound_is_exact_for_the_worst_eps_delta_mechanism():
    """One canary, one guess: no (ε, δ)-DP mechanism is guessed right with probability above (e^ε + δ)/(1 + e^ε),
    and "reveal the bit with probability δ, else randomized response at ε" reaches it."""
    for epsilon, delta in [(1.0, 1e-5), (0.3, 0.1), (3.0, 0.01)]:
        achieved = delta + (1 - delta) * _p(epsilon)
        assert A.p_value_bound(1, 1, 1, epsilon, delta) == pytest.approx(achieved, rel=1e-12)


@pytest.mark.parametrize("leak", ["each_bit", "all_bits"])
def test_bound_holds_for_eps_delta_mechanisms_where_the_pure_bound_fails(leak):
    """Exact tails of two (ε, δ)-DP mechanisms over m bits, all guessed: randomized response at ε, plus with
    probability δ the true bit (each bit on its own), or all m bits at once. Each is (ε, δ)-DP in every bit.
    The δ-aware bound holds for every v; the pure-DP bound (δ = 0) does not: dropping δ is anti-conservative."""
    m, epsilon, delta = 40, 0.5, 0.02
    p = _p(epsilon)
    v = np.arange(m + 1)
    if leak == "each_bit":
        exact = stats.binom.sf(v - 1, m, delta + (1 - delta) * p)
    else:
        exact = delta + (1 - delta) * stats.binom.sf(v - 1, m, p)
    bound = np.array([A.p_value_bound(int(k), m, m, epsilon, delta) for k in v])
    pure = np.array([A.p_value_bound(int(k), m, m, epsilon, 0.0) for k in v])
    assert (exact <= bound + 1e-12).all()
    assert (exact > pure + 1e-6).any()


def _randomized_response_lower_bound(epsilon: float, m: int, seed: int, settings=None) -> float:
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    answer = np.where(rng.random(m) < _p(epsilon), included, ~included)
    scores = answer + 1e-3 * rng.random(m)  # random tie-break, independent of the bits
    return A.audit(scores, included, delta=1e-5, settings=settings).epsilon_lower_bound


def test_randomized_response_bound_is_valid_over_seeds_and_tight_for_large_m():
    """Randomized response at ε = 1 is exactly 1-DP. Over 30 seeds the 95% bound may exceed 1 in ~5% of them
    (at most 5 of 30 allowed: P ≈ 2% under a Binomial(30, 0.05)); with 200,000 canaries all guessed it is
    within 0.05 of 1."""
    bounds = np.array([_randomized_response_lower_bound(1.0, 1000, seed) for seed in range(30)])
    assert (bounds > 1.0).sum() <= 5
    assert bounds.mean() > 0.6  # and the audit is not vacuous
    large = _randomized_response_lower_bound(1.0, 200_000, 0, settings=[(100_000, 100_000)])
    assert 0.95 <= large <= 1.0


def test_the_best_of_several_settings_pays_for_the_choice():
    rng = np.random.default_rng(0)
    included = rng.random(500) < 0.5
    scores = included + rng.normal(size=500)
    settings = A.default_guess_settings(500)
    result = A.audit(scores, included, 1e-5, 0.95, settings)
    assert len(result.settings) == len(settings) > 1
    r, v = A.correct_guesses(scores, included, result.best.num_plus, result.best.num_minus)
    assert result.epsilon_lower_bound == A.epsilon_lower_bound(v, r, 500, 1e-5, 0.05 / len(settings))
    assert result.epsilon_lower_bound <= A.epsilon_lower_bound(v, r, 500, 1e-5, 0.05)


def test_the_fast_scan_decides_like_the_exact_bound_at_every_grid_point():
    """`epsilon_lower_bound` skips the exact δ term where a cheaper bound already decides; a plain scan with the
    exact bound at every grid point must give the same answer."""
    cases = [
        (450, 500, 1000, 1e-3, 0.05),
        (95, 100, 10_000, 1e-5, 0.01),
        (60, 100, 100, 0.01, 0.05),
        (300, 400, 400, 2e-3, 0.008),
    ]
    for v, r, m, delta, alpha in cases:
        grid = np.arange(0, 10, A.EPSILON_STEP)
        exact = np.array([A.p_value_bound(v, r, m, float(e), delta) for e in grid])
        first_failure = int(np.flatnonzero(exact > alpha)[0])
        expected = 0.0 if first_failure == 0 else float(np.round(grid[first_failure - 1], 10))
        assert A.epsilon_lower_bound(v, r, m, delta, alpha) == expected


# ---------------------------------------------------------------------------------------------- harness: parts


def test_gradient_canaries_join_steps_at_rate_q_only_when_included_and_are_clipped_like_examples():
    """Noise off, nothing but canaries: each step releases exactly C/(q·N) on the coordinate of each sampled canary
    (norm 50 clipped to C = 2), zero elsewhere; only included canaries ever appear, each at rate q."""
    shapes = {"w": torch.Size([30, 20]), "b": torch.Size([20])}
    mech = PrivateGradient(
        shapes,
        noise_multiplier=0.0,
        max_grad_norm=2.0,
        expected_batch_size=10.0,
        secret_seed=1,
        world_size=1,
        all_reduce_sum=lambda t: None,
    )
    m, q, steps = 400, 0.1, 200
    included = np.arange(m) % 3 == 0
    coordinates = np.random.default_rng(0).choice(620, size=m, replace=False)
    canaries = GradientCanaries(
        mech, included, coordinates=coordinates, sample_rate=q, canary_norm=50.0, sampling_seed=5
    )
    for step in range(steps):
        canaries.begin_step(step)
        flat = canaries.finish_step()
        others = np.setdiff1d(np.arange(620), coordinates)
        assert torch.all(flat[others] == 0)
    y = torch.stack(canaries.released).numpy() * 10.0 / 2.0  # in units of C
    assert np.abs(y[:, ~included]).max() == 0
    assert np.allclose(y[y > 0], 1.0, atol=1e-6)  # clipped to C exactly (up to clipping's 1e-6 guard)
    sampled = int((y[:, included] > 0.5).sum())
    assert stats.binomtest(sampled, steps * int(included.sum()), q).pvalue > 1e-3
    # Gaussian directions: unit rows, group gradients of the canary norm
    u = torch.nn.functional.normalize(torch.randn(m, 620), dim=1)
    gaussian = GradientCanaries(mech, included, directions=u, sample_rate=q, canary_norm=3.0, sampling_seed=5)
    grads = gaussian.group_gradients(torch.tensor([0, 7]))
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    assert torch.allclose(norms, torch.full((2,), 3.0))


def _identity_store(images: np.ndarray, labels: np.ndarray, owned: torch.Tensor) -> ExampleStore:
    def to_input(x):
        return torch.from_numpy(np.asarray(x, dtype=np.float32)).flatten(1)

    return ExampleStore(Split(images, labels), owned, to_input, lambda x: x, cache_features=True, batch_size=7)


def test_store_with_canaries_serves_private_examples_and_included_canaries_by_global_index():
    rng = np.random.default_rng(0)
    private_images = rng.integers(0, 255, (20, 2, 2, 1), dtype=np.uint8)
    canary_images = rng.integers(0, 255, (6, 2, 2, 1), dtype=np.uint8)
    private_labels, canary_labels = np.arange(20) % 3, np.arange(6) % 3 + 10
    included = np.array([True, False, True, True, False, False])
    store = StoreWithCanaries(
        _identity_store(private_images, private_labels, torch.arange(20)),
        _identity_store(canary_images, canary_labels, torch.arange(6)),
        included,
    )
    assert store.num_global == 26
    assert store.owned.tolist() == list(range(20)) + [20, 22, 23]
    images, labels = np.concatenate([private_images, canary_images]), np.concatenate([private_labels, canary_labels])
    index = torch.tensor([22, 3, 20, 19, 0, 23])
    expected = torch.from_numpy(images[index.numpy()].reshape(6, -1).astype(np.float32))
    assert torch.equal(store.features(index), expected)
    assert store.labels(index).tolist() == labels[index.numpy()].tolist()
    assert np.array_equal(store.split.images[index.numpy()], images[index.numpy()])


def test_input_canaries_are_mislabelled_public_images_or_random_images(tmp_path):
    labels = np.arange(30) % 5
    splits = {"train": RawSplit(class_images(labels, 8, 1, 1), labels)}
    public = write_dataset(RawDataset("public", tuple("abcde"), splits, "tests"), tmp_path / "public")
    meta = {"num_classes": 5, "splits": {"train": {"image_shape": [8, 8, 1]}}, "partition": {"partner": str(public)}}
    canaries, design = input_canary_split(meta, str(tmp_path / "cache"), 12, seed=3)
    assert design == "public images of public, wrong labels"
    assert canaries.images.shape == (12, 8, 8, 1)
    originals = {class_images(labels, 8, 1, 1)[i].tobytes(): labels[i] for i in range(30)}
    assert all(originals[img.tobytes()] != label for img, label in zip(canaries.images, canaries.labels))
    random_ones, design = input_canary_split({**meta, "partition": {}}, str(tmp_path / "cache"), 12, seed=3)
    assert design == "random-pixel images, random labels"
    assert random_ones.images.shape == (12, 8, 8, 1) and set(random_ones.labels) <= set(range(5))


# ---------------------------------------------------------------------------------------------- harness: real runs
#
# Settings of every run below (chosen here, once): the tiny config (timm test_efficientnet, random init) trained
# head-only (12,850 parameters, 50 classes, on cached frozen features: seconds per run) on 1,600 private images,
# expected batch 16 (q = 0.01), 2 epochs = 200 steps, target ε = 2 at δ = 1e-5 (σ ≈ 0.86, RDP), 95% confidence,
# likelihood score, the default (k+, k-) settings. Gradient canaries: 12,000 Diracs (distinct coordinates), or
# 2,000 random Gaussian directions; half included. Small q and a moderate σ are where a one-run audit is sharpest:
# an included canary is sampled about twice, and each bug makes those steps stand out.

NUM_PRIVATE, BATCH, EPOCHS, TARGET_EPSILON = 1600, 16, 2, 2.0
NUM_CANARIES = {"dirac": 12_000, "gaussian": 2_000}
NUM_CLASSES = 50  # the tiny config's model has 256 features: a head of 256·50 + 50 = 12,850 parameters


@pytest.fixture(scope="module")
def private_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit")
    labels, test_labels = np.arange(NUM_PRIVATE) % NUM_CLASSES, np.arange(NUM_CLASSES)
    splits = {
        "train": RawSplit(class_images(labels, 28, 1, seed=3), labels),
        "test": RawSplit(class_images(test_labels, 28, 1, seed=5), test_labels),
    }
    classes = tuple(f"c{i}" for i in range(NUM_CLASSES))
    write_dataset(RawDataset("audit", classes, splits, "tests"), root / "data")
    return root


def _audit(
    root: Path,
    tmp_path: Path,
    *overrides: str,
    seed: int,
    direction: str = "dirac",
    canary_norm: float | None = None,
    input_canaries: int = 0,
    **hooks,
):
    config = load_config(
        "tiny_test",
        [
            f"data.root={root / 'data'}",
            f"data.cache_dir={root / 'cache'}",
            *HEAD,
            f"privacy.expected_batch_size={BATCH}",
            f"privacy.epochs={EPOCHS}",
            f"privacy.target_epsilon={TARGET_EPSILON}",
            "privacy.target_delta=1e-5",
            "performance.micro_batch_size=64",
            "run.eval_every_epochs=2",
            "run.checkpoint_every_epochs=2",
            *overrides,
        ],
    )
    settings = AuditSettings(
        num_gradient_canaries=NUM_CANARIES[direction],
        num_input_canaries=input_canaries,
        canary_norm=canary_norm,
        canary_direction=direction,
    )
    report = run_audit(config, settings, tmp_path / "run", secret_seed=seed, audit_seed=seed + 1000, **hooks)
    assert report.steps == EPOCHS * NUM_PRIVATE // BATCH
    assert 0.95 * TARGET_EPSILON < report.claimed_epsilon <= TARGET_EPSILON
    return report


def _like(real: PrivateGradient, cls=PrivateGradient, **changes) -> PrivateGradient:
    """A mechanism of class `cls` with the real one's settings (and `changes`), on one process."""
    kwargs = dict(
        noise_multiplier=real.noise_multiplier,
        max_grad_norm=real.max_grad_norm,
        expected_batch_size=real.expected_batch_size,
        secret_seed=4242,
        world_size=1,
        all_reduce_sum=lambda t: None,
        secure_noise=real.secure_noise,
    )
    return cls(real.shapes, **{**kwargs, **changes})


@pytest.mark.slow
def test_the_correct_mechanism_is_not_flagged(private_data, tmp_path):
    """Seed 11, the settings of the hardest control below (12,000 Dirac canaries of norm 10·C, clipped to C), plus 200
    black-box input canaries (random-pixel images with random labels): no bound above the claimed ε. (The theorem
    allows a false flag with probability ≤ 5% per canary type; the seeds are fixed, so this is deterministic.)"""
    report = _audit(private_data, tmp_path, seed=11, canary_norm=10.0, input_canaries=200)
    assert [c.kind for c in report.canaries] == ["input", "gradient"]
    assert all(c.num_guesses > 0 for c in report.canaries)
    assert not report.flagged, report


@pytest.mark.slow
def test_the_correct_mechanism_is_not_flagged_at_another_seed(private_data, tmp_path):
    """Seed 12, 2,000 Gaussian canaries of norm 10·C and the functorch engine: the clipping control's settings."""
    report = _audit(
        private_data, tmp_path, "performance.engine=functorch", seed=12, direction="gaussian", canary_norm=10.0
    )
    assert not report.flagged, report


@pytest.mark.slow
def test_noise_off_is_flagged(private_data, tmp_path):
    """σ = 0 released while the run claims the ε of the calibrated σ."""
    report = _audit(private_data, tmp_path, seed=13, broken_mechanism=lambda real: _like(real, noise_multiplier=0.0))
    assert report.flagged, report


class NoiseDividedBySqrtW(PrivateGradient):
    """The bug: every one of W ranks adds identical noise of std σC/√W after the all-reduce, as if the ranks' noises
    were independent and summed (they are not: same seed, added once after the reduce). The release then carries
    σC/√W in total. W = 16: σ/4 ≈ 0.21 is far below the σ the accountant was given; with W = 2 (σ/√2) the bug
    is real but too small for a one-run audit of this size to see."""

    WORLD_SIZE = 16

    def __init__(self, shapes, *, noise_multiplier: float, **kwargs) -> None:
        super().__init__(shapes, noise_multiplier=noise_multiplier / math.sqrt(self.WORLD_SIZE), **kwargs)


@pytest.mark.slow
def test_noise_divided_by_sqrt_world_size_is_flagged(private_data, tmp_path):
    report = _audit(private_data, tmp_path, seed=14, broken_mechanism=lambda real: _like(real, NoiseDividedBySqrtW))
    assert report.flagged, report


class NoClipping(PrivateGradient):
    """The bug: per-example gradients summed as they are, never clipped."""

    def accumulate(self, per_example_grads) -> None:  # past the mechanism's checks, as a bug inside it would be
        self._local_sum += self._flat({name: g.float().sum(0) for name, g in per_example_grads.items()})


@pytest.mark.slow
def test_clipping_off_is_flagged(private_data, tmp_path):
    """Gaussian canaries of norm 10·C, private examples through the functorch engine (which hands the mechanism
    per-example gradients to clip): nothing is clipped, so a sampled canary moves the release by 10·C."""
    report = _audit(
        private_data,
        tmp_path,
        "performance.engine=functorch",
        seed=12,
        direction="gaussian",
        canary_norm=10.0,
        broken_mechanism=lambda real: _like(real, NoClipping),
    )
    assert report.flagged, report


class MixedWithANeighbour(GradientCanaries):
    """The bug "two private examples in one group": each sampled canary's data also enters the group of another
    example of the batch (cross-example mixup), so removing the canary changes TWO clipped terms. That neighbour's
    group gradient is the mean over its members, (g_neighbour + G·e_j)/2; with the canary's norm G = 10·C and a
    neighbour whose own gradient is negligible next to G/2 (taken as 0 here), it is clipped to C·e_j. A sampled
    canary thus moves its coordinate by 2C in one step: sensitivity 2C, where the accountant assumed C."""

    def group_gradients(self, canaries: torch.Tensor) -> dict[str, torch.Tensor]:
        own = super().group_gradients(canaries)
        return {name: torch.cat([g, g / 2]) for name, g in own.items()}  # own groups, then the neighbours' groups


@pytest.mark.slow
def test_two_examples_in_one_group_is_flagged(private_data, tmp_path):
    """The subtlest bug here (twice the sensitivity, not ten times): at these settings its bound was 2.33-3.83
    against the claimed 2.00 at each of the seeds tried (12-21); seed 13 (2.83) is the one fixed here."""
    report = _audit(private_data, tmp_path, seed=13, canary_norm=10.0, canaries_type=MixedWithANeighbour)
    assert report.flagged, report


@pytest.mark.slow
def test_augmented_runs_take_input_canaries_through_the_group_builder(private_data, tmp_path):
    """self_aug (K = 2 views) draws each input canary's views from its global index, like a private example's."""
    config = load_config(
        "tiny_test",
        [
            f"data.root={private_data / 'data'}",
            f"data.cache_dir={private_data / 'cache'}",
            *HEAD,
            "privacy.expected_batch_size=16",
            "privacy.epochs=0.1",
            "privacy.target_delta=1e-5",
            "augment.method=self_aug",
            "augment.num_views=2",
            "performance.micro_batch_size=64",
        ],
    )
    report = run_audit(
        config,
        AuditSettings(num_gradient_canaries=500, num_input_canaries=100),
        tmp_path / "run",
        secret_seed=1,
        audit_seed=2,
    )
    assert report.steps == 10 and {c.kind for c in report.canaries} == {"input", "gradient"}


# ---------------------------------------------------------------------------------------------- the command


def test_help_explains_the_audit():
    out = subprocess.run(
        [sys.executable, "launch/audit.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env=offline_env(),
    )
    for words in ("Steinke", "gradient canaries", "input canaries", "FLAGGED", "Bonferroni", "--canary-direction"):
        assert words in out.stdout


def _main(*argv: str) -> int:
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import audit as launcher  # launch/audit.py
    finally:
        sys.path.pop(0)
    return launcher.main(list(argv))


@pytest.mark.slow
def test_the_command_reports_aggregates_and_writes_audit_json(private_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = _main(
        "--config",
        "tiny_test",
        "--output-dir",
        str(out),
        "--gradient-canaries",
        "2000",
        "--input-canaries",
        "50",
        "--seed",
        "5",
        "--audit-seed",
        "6",
        f"data.root={private_data / 'data'}",
        f"data.cache_dir={private_data / 'cache'}",
        *HEAD,
        "privacy.expected_batch_size=16",
        "privacy.epochs=0.5",
        "privacy.target_delta=1e-5",
        "performance.micro_batch_size=64",
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    report = json.loads((out / "audit.json").read_text())
    assert report["flagged"] is False and len(report["canaries"]) == 2
    assert "gradient canaries (dirac directions, norm 1 before clipping): m = 2000" in printed.out
    assert "input canaries (random-pixel images, random labels): m = 50" in printed.out
    assert "ε ≥" in printed.out and "consistent" in printed.out
    assert not (out / "audit_scores.npz").exists()  # scores only with --keep-scores
    assert "checkpoint.pt" not in {p.name for p in out.iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["privacy.enabled=false"], "nothing to audit"),
        (["privacy.no_such_key=1"], "privacy.no_such_key"),
        (["--gradient-canaries", "20000"], "--canary-direction gaussian"),
        (["--gradient-canaries", "0"], "no canaries"),
    ],
)
def test_the_command_fails_with_one_line_naming_the_fix(private_data, tmp_path, capsys, overrides, message):
    flags = [o for o in overrides if o.startswith("--") or o.isdigit()]
    keys = [o for o in overrides if o not in flags]
    code = _main(
        "--config",
        "tiny_test",
        "--output-dir",
        str(tmp_path / "run"),
        *flags,
        f"data.root={private_data / 'data'}",
        f"data.cache_dir={private_data / 'cache'}",
        *HEAD,
        "privacy.target_delta=1e-5",
        *keys,
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
