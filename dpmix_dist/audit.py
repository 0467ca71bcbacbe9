"""A one-run privacy audit (Steinke, Nasr & Jagielski, NeurIPS 2023): canaries in, ONE real training run, an ε
lower bound out. The statistics are in `privacy/audit.py`; this module runs the training with canaries.

The run is the real `Trainer` (its model, sampler, clipping engine, `PrivateGradient`, optimizer and steps); the
audit adds to it from outside, without changing any of its code:

- **Gradient canaries** (white-box). Canary j is an "example" whose group gradient is a fixed vector of norm
  `canary_norm` (default C) along u_j: one coordinate of the flat trainable-parameter vector (distinct coordinates,
  drawn from the design seed), or a random Gaussian direction. Each included canary joins every step independently
  with probability q, like a private example, and its gradient enters the mechanism through
  `PrivateGradient.accumulate` (so it is clipped like any example) before the step's all-reduce and noise
  (`GradientCanaries` wraps the mechanism).
  Score: from the released noisy gradients of all steps along u_j (DP-SGD's guarantee covers every iterate).
- **Input canaries** (black-box). m images with a wrong label (public images relabelled when the data folder has
  a public partner, else random-pixel images), added to the private training set; scored by the final model's
  loss (lower loss: guess "in").

The inclusion bits S come from an audit seed drawn from the OS CSPRNG, independent of the training's secret seed;
the canary design (coordinates, images, labels) from a separate stream of it, so the design says nothing of S.
The sampling rate q, σ, the steps and the divisor q·N are planned from the private set alone, before S is drawn:
the canaries change the data, never the mechanism's settings (the production trainer derives q from N, the
data-set size, which it treats as public; here N must not depend on S).

The audit runs in one process. Nothing private is printed: the report holds the guarantee, the number of
canaries, guesses and correct guesses, and the bounds; canary scores are kept only if asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from dpmix_dist.config import Config
from dpmix_dist.data.shards import Split, load_split
from dpmix_dist.data.store import ExampleStore
from dpmix_dist.errors import ConfigError
from dpmix_dist.privacy import audit as stats
from dpmix_dist.privacy.mechanism import PrivateGradient
from dpmix_dist.privacy.sampling import poisson_mask
from dpmix_dist.privacy.seeding import derive_seed

Score = Literal["likelihood", "sum"]
Direction = Literal["dirac", "gaussian"]
CANARY_CHUNK = 64  # canary gradients built (dense) and clipped this many at a time


@dataclass(frozen=True)
class AuditSettings:
    """What the audit adds to a run. Nothing here changes the run's guarantee."""

    num_gradient_canaries: int = 1000
    """White-box canaries (0: none); Dirac ones: at most the number of trainable parameters."""
    num_input_canaries: int = 0
    """Black-box canaries (0: none): mislabelled images added to the private training set."""
    canary_norm: float | None = None
    """L2 norm of a gradient canary before clipping; None = C (the largest a clipped example can have)."""
    canary_direction: Direction = "dirac"
    """Gradient canaries' directions: `dirac`, one distinct coordinate each (needs m ≤ trainable parameters);
    `gaussian`, random unit vectors (any m; canaries overlap slightly, which costs power, never validity)."""
    score: Score = "likelihood"
    """Gradient canaries' score (`canary_scores`): `likelihood`, the log likelihood ratio of "sampled with
    probability q each step" from the released steps; `sum`, the released gradient along the canary summed."""
    confidence: float = 0.95
    """1 - β of the reported lower bounds, over all (k+, k-) settings together (Bonferroni)."""

    def __post_init__(self) -> None:
        if self.num_gradient_canaries < 0 or self.num_input_canaries < 0:
            raise ConfigError("the numbers of canaries must be >= 0")
        if self.num_gradient_canaries == 0 and self.num_input_canaries == 0:
            raise ConfigError("no canaries: give --gradient-canaries and/or --input-canaries a positive number")
        if self.canary_norm is not None and not self.canary_norm > 0:
            raise ConfigError(f"--canary-norm must be > 0, got {self.canary_norm}")
        if self.canary_direction not in ("dirac", "gaussian"):
            raise ConfigError(f"--canary-direction must be dirac or gaussian, got {self.canary_direction!r}")
        if self.score not in ("likelihood", "sum"):
            raise ConfigError(f"--score must be likelihood or sum, got {self.score!r}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"--confidence must be in (0, 1), got {self.confidence}")


class GradientCanaries:
    """Wraps a `PrivateGradient`: adds this step's sampled gradient canaries before the step is released, and keeps
    what was released along each canary's direction. Everything else is the wrapped mechanism's.

    Canary j's group gradient is canary_norm·u_j, u_j a unit vector of the flat trainable-parameter space: a Dirac
    on coordinate `coordinates[j]` (distinct coordinates: canaries never overlap), or row j of `directions`
    (random Gaussian directions: nearly orthogonal, for more canaries than parameters).

    Args:
        mechanism: the mechanism the trainer uses (or, in tests, a deliberately broken one).
        included: (m,) bool, S_j = +1.
        coordinates: (m,) distinct positions in the flat vector; or None with `directions`.
        directions: (m, numel) unit rows; or None with `coordinates`.
        sample_rate: q, the run's.
        canary_norm: each canary's gradient norm before clipping.
        sampling_seed: seeds the canaries' Poisson draws (secret, like the run's sampling).
        secure_sampling: draw them from the cryptographic stream, as the run does with privacy.secure_noise.
    """

    def __init__(
        self,
        mechanism: PrivateGradient,
        included: np.ndarray,
        *,
        coordinates: np.ndarray | None = None,
        directions: torch.Tensor | None = None,
        sample_rate: float,
        canary_norm: float,
        sampling_seed: int,
        secure_sampling: bool = False,
    ) -> None:
        if (coordinates is None) == (directions is None):
            raise ValueError("give either coordinates (Dirac canaries) or directions")
        self.inner = mechanism
        self.included = torch.as_tensor(included, dtype=torch.bool)
        device = mechanism.device
        self.coordinates = None if coordinates is None else torch.as_tensor(coordinates, device=device).long()
        self.directions = None if directions is None else directions.to(device=device, dtype=torch.float32)
        self.sample_rate, self.canary_norm = sample_rate, canary_norm
        self._sampling_seed, self._secure_sampling = sampling_seed, secure_sampling
        self._step: int | None = None
        self.released: list[torch.Tensor] = []  # per step: (m,) released gradient along each canary, fp64, CPU

    def __getattr__(self, name: str):  # shapes, numel, unflatten, max_grad_norm, ... are the wrapped mechanism's
        return getattr(self.inner, name)

    def begin_step(self, step: int) -> None:
        self.inner.begin_step(step)
        self._step = step

    def accumulate(self, per_example_grads) -> None:
        self.inner.accumulate(per_example_grads)

    def accumulate_clipped_sum(self, summed, num_groups: int) -> None:
        self.inner.accumulate_clipped_sum(summed, num_groups)

    def finish_step(self) -> torch.Tensor:
        if self._step is None:
            raise RuntimeError("finish_step() without begin_step()")
        m, secure = len(self.included), self._secure_sampling
        mask = poisson_mask(self._sampling_seed, self._step, m, self.sample_rate, secure)
        sampled = torch.nonzero(mask & self.included).squeeze(1)
        for chunk in sampled.split(CANARY_CHUNK):
            self.inner.accumulate(self.group_gradients(chunk))
        self._step = None
        flat = self.inner.finish_step()
        along = flat.detach()[self.coordinates] if self.coordinates is not None else self.directions @ flat.detach()
        self.released.append(along.double().cpu())
        return flat

    def group_gradients(self, canaries: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-group gradients (name -> (b, *shape)) of these sampled canaries: canary_norm·u_j each."""
        if self.coordinates is not None:
            flat = torch.zeros(len(canaries), self.inner.numel, device=self.inner.device)
            flat[torch.arange(len(canaries), device=flat.device), self.coordinates[canaries.to(flat.device)]] = 1.0
        else:
            flat = self.directions[canaries.to(self.directions.device)]
        flat = flat * self.canary_norm
        out, offset = {}, 0
        for name, shape in self.inner.shapes.items():
            n = int(torch.Size(shape).numel())
            out[name] = flat[:, offset : offset + n].reshape(len(canaries), *shape)
            offset += n
        return out

    def scores(self, score: Score) -> np.ndarray:
        """(m,) scores from the released steps alone (no use of S). See `canary_scores`."""
        if not self.released:
            raise RuntimeError("no step was released")
        # y[t, j]: the released noisy SUM along canary j at step t, in units of C
        y = torch.stack(self.released).numpy() * self.inner.expected_batch_size / self.inner.max_grad_norm
        return canary_scores(y, self.sample_rate, score)


def canary_scores(y: np.ndarray, sample_rate: float, score: Score) -> np.ndarray:
    """Scores of m gradient canaries from y (steps, m): each step's released sum along each canary, in units of C.

    Each step is standardised across the canaries: median, and s_t = 1.4826·MAD as its noise scale. That is σ
    where the private examples' own gradients along random coordinates are negligible, and it also counts them
    where they are not (the early steps of a head on frozen features). A canary adds 1 with probability q per
    step, so `likelihood` is Σ_t log(1 - q + q·exp((y_t - median_t - ½) / s_t²)), the log likelihood ratio of
    "sampled with probability q each step" against "absent" under Gaussian noise of scale s_t (Neyman-Pearson);
    `sum` is Σ_t (y_t - median_t) / s_t.
    """
    centre = np.median(y, axis=1, keepdims=True)
    scale = np.maximum(1.4826 * np.median(np.abs(y - centre), axis=1, keepdims=True), 1e-6)  # > 0 even without noise
    if score == "sum":
        return ((y - centre) / scale).sum(0)
    z = np.clip((y - centre - 0.5) / scale**2, None, 700.0)
    return np.log1p(sample_rate * np.expm1(z)).sum(0)


# ---------------------------------------------------------------------------------------------- input canaries


def input_canary_split(metadata: dict, cache_dir: str, num: int, seed: int) -> tuple[Split, str]:
    """`num` mislabelled images and what they are: the public partner's training images with a random wrong label
    when the private folder records one (launch/prepare_data.py --public-out), else random-pixel images with
    random labels."""
    rng = np.random.default_rng(seed)
    num_classes = int(metadata["num_classes"])
    shape = tuple(metadata["splits"]["train"]["image_shape"])
    partner = Path(metadata.get("partition", {}).get("partner", "") or "/nonexistent")
    if (partner / "metadata.json").is_file():
        public = load_split(partner, "train", cache_dir)
        if len(public) < num:
            raise ConfigError(f"--input-canaries={num}: the public split {partner} has only {len(public)} images")
        picks = np.sort(rng.choice(len(public), size=num, replace=False))
        images = np.asarray(public.images[picks])
        labels = (public.labels[picks] + rng.integers(1, num_classes, size=num)) % num_classes  # never the true one
        return Split(images, labels.astype(np.int64)), f"public images of {partner.name}, wrong labels"
    images = rng.integers(0, 256, size=(num, *shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=num)
    return Split(images, labels.astype(np.int64)), "random-pixel images, random labels"


class _ConcatImages:
    """Read-only view of two image arrays as one, indexed by arrays of global indices."""

    def __init__(self, first: np.ndarray, second: np.ndarray) -> None:
        self.first, self.second = first, second
        self.shape = (len(first) + len(second), *first.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        index = np.asarray(index)
        out = np.empty((len(index), *self.shape[1:]), dtype=self.first.dtype)
        low = index < len(self.first)
        out[low] = self.first[index[low]]
        out[~low] = self.second[index[~low] - len(self.first)]
        return out


class StoreWithCanaries:
    """The private store (global indices 0..N-1) and the input canaries (N..N+m-1) as one store, holding the
    private examples and the included canaries. Sampling over all N + m indices at the run's q is exactly Poisson
    sampling of the private set and of each included canary."""

    def __init__(self, private: ExampleStore, canaries: ExampleStore, included: np.ndarray) -> None:
        self.private, self.canaries = private, canaries
        self.num_private = len(private.split)
        self.num_global = self.num_private + len(canaries.split)
        extra = self.num_private + torch.from_numpy(np.flatnonzero(included)).long()
        self.owned = torch.cat([private.owned, extra])
        labels = np.concatenate([private.split.labels, canaries.split.labels])
        self.split = Split(_ConcatImages(private.split.images, canaries.split.images), labels)
        self._labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.owned)

    def features(self, global_indices: torch.Tensor) -> torch.Tensor:
        is_canary = global_indices >= self.num_private
        if not is_canary.any():
            return self.private.features(global_indices)
        canary = self.canaries.features(global_indices[is_canary] - self.num_private)
        out = torch.empty(len(global_indices), *canary.shape[1:], dtype=canary.dtype, device=canary.device)
        out[is_canary.to(out.device)] = canary
        if not is_canary.all():
            out[~is_canary.to(out.device)] = self.private.features(global_indices[~is_canary]).to(out.dtype)
        return out

    def labels(self, global_indices: torch.Tensor) -> torch.Tensor:
        return self._labels[global_indices]


# ---------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class CanaryReport:
    """One canary type's result (aggregates only)."""

    kind: str
    design: str
    num_canaries: int
    num_included: int
    num_guesses: int
    num_correct: int
    num_plus: int
    num_minus: int
    epsilon_lower_bound: float
    settings_tested: int


@dataclass(frozen=True)
class AuditReport:
    claimed_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    accountant: str
    confidence: float
    canaries: tuple[CanaryReport, ...]
    eval_accuracy: float
    eval_split: str
    seconds: float

    @property
    def flagged(self) -> bool:
        """True if some canary type shows more privacy loss than the run claims."""
        return any(c.epsilon_lower_bound > self.claimed_epsilon for c in self.canaries)

    def to_dict(self) -> dict:
        return {**asdict(self), "flagged": self.flagged}


def _report(kind: str, design: str, result: stats.AuditResult) -> CanaryReport:
    b = result.best
    return CanaryReport(
        kind,
        design,
        result.num_canaries,
        result.num_included,
        b.num_guesses,
        b.num_correct,
        b.num_plus,
        b.num_minus,
        result.epsilon_lower_bound,
        len(result.settings),
    )


MechanismHook = Callable[[PrivateGradient], PrivateGradient]


def run_audit(
    config: Config,
    settings: AuditSettings,
    output_dir: Path,
    *,
    secret_seed: int,
    audit_seed: int,
    cpu: bool = True,
    keep_scores: bool = False,
    broken_mechanism: MechanismHook | None = None,
    canaries_type: type[GradientCanaries] = GradientCanaries,
) -> AuditReport:
    """Train once with canaries and bound ε from below.

    Args:
        config: the run's config (privacy must be enabled).
        settings: the canaries and the statistics.
        output_dir: receives the trainer's outputs (model, summary.json) and audit.json.
        secret_seed: the run's secret seed (sampling, noise), as for `launch/finetune.py`.
        audit_seed: draws S and the canary design; independent of `secret_seed`.
        cpu: run on the CPU even if a GPU is present.
        keep_scores: also write the canary scores and bits to audit_scores.npz (canaries are not private data).
        broken_mechanism, canaries_type: FOR TESTS ONLY (the audit's negative controls): replace the trainer's
            mechanism by `broken_mechanism(mechanism)`, build the gradient canaries with a subclass. The command
            line never sets them.
    """
    from dpmix_dist.distributed import Distributed
    from dpmix_dist.train import Trainer

    started = time.time()
    if not config.privacy.enabled:
        raise ConfigError("privacy.enabled=false: a non-private run claims ε = ∞; there is nothing to audit")
    dist = Distributed(cpu=cpu)
    if dist.world_size != 1:
        raise ConfigError("the audit runs in one process; launch it with python, not accelerate launch")
    trainer = Trainer(config, dist, output_dir, secret_seed)
    g = trainer.guarantee
    design = np.random.default_rng(derive_seed(audit_seed, "design"))
    bits = np.random.default_rng(derive_seed(audit_seed, "inclusion"))

    kinds: dict[str, tuple[object, np.ndarray, str]] = {}
    if settings.num_input_canaries:
        m = settings.num_input_canaries
        split, design_note = input_canary_split(
            trainer.metadata, config.data.cache_dir, m, derive_seed(audit_seed, "design", "input")
        )
        included = bits.random(m) < 0.5
        canary_store = _canary_store(trainer, split)
        store = StoreWithCanaries(trainer.train_store, canary_store, included)
        trainer.train_store, trainer.num_train = store, store.num_global  # the sampler's index space; q unchanged
        kinds["input"] = (canary_store, included, design_note)
    if settings.num_gradient_canaries:
        m, numel = settings.num_gradient_canaries, trainer.mechanism.numel
        if m > numel and settings.canary_direction == "dirac":
            raise ConfigError(
                f"--gradient-canaries={m}: the model has only {numel} trainable parameters (one "
                "coordinate per Dirac canary); use fewer canaries or --canary-direction gaussian"
            )
        included = bits.random(m) < 0.5
        direction = {}
        if settings.canary_direction == "dirac":
            direction["coordinates"] = np.sort(design.choice(numel, size=m, replace=False))
        else:
            u = torch.from_numpy(design.standard_normal((m, numel), dtype=np.float32))
            direction["directions"] = u / u.norm(dim=1, keepdim=True)
        mechanism = trainer.mechanism if broken_mechanism is None else broken_mechanism(trainer.mechanism)
        canaries = canaries_type(
            mechanism,
            included,
            **direction,
            sample_rate=g.sample_rate,
            canary_norm=settings.canary_norm or g.max_grad_norm,
            secure_sampling=config.privacy.secure_noise,
            sampling_seed=derive_seed(secret_seed, "audit-canaries"),
        )
        trainer.mechanism = canaries
        norm = settings.canary_norm or g.max_grad_norm
        kinds["gradient"] = (
            canaries,
            included,
            f"{settings.canary_direction} directions, norm {norm:g} before clipping",
        )
    elif broken_mechanism is not None:
        trainer.mechanism = broken_mechanism(trainer.mechanism)

    output_dir.mkdir(parents=True, exist_ok=True)
    summary = trainer.train()

    reports, saved = [], {}
    for kind, (source, included, design_note) in kinds.items():
        if kind == "gradient":
            scores = source.scores(settings.score)
        else:
            scores = -_losses(trainer, source)
        result = stats.audit(scores, included, g.delta, settings.confidence)
        reports.append(_report(kind, design_note, result))
        saved[f"{kind}_scores"], saved[f"{kind}_included"] = scores, included
    report = AuditReport(
        claimed_epsilon=summary["epsilon"],
        delta=g.delta,
        noise_multiplier=g.noise_multiplier,
        sample_rate=g.sample_rate,
        steps=summary["steps"],
        max_grad_norm=g.max_grad_norm,
        accountant=g.accountant,
        confidence=settings.confidence,
        canaries=tuple(reports),
        eval_accuracy=summary[trainer.accuracy_key],
        eval_split=summary["eval_split"],
        seconds=round(time.time() - started, 1),
    )
    if keep_scores:
        np.savez(output_dir / "audit_scores.npz", **saved)
    dist.close()
    return report


def _canary_store(trainer, split: Split) -> ExampleStore:
    """The input canaries as the trainer sees examples: the frozen prefix applied (and cached, as for private data)."""
    cfg = trainer.config
    caching = cfg.performance.cache_frozen_features and cfg.augment.method == "dpsgd"
    return ExampleStore(
        split,
        torch.arange(len(split)),
        trainer.inputs.to_input,
        trainer.dp_model.cut.prefix,
        cache_features=caching,
        batch_size=cfg.performance.eval_batch_size,
    )


@torch.no_grad()
def _losses(trainer, store: ExampleStore) -> np.ndarray:
    """The final model's loss on each input canary (un-augmented, as evaluation sees images)."""
    losses = []
    for chunk in store.owned.split(trainer.config.performance.eval_batch_size):
        logits = trainer.dp_model.cut.tail(store.features(chunk))
        losses.append(F.cross_entropy(logits.float(), store.labels(chunk).to(logits.device), reduction="none").cpu())
    return torch.cat(losses).double().numpy()


def format_report(report: AuditReport) -> str:
    """The printed summary: the guarantee, then one line per canary type (aggregates only)."""
    lines = [
        f"claimed: ε = {report.claimed_epsilon:.3f} at δ = {report.delta:g} ({report.accountant}; σ = "
        f"{report.noise_multiplier:.4f}, q = {report.sample_rate:.5g}, {report.steps} steps, "
        f"C = {report.max_grad_norm:g})",
    ]
    for c in report.canaries:
        flagged = c.epsilon_lower_bound > report.claimed_epsilon
        verdict = "FLAGGED: more leakage than claimed" if flagged else "consistent"
        lines.append(
            f"{c.kind} canaries ({c.design}): m = {c.num_canaries}, {c.num_correct}/{c.num_guesses} guesses correct "
            f"(k+ = {c.num_plus}, k- = {c.num_minus}, best of {c.settings_tested}); ε ≥ {c.epsilon_lower_bound:.2f} at "
            f"{report.confidence:.0%} confidence: {verdict}"
        )
    lines.append(
        f"{report.eval_split} accuracy {report.eval_accuracy:.4f} (the model trained with its canaries); "
        f"{report.seconds:.0f} s"
    )
    return "\n".join(lines)
