"""The layer-wise engine (ghost norm + book-keeping) equals the naive per-group loop for every trainable parameter."""

from __future__ import annotations

import math
from importlib import import_module

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import NUM_CLASSES, tiny_dp_model
from torch import nn

from dpmix_dist.models import make_dp_model
from dpmix_dist.privacy import layerwise
from dpmix_dist.privacy.layerwise import LayerwiseClipper, UnsupportedLayer
from dpmix_dist.testing.exactness import assert_close, exact_or_refused
from dpmix_dist.testing.reference import naive_clipped_sum, naive_group_grads
from dpmix_dist.testing.zoo import resnetv2_bit


def _tail_batch(dp, num_groups, num_views, seed):
    """(num_groups, num_views) random 32 px images run through the frozen prefix, and random class ids."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        feats = dp.cut.prefix(torch.randn(num_groups * num_views, 3, 32, 32, generator=gen))
    targets = torch.randint(0, NUM_CLASSES, (num_groups, num_views), generator=gen)
    return feats.view(num_groups, num_views, *feats.shape[1:]), targets


@pytest.mark.parametrize(
    "kind",
    [
        "vit_last",
        "resnet_gn",
        "efficientnet",
        "tf_effnet_lite0_tail",
        "convnext_head",
        "convnext_all",
        "convnext_conv_mlp",
    ],
)
@pytest.mark.parametrize("num_views", [1, 4])
def test_layerwise_clipped_sum_matches_naive(kind, num_views):
    dp = tiny_dp_model(kind)
    inputs, targets = _tail_batch(dp, 5, num_views, seed=3)
    engine = LayerwiseClipper(dp.tail_module, dp.trainable_params())
    grads, norms = naive_group_grads(dp.cut.tail, dp.trainable_params(), inputs, targets)
    max_norm = float(norms.median())  # some groups clipped, some not
    expected = naive_clipped_sum(grads, norms, max_norm)
    got, losses = engine.clipped_sum(inputs, targets, max_norm)
    assert list(got) == list(expected)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5, rtol=1e-4), name
        assert expected[name].abs().sum() > 0, name
    assert not any(p.grad is not None for p in dp.trainable_params().values())  # no autograd parameter grads
    assert losses.shape == (5,)


@pytest.mark.parametrize(
    ("kind", "refused"),
    [
        ("efficientnet_gn_last", None),
        ("efficientnet_ln", None),
        ("resnetv2_bit", "StdConv2d"),
        ("nfnet", "ScaledStdConv2d"),
    ],
)
def test_timm_subclasses_are_exact_or_refused_in_the_constructor(kind, refused):
    """timm subclasses of Conv2d / GroupNorm / LayerNorm whose forward is not the base class's: GroupNormAct and
    LayerNormAct2d apply an activation after the norm, StdConv2d / ScaledStdConv2d standardise the weight."""
    torch.manual_seed(0)
    if kind == "efficientnet_gn_last":  # GroupNormAct in the last block
        dp = make_dp_model(timm.create_model("test_efficientnet_gn", num_classes=NUM_CLASSES), trainable="last_blocks")
    elif kind == "efficientnet_ln":  # LayerNormAct2d
        dp = make_dp_model(timm.create_model("test_efficientnet_ln", num_classes=NUM_CLASSES), trainable="all")
    elif kind == "resnetv2_bit":
        dp = make_dp_model(resnetv2_bit(num_classes=NUM_CLASSES), trainable="all")
    else:  # ScaledStdConv2d
        dp = make_dp_model(timm.create_model("test_nfnet", num_classes=NUM_CLASSES), trainable="all")
    with torch.no_grad():
        dp.model.get_classifier().weight.normal_(0, 0.5)
    inputs, targets = _tail_batch(dp, 4, 2, seed=8)
    exc, _, _ = exact_or_refused(dp.tail_module, dp.trainable_params(), inputs, targets)
    assert (exc and exc.layers[0]) == refused, exc


class _Probe(nn.Module):
    """One layer of 8 channels between the input and a pooled linear head; tokens (n, T, 8) or images (n, 8, H, W)."""

    def __init__(self, layer: nn.Module, tokens: bool) -> None:
        super().__init__()
        self.layer, self.tokens = layer, tokens
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        y = self.layer(x)
        return self.head(y.mean(1) if self.tokens else y.mean((2, 3)))


class _Doubled(nn.Linear):
    """A subclass whose forward is not its base class's: accepted by an isinstance check, and then wrong."""

    def forward(self, x):
        return 2 * super().forward(x)


