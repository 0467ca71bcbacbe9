"""Configs of the synthetic-image side (DP-Mix_Diff): training the offline generator, and generating images.

    configs/diffusion/NAME.yaml  -> DiffusionTrainConfig   (launch/train_diffusion.py)
    configs/generate/NAME.yaml   -> GenerateConfig         (launch/generate.py)

Same loader and rules as the training config (`dpmix_dist.config`): unknown keys and bad values fail with the
key's name before any work.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal

from dpmix_dist.typed_yaml import CONFIG_DIR, load_yaml_config
from dpmix_dist.typed_yaml import fail_key as _fail

DIFFUSION_CONFIG_DIR = CONFIG_DIR / "diffusion"
GENERATE_CONFIG_DIR = CONFIG_DIR / "generate"


# ------------------------------------------------------------------------------------- train_diffusion.py


@dataclass(frozen=True)
class DiffusionDataConfig:
    root: str = "data/fashion_mnist_public"
    """Shards of PUBLIC images (launch/prepare_data.py ... --public-out). A folder marked as the private part
    of a split is refused: the generator must never see the private set."""
    cache_dir: str = ".cache/dpmix"
    hflip: bool = True
    """Random horizontal flips while training."""


@dataclass(frozen=True)
class UNetConfig:
    """A small class-conditional diffusers UNet2DModel (class id num_classes = 'no class', for guidance)."""

    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    attention: bool = False
    """Self-attention in the lowest-resolution block (AttnDownBlock2D / AttnUpBlock2D)."""
    norm_num_groups: int = 8

    def __post_init__(self) -> None:
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            _fail(
                "unet.block_out_channels", f"must be a non-empty list of positive ints, got {self.block_out_channels}"
            )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            _fail("unet.norm_num_groups", f"{self.norm_num_groups} must divide every block_out_channels entry")
        if self.layers_per_block < 1:
            _fail("unet.layers_per_block", f"must be >= 1, got {self.layers_per_block}")


@dataclass(frozen=True)
class DiffusionTrainSection:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    """Exponential moving average of the weights; the saved model is the EMA."""
    class_dropout: float = 0.1
    """Fraction of examples trained with the 'no class' id, so sampling can use classifier-free guidance."""
    num_train_timesteps: int = 1000
    seed: int = 0
    """Seed of initialisation, batches and noise (the data are public: no secret here)."""
    num_threads: int = 0
    """torch intra-op threads; 0 = torch's default."""

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "num_train_timesteps"):
            if getattr(self, key) < 1:
                _fail(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            _fail("train.lr", f"must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            _fail("train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.ema_decay < 1:
            _fail("train.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.class_dropout < 1:
            _fail("train.class_dropout", f"must be in [0, 1), got {self.class_dropout}")


@dataclass(frozen=True)
class DiffusionTrainConfig:
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    train: DiffusionTrainSection = field(default_factory=DiffusionTrainSection)
    output_dir: str = "models/fmnist_ddpm"
    """Where the model goes (save_pretrained layout: unet/, scheduler/, dpmix_generator.json)."""


def load_diffusion_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> DiffusionTrainConfig:
    return load_yaml_config(DiffusionTrainConfig, name, overrides, DIFFUSION_CONFIG_DIR)


# -------------------------------------------------------------------------------------------- generate.py


@dataclass(frozen=True)
class GeneratorConfig:
    kind: Literal["text2image", "class_conditional"] = "class_conditional"
    """`text2image`: a diffusers text-to-image pipeline (e.g. Stable Diffusion) prompted with class names;
    `class_conditional`: a UNet2DModel trained by launch/train_diffusion.py, sampled per class id."""
    model: str = "models/fmnist_ddpm"
    """A local folder (save_pretrained layout) or, for text2image, a Hugging Face hub id (needs internet once)."""
    external_pretrained: bool = False
    """Declare `model` a pretrained model made by others whose training data does not contain the private set
    (e.g. Stable Diffusion from the hub). Recorded with the images; DP-Mix_Diff mixes in only images of such a
    model or of one trained here on the public part of the private data's split (whose record says so)."""
    prompt_templates: tuple[str, ...] = ("a photo of a {class_name}",)
    """text2image: image j of a class uses template j mod len(templates); `{class_name}` is the only field."""
    negative_prompt: str = ""
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    """Classifier-free guidance (1 = none)."""
    scheduler: Literal["default", "ddim", "dpm"] = "default"
    """text2image: `default` keeps the pipeline's scheduler, `ddim` / `dpm` (DPM-Solver++) replace it.
    class_conditional: `default`/`ddim` = DDIM (η = 0), `dpm` = DPM-Solver++ (2M); both deterministic, so every
    image is a function of its own seed."""
    resolution: int = 512
    """Side of the rendered image (text2image: the pipeline's height and width; class_conditional: must be
    the size the model was trained at)."""
    output_size: int = 32
    """Side of the stored image (resized with Lanczos when it differs from the resolution)."""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """`auto`: fp16 on a GPU, fp32 on the CPU."""
    batch_size: int = 16
    """Images rendered at once per process."""
    num_threads: int = 0

    def __post_init__(self) -> None:
        for key in ("num_inference_steps", "resolution", "output_size", "batch_size"):
            if getattr(self, key) < 1:
                _fail(f"generator.{key}", f"must be >= 1, got {getattr(self, key)}")
        if not self.guidance_scale >= 1:
            _fail("generator.guidance_scale", f"must be >= 1 (1 = no guidance), got {self.guidance_scale}")
        if not self.model:
            _fail("generator.model", "must name a local model folder or a hub id")
        if self.kind == "text2image":
            if not self.prompt_templates:
                _fail("generator.prompt_templates", "needs at least one template, e.g. 'a photo of a {class_name}'")
            for i, template in enumerate(self.prompt_templates):
                check_template(f"generator.prompt_templates[{i}]", template)


def check_template(key: str, template: str) -> None:
    """A prompt template must use `{class_name}` and no other field."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        _fail(key, f"{template!r} is not a valid template ({exc}); write e.g. 'a photo of a {{class_name}}'")
    if "class_name" not in fields:
        _fail(key, f"{template!r} does not mention {{class_name}}; write e.g. 'a photo of a {{class_name}}'")
    if unknown := sorted(set(fields) - {"class_name"}):
        _fail(key, f"{template!r} uses unknown field(s) {unknown}; only {{class_name}} is filled in")


@dataclass(frozen=True)
class ClassesConfig:
    names: tuple[str, ...] = ()
    """Class names, in label order. Leave empty to read them from `from_data`."""
    from_data: str = ""
    """A data folder (metadata.json) whose class names and label order the synthetic set takes."""

    def __post_init__(self) -> None:
        if not self.names and not self.from_data:
            _fail(
                "classes", "give the class names (classes.names) or a data folder to read them from (classes.from_data)"
            )
        if self.names and len(set(self.names)) != len(self.names):
            _fail("classes.names", "has duplicates")
        if any(not n.strip() for n in self.names):
            _fail("classes.names", "has an empty name")


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "data/synthetic"
    images_per_class: int = 100
    images_per_shard: int = 500
    seed: int = 0
    """Base seed: image j of class c is rendered from seed(base, c, j) (see dpmix_dist.synthetic.plan)."""

    def __post_init__(self) -> None:
        if self.images_per_class < 1:
            _fail("output.images_per_class", f"must be >= 1, got {self.images_per_class}")
        if self.images_per_shard < 1:
            _fail("output.images_per_shard", f"must be >= 1, got {self.images_per_shard}")
        if self.seed < 0:
            _fail("output.seed", f"must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class CheckConfig:
    """`generate.py --check`: does a classifier trained on real public images recognise the synthetic ones?"""

    real_data: str = ""
    """Folder of real PUBLIC images with the same classes (train split used to train, test split as reference)."""
    epochs: int = 3
    hflip: bool = False
    """Train the classifier with random horizontal flips. Use it when labels do not change under a mirror and the
    generator trained with flips (its images come in both orientations): a classifier that never saw a mirrored
    image also misreads mirrored REAL images (Fashion-MNIST: 84% on the test split, 70% on it mirrored), so without
    flips the check measures orientation, not whether an image carries its label. Both accuracies are reported."""
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


@dataclass(frozen=True)
class GenerateConfig:
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    classes: ClassesConfig = field(default_factory=lambda: ClassesConfig(from_data="data/fashion_mnist_public"))
    output: OutputConfig = field(default_factory=OutputConfig)
    check: CheckConfig = field(default_factory=CheckConfig)


def load_generate_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> GenerateConfig:
    return load_yaml_config(GenerateConfig, name, overrides, GENERATE_CONFIG_DIR)
