"""timm's model zoo at tiny width and depth, one member per architecture family, and the check each must pass: the
layer-wise engine's clipped sum equals the naive per-group loop for every trainable parameter, or its constructor
refuses and the generic functorch engine (the fallback of performance.engine=auto) equals it instead.

Trainable: all parameters, or the last stage / block + everything after it (final norm, head). BatchNorm stays frozen
(eval statistics, affine not trained), as `models.make_dp_model(norm="freeze")` leaves it; ResNet-GN is ResNet with
its BatchNorms replaced by GroupNorm (`norm="groupnorm"`). Used by tests/test_zoo.py and benchmarks/zoo_coverage.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import timm
import torch
from torch import nn
from torch.func import functional_call

from dpmix_dist.models import DPModel, make_dp_model
from dpmix_dist.privacy.clipping import clipped_sum, per_example_grads
from dpmix_dist.testing.exactness import assert_close, exact_or_refused

NUM_CLASSES = 5
NUM_GROUPS = 4
LAYERWISE = "layerwise"


def resnetv2_bit(**kwargs):
    """A tiny BiT ResNetV2: StdConv2d (weight standardised in forward) and GroupNormAct (norm, then activation)."""
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(
        layers=(1, 1, 1, 1),
        channels=(16, 32, 64, 128),
        stem_chs=16,
        stem_type="fixed",
        conv_layer=partial(StdConv2d, eps=1e-8),
        norm_layer=partial(GroupNormAct, num_groups=8),
        **kwargs,
    )


resnetv2_bit.model = "ResNetV2 (BiT: StdConv2d, GroupNormAct)"


def _vit_kwargs(**extra) -> dict:
    return {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, **extra}


def _poolformer(**kwargs) -> nn.Module:  # poolformer_s12's settings (GroupNorm1, layer scale), one block a stage
    from timm.layers import GroupNorm1
    from timm.models.metaformer import MetaFormer

    return MetaFormer(
        depths=(1, 1, 1, 1),
        dims=(16, 16, 32, 32),
        downsample_norm=None,
        mlp_act=nn.GELU,
        mlp_bias=True,
        norm_layers=GroupNorm1,
        layer_scale_init_values=0.5,
        res_scale_init_values=None,
        use_mlp_head=False,
        **kwargs,
    )


_poolformer.model = "MetaFormer (poolformer_s12 settings)"


def _regnet_cfg():
    from timm.models.regnet import RegNetCfg

    return RegNetCfg(depth=4, w0=8, wa=32.0, wm=2.0, group_size=8, stem_width=8)


def _create(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)

    build.model = name
    return build


def _build(cls_path: str, *args, **kwargs) -> Callable[[], nn.Module]:
    """A model class built directly (its registered variants fix the sizes this test shrinks)."""

    module, name = cls_path.rsplit(".", 1)

    def build():
        return getattr(__import__(module, fromlist=[name]), name)(*args, num_classes=NUM_CLASSES, **kwargs)

    build.model = name
    return build


@dataclasses.dataclass(frozen=True)
class Family:
    """A tiny member of one architecture family. Layer scales start at 0.5, not timm's 1e-5: the check must see the
    gradients of the layers they scale."""

    build: Callable[[], nn.Module]
    expected: tuple[str, str]  # (trainable all, trainable last): "layerwise" or the class that forces the fallback
    norm: str = "freeze"
    image_size: int = 32


# fmt: off
FAMILIES: dict[str, Family] = {
    "ViT": Family(_create("test_vit", img_size=32, depth=2, init_values=0.1), (LAYERWISE, LAYERWISE)),
    "DeiT (distilled)": Family(_create("deit_tiny_distilled_patch16_224", **_vit_kwargs()),
                               ("VisionTransformerDistilled", LAYERWISE)),
    "DeiT3": Family(_create("deit3_small_patch16_224", **_vit_kwargs(init_values=0.5)), (LAYERWISE, LAYERWISE)),
    "FlexiViT": Family(_create("flexivit_small", **_vit_kwargs()), (LAYERWISE, LAYERWISE)),
    "BEiT": Family(_create("beit_base_patch16_224", **_vit_kwargs(init_values=0.5)), ("Beit", "Block")),
    "EVA-02": Family(_create("eva02_tiny_patch14_224", **_vit_kwargs(init_values=0.5)), ("Eva", "EvaBlock")),
    "CaiT": Family(_create("cait_xxs24_224", **_vit_kwargs(depth=1, depth_token_only=1, init_values=0.5)),
                   ("Cait", "LayerScaleBlock")),
    "XCiT": Family(_create("xcit_nano_12_p16_224", img_size=32, embed_dim=32, depth=1, num_heads=2, cls_attn_layers=1),
                   ("Xcit", "XCABlock")),
    "Swin": Family(_create("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=4, embed_dim=16,
                           depths=(1, 1), num_heads=(1, 2)), ("WindowAttention", "WindowAttention")),
    "NesT": Family(_build("timm.models.nest.Nest", img_size=32, patch_size=4, embed_dims=(16, 32, 32),
                          num_heads=(1, 1, 2), depths=(1, 1, 1)), ("NestLevel", "NestLevel")),
    "CoaT-Lite": Family(_create("coat_lite_tiny", img_size=32, embed_dims=(16, 16, 32, 32), serial_depths=(1, 1, 1, 1),
                                num_heads=1, crpe_window={3: 1}), ("CoaT", LAYERWISE)),
    "MaxViT": Family(_create("test_maxvit", img_size=64, embed_dim=(32,) * 4, stem_width=(8, 16),
                             transformer_dim_head=16, transformer_window_size=(2, 2), transformer_grid_size=(2, 2)),
                     ("RelPosBias", "RelPosBias"), image_size=64),
    "CoAtNet": Family(_create("test_coatnet", img_size=32, embed_dim=(32,) * 4, stem_width=(8, 16),
                              transformer_dim_head=16), ("RelPosBias", "RelPosBias")),
    "MLP-Mixer": Family(_build("timm.models.mlp_mixer.MlpMixer", img_size=32, patch_size=8, num_blocks=2, embed_dim=32),
                        (LAYERWISE, LAYERWISE)),
    "PoolFormer": Family(_poolformer, (LAYERWISE, LAYERWISE)),
    "ConvMixer": Family(_build("timm.models.convmixer.ConvMixer", dim=32, depth=2, kernel_size=3, patch_size=4),
                        (LAYERWISE, LAYERWISE)),
    "ConvNeXt": Family(_create("test_convnext", ls_init_value=0.5), (LAYERWISE, LAYERWISE)),
    "ConvNeXt-V2": Family(_create("convnextv2_atto", depths=(1, 1, 1, 1), dims=(16, 16, 32, 32)),
                          ("GlobalResponseNorm", "GlobalResponseNorm")),
    "EdgeNeXt": Family(_create("edgenext_xx_small", depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), heads=(1, 1, 1, 1),
                               ls_init_value=0.5),
                       ("ConvBlock", "SplitTransposeBlock")),
    "ResNet": Family(_create("test_resnet"), (LAYERWISE, LAYERWISE)),
    "ResNet-GN": Family(_create("test_resnet"), (LAYERWISE, LAYERWISE), norm="groupnorm"),
    "ResNetV2": Family(_create("resnetv2_50", layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_chs=16),
                       (LAYERWISE, LAYERWISE)),
    "ResNetV2-BiT": Family(resnetv2_bit, ("StdConv2d", "StdConv2d")),
    "RegNet": Family(_build("timm.models.regnet.RegNet", _regnet_cfg()), (LAYERWISE, LAYERWISE)),
    "ByobNet": Family(_create("test_byobnet"), (LAYERWISE, LAYERWISE)),
    "NFNet": Family(_create("test_nfnet"), ("ScaledStdConv2d", "ScaledStdConv2d")),
    "EfficientNet": Family(_create("test_efficientnet"), (LAYERWISE, LAYERWISE)),
    "EfficientNet-GN": Family(_create("test_efficientnet_gn"), (LAYERWISE, LAYERWISE)),
    "EfficientNet-LN": Family(_create("test_efficientnet_ln"), (LAYERWISE, LAYERWISE)),
    "MobileNetV3": Family(_create("mobilenetv3_small_050"), (LAYERWISE, LAYERWISE)),
    "MambaOut": Family(_create("test_mambaout", ls_init_value=0.5), (LAYERWISE, LAYERWISE)),
}
# Where the fallback itself is wrong (found by this test; not the layer-wise engine's doing).
KNOWN_BAD_FALLBACK = {
    "XCiT": "torch 2.14.1 vmap(grad): an eval-mode BatchNorm followed by a transpose gives wrong input gradients "
            "(XCiT's patch embedding), so functorch's per-group gradients for the layers below it are wrong",
}
# fmt: on


def _classifier_params(model: nn.Module) -> list[nn.Parameter]:
    heads = model.get_classifier()  # DeiT (distilled): (head, head_dist)
    return [p for head in (heads if isinstance(heads, tuple) else (heads,)) for p in head.parameters()]


def last_blocks(model: nn.Module) -> set[str]:
    """The last stage / block with parameters (timm's feature_info) and every parameter registered after it, and
    the classifier."""
    names = [name for name, _ in model.named_parameters()]
    for info in reversed(model.feature_info):
        starts = [i for i, name in enumerate(names) if name.startswith(info["module"] + ".")]
        if starts:
            break
    head = {id(p) for p in _classifier_params(model)}
    return set(names[starts[0] :]) | {name for name, p in model.named_parameters() if id(p) in head}


def build(name: str, trainable: str) -> DPModel:
    """The family's tiny model, DP-ready (BatchNorm frozen or replaced), with all or the last blocks trainable."""
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = family.build()
    with torch.no_grad():  # random (not zero) classifier: every layer gets a gradient
        for p in _classifier_params(model):
            p.normal_(0, 0.5)
    dp = make_dp_model(model, norm=family.norm, groupnorm_groups=4, trainable="all")
    if trainable == "last":
        keep = {f"model.{n}" for n in last_blocks(model)}
        for n, p in dp.tail_module.named_parameters():
            p.requires_grad_(n in keep and n in dp.trainable_names)
        dp = dataclasses.replace(dp, trainable_names=[n for n in dp.trainable_names if n in keep])
    return dp


class FunctorchMismatch(AssertionError):
    """The fallback engine disagreed with the naive loop (the layer-wise engine had refused)."""


def check(name: str, trainable: str, num_views: int) -> tuple[str, ...]:
    """Engine == naive loop, or refusal in the constructor and then functorch == naive loop. Returns the classes the
    engine refused (none: it ran layer-wise)."""
    dp = build(name, trainable)
    size = FAMILIES[name].image_size
    gen = torch.Generator().manual_seed(11)
    inputs = torch.randn(NUM_GROUPS, num_views, 3, size, size, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (NUM_GROUPS, num_views), generator=gen)
    params = dp.trainable_params()
    exc, expected, max_norm = exact_or_refused(dp.tail_module, params, inputs, targets)
    if exc is None:
        return ()
    detached = {n: p.detach() for n, p in params.items()}
    grads, _ = per_example_grads(lambda p, x: functional_call(dp.tail_module, p, (x,)), detached, inputs, targets)
    got = clipped_sum(grads, max_norm)
    scale = max(float(g.abs().max()) for g in expected.values())
    try:
        for n in expected:
            assert_close(got[n], expected[n], f"functorch fallback: {n}", scale)
    except AssertionError as mismatch:
        raise FunctorchMismatch(str(mismatch)) from None
    return exc.layers