def _layer(name: str) -> tuple[nn.Module, bool]:
    """(layer, takes tokens) for a class name; timm classes with a non-trivial activation where they take one."""
    from importlib import import_module

    # by module path: timm.layers re-exports a function named conv2d_same over the module of that name
    conv2d_same, layer_scale, timm_linear, norm, norm_act, std_conv, metaformer = (
        import_module(f"timm.{m}")
        for m in (
            "layers.conv2d_same",
            "layers.layer_scale",
            "layers.linear",
            "layers.norm",
            "layers.norm_act",
            "layers.std_conv",
            "models.metaformer",
        )
    )

    act = dict(act_layer=nn.GELU)  # inplace or not, B must be taken before it
    layers = {
        "Linear": (nn.Linear(8, 8), True),
        "timm.Linear": (timm_linear.Linear(8, 8), True),
        "Conv2d": (nn.Conv2d(8, 8, 3, padding=1), False),
        "Conv2d_same_reflect": (nn.Conv2d(8, 8, 4, padding="same", padding_mode="reflect"), False),  # even kernel
        "Conv2d_same": (nn.Conv2d(8, 8, (2, 3), padding="same", dilation=2), False),
        "Conv2dSame": (conv2d_same.Conv2dSame(8, 8, 3, stride=2), False),
        "LayerNorm": (nn.LayerNorm(8), True),
        "timm.LayerNorm": (norm.LayerNorm(8), True),
        "LayerNormFp32": (norm.LayerNormFp32(8), True),
        "LayerNorm2d": (norm.LayerNorm2d(8), False),
        "LayerNorm2dFp32": (norm.LayerNorm2dFp32(8), False),
        "GroupNorm": (nn.GroupNorm(2, 8), False),
        "timm.GroupNorm": (norm.GroupNorm(8, num_groups=2), False),
        "GroupNorm1": (norm.GroupNorm1(8), False),
        "LayerNormNoBias": (metaformer.LayerNormNoBias(8), True),
        "LayerNorm2dNoBias": (metaformer.LayerNorm2dNoBias(8), False),
        "GroupNorm1NoBias": (metaformer.GroupNorm1NoBias(8), False),
        "LayerNormAct": (norm_act.LayerNormAct(8, **act), True),
        "LayerNormActFp32": (norm_act.LayerNormActFp32(8, **act), True),
        "LayerNormAct2d": (norm_act.LayerNormAct2d(8, **act), False),
        "LayerNormAct2dFp32": (norm_act.LayerNormAct2dFp32(8, **act), False),
        "GroupNormAct": (norm_act.GroupNormAct(8, num_groups=2, act_layer="silu", inplace=True), False),
        "GroupNorm1Act": (norm_act.GroupNorm1Act(8, **act), False),
        "LayerScale": (layer_scale.LayerScale(8, init_values=0.5), True),
        "LayerScale2d": (layer_scale.LayerScale2d(8, init_values=0.5), False),
        "Scale": (metaformer.Scale(8, init_value=0.5, use_nchw=False), True),
        "Scale_nchw": (metaformer.Scale(8, init_value=0.5, use_nchw=True), False),
        # refused: weight standardised in forward, padding cached from the first input, other norms, a trainable
        # BatchNorm (per-example in eval, but the toolkit never trains BN affine), a subclass
        "StdConv2d": (std_conv.StdConv2d(8, 8, 3), False),
        "StdConv2dSame": (std_conv.StdConv2dSame(8, 8, 3), False),
        "ScaledStdConv2d": (std_conv.ScaledStdConv2d(8, 8, 3), False),
        "ScaledStdConv2dSame": (std_conv.ScaledStdConv2dSame(8, 8, 3), False),
        "Conv2dSameExport": (conv2d_same.Conv2dSameExport(8, 8, 3, stride=2), False),
        "LayerNormExp2d": (norm.LayerNormExp2d(8), False),
        "RmsNorm": (norm.RmsNorm(8), True),
        "BatchNormAct2d": (norm_act.BatchNormAct2d(8, **act), False),
        "_Doubled": (_Doubled(8, 8), True),
    }
    return layers[name]


_REFUSED = [
    "StdConv2d",
    "StdConv2dSame",
    "ScaledStdConv2d",
    "ScaledStdConv2dSame",
    "Conv2dSameExport",
    "LayerNormExp2d",
    "RmsNorm",
    "BatchNormAct2d",
    "_Doubled",
]


@pytest.mark.parametrize(
    "name",
    [
        "Linear",
        "timm.Linear",
        "Conv2d",
        "Conv2d_same_reflect",
        "Conv2d_same",
        "Conv2dSame",
        "LayerNorm",
        "timm.LayerNorm",
        "LayerNormFp32",
        "LayerNorm2d",
        "LayerNorm2dFp32",
        "GroupNorm",
        "timm.GroupNorm",
        "GroupNorm1",
        "LayerNormNoBias",
        "LayerNorm2dNoBias",
        "GroupNorm1NoBias",
        "LayerNormAct",
        "LayerNormActFp32",
        "LayerNormAct2d",
        "LayerNormAct2dFp32",
        "GroupNormAct",
        "GroupNorm1Act",
        "LayerScale",
        "LayerScale2d",
        "Scale",
        "Scale_nchw",
        *_REFUSED,
    ],
)
def test_each_registered_class_is_exact_and_any_other_is_refused(name):
    torch.manual_seed(0)
    layer, tokens = _layer(name)
    model = _Probe(layer, tokens).eval()
    with torch.no_grad():
        for p in layer.parameters():  # away from the init (ones / zeros) so that every coordinate matters
            p.add_(0.3 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(9)
    shape = (7, 8) if tokens else (8, 7, 7)
    inputs = torch.randn(4, 2, *shape, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (4, 2), generator=gen)
    exc, _, _ = exact_or_refused(model, dict(model.named_parameters()), inputs, targets)
    if name in _REFUSED:
        assert exc is not None and exc.layers == (name,) and "performance.engine=auto" in str(exc)
    else:
        assert exc is None, exc


class _Forwards(nn.Module):
    """Forwards that only running them can judge: a layer run twice, bypassed, or followed by in-place writes."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(6, 6)
        if kind == "permuted_output_overwritten":
            self.norm2d = import_module("timm.layers.norm").LayerNorm2d(6)
        self.head = nn.Linear(6, NUM_CLASSES)

    def forward(self, x):
        if self.kind == "twice":
            h = self.lin(self.lin(x))
        elif self.kind == "bypassed":
            h = F.linear(x, self.lin.weight, self.lin.bias)
        elif self.kind == "input_overwritten":
            x = x.clone()
            h = self.lin(x)
            x.mul_(2.0)  # the input A the engine read is no longer what the layer saw
            h = h + x
        elif self.kind == "reshape_output_overwritten":
            h = self.lin(x)  # on (n, T, d) F.linear returns a view: a reshape of a 2-D matmul's output, where B is read
            h.mul_(3.0)
        elif self.kind == "permuted_output_overwritten":
            h = self.norm2d(x.unsqueeze(-1).transpose(1, 2))  # LayerNorm2d returns a permuted view of its result
            h.mul_(3.0)  # ... which no gradient edge follows through an in-place op
            h = h.squeeze(-1).transpose(1, 2)
        else:  # output_overwritten: in-place ops on the layer's (non-view) output; B is read before them
            h = self.lin(x.mean(1))
            h.mul_(3.0)
            return self.head(torch.relu_(h))
        return self.head(h.mean(1))


@pytest.mark.parametrize(
    "kind",
    [
        "twice",
        "bypassed",
        "input_overwritten",
        "permuted_output_overwritten",
        "reshape_output_overwritten",
        "output_overwritten",
    ],
)
def test_what_only_a_forward_shows_is_refused_or_exact(kind):
    torch.manual_seed(0)
    model = _Forwards(kind)
    gen = torch.Generator().manual_seed(10)
    inputs, targets = torch.randn(4, 2, 5, 6, generator=gen), torch.randint(0, NUM_CLASSES, (4, 2), generator=gen)
    params = dict(model.named_parameters())
    if kind in ("output_overwritten", "reshape_output_overwritten"):  # exact, although overwritten in place
        assert exact_or_refused(model, params, inputs, targets)[0] is None
        return
    engine = LayerwiseClipper(model, params)  # the constructor cannot see it without running the model...
    with pytest.raises(UnsupportedLayer, match="runs twice|did not run|overwritten"):
        engine.clipped_sum(inputs, targets, 1.0)
    with pytest.raises(UnsupportedLayer, match="runs twice|did not run|overwritten"):  # ...given an example, it does
        LayerwiseClipper(model, params, example=inputs[:, 0])


def test_shared_modules_are_refused():
    lin = nn.Linear(6, 6)
    model = nn.Sequential(lin, nn.GELU(), lin)
    with pytest.raises(UnsupportedLayer, match="shared"):
        LayerwiseClipper(model, dict(model.named_parameters()))


def test_both_ghost_and_direct_paths_are_exercised():
    dp = tiny_dp_model("vit_last")
    engine = LayerwiseClipper(dp.tail_module, dp.trainable_params())
    with torch.no_grad():
        feats = dp.cut.prefix(torch.randn(2, 3, 32, 32))
    engine.clipped_sum(feats.view(2, 1, *feats.shape[1:]), torch.zeros(2, 1, dtype=torch.long), 1.0)
    ghost = {type(layer.module).__name__ for layer in engine._layers if layer.ghost}
    direct = {type(layer.module).__name__ for layer in engine._layers if not layer.ghost}
    assert "Linear" in ghost and direct


def test_unsupported_layers_are_refused():
    model = timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=32, dynamic_img_size=True)
    dp = make_dp_model(model, trainable="all")
    engine = LayerwiseClipper(dp.tail_module, dp.trainable_params())
    big = torch.randn(2, 1, 3, 64, 64)  # 64 px input: pos_embed resampled from the 32 px grid
    with pytest.raises(UnsupportedLayer, match="pos_embed made for"):
        engine.clipped_sum(big, torch.zeros(2, 1, dtype=torch.long), 1.0)
    with pytest.raises(UnsupportedLayer, match="pos_embed made for"):  # given an example, the constructor sees it
        LayerwiseClipper(dp.tail_module, dp.trainable_params(), example=big[:, 0])
    emb = nn.Embedding(4, 3, scale_grad_by_freq=True)
    with pytest.raises(UnsupportedLayer, match="Embedding"):
        LayerwiseClipper(emb, dict(emb.named_parameters()))
    bn = nn.BatchNorm1d(3)  # a trainable BatchNorm mixes examples: no per-example gradient exists
    with pytest.raises(UnsupportedLayer, match="BatchNorm1d"):
        LayerwiseClipper(bn, dict(bn.named_parameters()))


@pytest.mark.parametrize("variant", [{}, {"no_embed_class": True, "reg_tokens": 2}])
@pytest.mark.parametrize("num_views", [1, 4])
def test_vit_fully_trainable_with_cls_pos_and_reg_tokens(variant, num_views):
    dp = tiny_dp_model("vit", **variant)
    assert {"model.cls_token", "model.pos_embed"} <= set(dp.trainable_names)
    gen = torch.Generator().manual_seed(4)
    inputs = torch.randn(4, num_views, 3, 32, 32, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (4, num_views), generator=gen)
    engine = LayerwiseClipper(dp.tail_module, dp.trainable_params())
    expected = naive_clipped_sum(*naive_group_grads(dp.cut.tail, dp.trainable_params(), inputs, targets), 0.5)
    got, _ = engine.clipped_sum(inputs, targets, 0.5)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5, rtol=1e-4), name


def test_bf16_autocast_keeps_fp32_sums_close_to_fp32():
    dp = tiny_dp_model("efficientnet")
    gen = torch.Generator().manual_seed(5)
    inputs = torch.randn(6, 2, 3, 32, 32, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (6, 2), generator=gen)
    engine = LayerwiseClipper(dp.tail_module, dp.trainable_params())
    full, _ = engine.clipped_sum(inputs, targets, 0.5)
    half, _ = engine.clipped_sum(inputs, targets, 0.5, autocast_dtype=torch.bfloat16)
    total_full = torch.cat([v.flatten() for v in full.values()])
    total_half = torch.cat([v.flatten() for v in half.values()])
    assert all(v.dtype == torch.float32 for v in half.values())
    assert not torch.equal(total_full, total_half)  # bf16 really ran
    assert (total_half - total_full).norm() / total_full.norm() < 0.05


class _TokenModel(nn.Module):
    """Embedding (with a padding row) -> mean over tokens -> LayerNorm -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, NUM_CLASSES)

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids).mean(1)))


@pytest.mark.parametrize("num_views", [1, 4])
def test_embedding_matches_naive(num_views):
    torch.manual_seed(0)
    model = _TokenModel()
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 12, (5, num_views, 7), generator=gen)  # repeated ids and padding (0) included
    targets = torch.randint(0, NUM_CLASSES, (5, num_views), generator=gen)
    grads, norms = naive_group_grads(model, params, ids, targets)
    max_norm = float(norms.median())
    expected = naive_clipped_sum(grads, norms, max_norm)
    got, _ = LayerwiseClipper(model, params).clipped_sum(ids, targets, max_norm)
    for name in params:
        assert torch.allclose(got[name], expected[name], atol=1e-5, rtol=1e-4), name
    assert got["emb.weight"][0].abs().sum() == 0  # padding row untouched


@pytest.mark.parametrize("kind", ["vit_last", "efficientnet"])
def test_each_example_contributes_alone_and_at_most_c(kind):
    """Sensitivity in the batched engine: S(all) - S(all but j) == S(j alone), with norm <= C, for every j."""
    dp = tiny_dp_model(kind)
    inputs, targets = _tail_batch(dp, 6, 2, seed=7)
    engine = LayerwiseClipper(dp.tail_module, dp.trainable_params())
    c = 0.05  # small: every example is clipped

    def flat(summed):
        return torch.cat([v.flatten() for v in summed.values()])

    total = flat(engine.clipped_sum(inputs, targets, c)[0])
    for j in range(6):
        keep = [i for i in range(6) if i != j]
        without = flat(engine.clipped_sum(inputs[keep], targets[keep], c)[0])
        alone = flat(engine.clipped_sum(inputs[j : j + 1], targets[j : j + 1], c)[0])
        assert torch.allclose(total - without, alone, atol=1e-6)
        assert alone.norm() <= c * (1 + 1e-5)
        assert alone.norm() >= c * 0.99  # it was clipped, so the bound is tight: the test can see a leak


# ---------------------------------------------------------------------------------------------- every path, forced

_FORCED = {  # (direct-over-ghost memory factor, least output positions for the per-group conv kernel)
    "ghost": (0.0, 10**9),
    "direct_unfold": (math.inf, 10**9),
    "direct_kernel": (math.inf, 0),
}


def _force(monkeypatch, path: str) -> list[int]:
    """Make the engine take `path` for every weight it may (grouped convs are always direct); returns a list that
    counts the calls of the convolution weight-gradient kernel, so that a test can see which conv path ran."""
    slack, positions = _FORCED[path]
    monkeypatch.setattr(layerwise, "_DIRECT_OVER_GHOST_MEMORY", slack)
    monkeypatch.setattr(layerwise, "_CONV_LOOP_MIN_POSITIONS", positions)
    calls, kernel = [], torch.nn.grad.conv2d_weight

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", counted)
    return calls


def _engine_matches_naive(model, params, inputs, targets) -> LayerwiseClipper:
    grads, norms = naive_group_grads(model, params, inputs, targets)
    max_norm = float(norms.median())  # some groups clipped, some not
    expected = naive_clipped_sum(grads, norms, max_norm)
    engine = LayerwiseClipper(model, params)
    got, _ = engine.clipped_sum(inputs, targets, max_norm)
    scale = max(float(g.abs().max()) for g in expected.values())
    for name in expected:
        assert_close(got[name], expected[name], name, scale)
    return engine


_CONVS = {
    "3x3": dict(kernel_size=3, padding=1),
    "3x3_stride2_dilation2": dict(kernel_size=3, stride=2, padding=2, dilation=2),
    "2x3_same_reflect": dict(kernel_size=(2, 3), padding="same", padding_mode="reflect"),
    "1x1": dict(kernel_size=1),
    "1x1_stride2": dict(kernel_size=1, stride=2),
    "1x1_padded": dict(kernel_size=1, padding=1),
    "3x3_stride3_patches": dict(kernel_size=3, stride=3),  # a patch embedding: disjoint windows that tile the input
    "4x4_stride4_ragged": dict(kernel_size=4, stride=4),  # 9 px: the last row and column are read by no window
    "2x3_stride_3x4_gaps": dict(kernel_size=(2, 3), stride=(3, 4)),  # windows with pixels between them
    "3x3_groups2": dict(kernel_size=3, padding=1, groups=2),
    "3x3_depthwise": dict(kernel_size=3, padding=1, groups=8),  # one kernel offset at a time (81 positions > 9)
    "3x3_depthwise_stride2_dilation2": dict(kernel_size=3, stride=2, padding=2, dilation=2, groups=8),
    "5x5_depthwise_stride3": dict(kernel_size=5, stride=3, padding=2, groups=8),  # 9 positions < 25 offsets
    "2x3_depthwise_same_reflect": dict(kernel_size=(2, 3), padding="same", padding_mode="reflect", groups=8),
    "Conv2dSame_stride2": None,
}


@pytest.mark.parametrize("path", list(_FORCED))
@pytest.mark.parametrize("conv", list(_CONVS))
@pytest.mark.parametrize("num_views", [1, 3])
def test_every_conv_path_matches_naive(monkeypatch, path, conv, num_views):
    """Ghost norm (Gram of unfolded patches; clipped sum by the weight-gradient kernel from the raw input), direct by
    unfolded patches (1×1: strided pixels) or by the weight-gradient kernel once per group, with K > 1 members."""
    calls = _force(monkeypatch, path)
    torch.manual_seed(0)
    if _CONVS[conv] is None:
        layer = import_module("timm.layers.conv2d_same").Conv2dSame(8, 8, 3, stride=2)
    else:
        layer = nn.Conv2d(8, 8, **_CONVS[conv])
    model = _Probe(layer, tokens=False).eval()
    gen = torch.Generator().manual_seed(11)
    inputs = torch.randn(4, num_views, 8, 9, 9, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (4, num_views), generator=gen)
    engine = _engine_matches_naive(model, dict(model.named_parameters()), inputs, targets)
    grouped = layer.groups > 1
    assert engine._layers[0].ghost == (path == "ghost" and not grouped)
    expected_calls = {"ghost": 1, "direct_unfold": 0, "direct_kernel": 4}[path]
    disjoint = (_CONVS[conv] or {}).get("padding", 0) == 0 and "dilation" not in (_CONVS[conv] or {})
    disjoint = disjoint and all(s >= k for s, k in zip(layer.stride, layer.kernel_size))
    if grouped or disjoint:
        expected_calls = 0  # grouped: per-offset products or einsum; disjoint windows (1x1, patches): a strided view
    assert len(calls) == expected_calls


@pytest.mark.parametrize("path", ["ghost", "direct_unfold"])
@pytest.mark.parametrize("kind", ["vit", "resnet_gn"])
@pytest.mark.parametrize("num_views", [1, 3])
def test_forced_paths_on_whole_models(monkeypatch, path, kind, num_views):
    """Every weight of a fully trainable tiny ViT (Linear on 3-D tokens, cls/pos, LayerScale, LayerNorm) or ResNet-GN
    (strided, padded and 1×1 convs, GroupNorm, in-place residual adds) through one path, K = 1 and K = 3."""
    _force(monkeypatch, path)
    dp = tiny_dp_model(kind)
    gen = torch.Generator().manual_seed(12)
    inputs = torch.randn(3, num_views, 3, 32, 32, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (3, num_views), generator=gen)
    engine = _engine_matches_naive(dp.tail_module, dp.trainable_params(), inputs, targets)
    weighted = [layer for layer in engine._layers if layer.rule.kind in ("linear", "conv")]
    assert weighted and all(layer.ghost == (path == "ghost") for layer in weighted)


class _Branches(nn.Module):
    """Two first layers on parallel branches (two gradient edges autograd is asked for), and a layer that runs but
    that the loss ignores (its gradient is zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right, self.ignored = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(12, NUM_CLASSES)

    def forward(self, x):
        self.ignored(x)
        return self.head(torch.cat([self.left(x), torch.tanh(self.right(x))], -1).mean(1))


@pytest.mark.parametrize("path", ["ghost", "direct_unfold"])
def test_parallel_first_layers_and_an_ignored_output(monkeypatch, path):
    _force(monkeypatch, path)
    torch.manual_seed(0)
    model = _Branches()
    used = {n: p for n, p in model.named_parameters() if not n.startswith("ignored")}
    gen = torch.Generator().manual_seed(13)
    inputs, targets = torch.randn(4, 2, 5, 6, generator=gen), torch.randint(0, NUM_CLASSES, (4, 2), generator=gen)
    grads, norms = naive_group_grads(model, used, inputs, targets)
    expected = naive_clipped_sum(grads, norms, float(norms.median()))
    got, _ = LayerwiseClipper(model, dict(model.named_parameters())).clipped_sum(inputs, targets, float(norms.median()))
    for name in expected:
        assert_close(got[name], expected[name], name, 1.0)
    assert all(got[n].abs().sum() == 0 for n in got if n.startswith("ignored"))
