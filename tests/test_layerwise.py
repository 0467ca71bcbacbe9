"""The layer-wise engine (ghost norm + book-keeping) equals the naive per-group loop for every trainable parameter."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from dpmix_dist.models import make_dp_model
from dpmix_dist.privacy.clipping import group_loss
from dpmix_dist.privacy.layerwise import LayerwiseClipper, UnsupportedLayer

NUM_CLASSES = 5


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "vit_last":  # LayerNorm, Linear (qkv, proj, mlp), LayerScale, head
        model = timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=32, init_values=0.1)
        return make_dp_model(model, trainable="last_blocks", num_trainable_blocks=2)
    if kind == "resnet_gn":  # Conv2d, GroupNorm
        model = timm.create_model("test_resnet", num_classes=NUM_CLASSES)
        return make_dp_model(model, norm="groupnorm", groupnorm_groups=4, trainable="all")
    if kind == "efficientnet":  # Conv2d incl. depthwise, frozen BN
        model = timm.create_model("test_efficientnet", num_classes=NUM_CLASSES)
        return make_dp_model(model, norm="freeze", trainable="all")
    if kind == "tf_effnet_lite0_tail":  # Conv2dSame (TF 'same' padding, stride 2), depthwise, frozen BN
        model = timm.create_model("tf_efficientnet_lite0", num_classes=NUM_CLASSES)
        return make_dp_model(model, trainable="last_blocks", num_trainable_blocks=5)
    if kind == "convnext_head":  # LayerNorm2d-free head: norm + Linear
        model = timm.create_model("test_convnext", num_classes=NUM_CLASSES)
        return make_dp_model(model, trainable="head")
    if kind == "convnext_all":  # LayerNorm2d stem/downsample norms, depthwise 7x7, LayerNorm, Linear mlp, raw gamma
        model = timm.create_model("test_convnext", num_classes=NUM_CLASSES, ls_init_value=0.5)
        return make_dp_model(model, trainable="all")
    if kind == "convnext_conv_mlp":  # the conv-mlp variant: 1x1 Conv2d mlp, channels-first
        model = timm.create_model("test_convnext", num_classes=NUM_CLASSES, ls_init_value=0.5, conv_mlp=True)
        return make_dp_model(model, trainable="all")
    raise ValueError(kind)


def _naive(dp, inputs, targets, max_norm):
    params = dp.trainable_params()
    grads, norms = [], []
    for x, y in zip(inputs, targets):
        g = torch.autograd.grad(group_loss(dp.split.tail(x), y), list(params.values()))
        grads.append(g)
        norms.append(torch.sqrt(sum(t.pow(2).sum() for t in g)))
    norms = torch.stack(norms)
    factors = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    summed = {name: sum(f * g[i] for f, g in zip(factors, grads)) for i, name in enumerate(params)}
    return summed, norms


@pytest.mark.parametrize(
    "kind",
    ["vit_last", "resnet_gn", "efficientnet", "tf_effnet_lite0_tail", "convnext_head", "convnext_all", "convnext_conv_mlp"],
)
@pytest.mark.parametrize("num_views", [1, 4])
def test_layerwise_clipped_sum_matches_naive(kind, num_views):
    dp = _model(kind)
    with torch.no_grad():
        dp.model.get_classifier().weight.normal_(0, 0.5)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        feats = dp.split.prefix(torch.randn(5 * num_views, 3, 32, 32, generator=gen))
    inputs = feats.view(5, num_views, *feats.shape[1:])
    targets = torch.randint(0, NUM_CLASSES, (5, num_views), generator=gen)
    engine = LayerwiseClipper(dp.tail_module, dp.trainable_params())
    _, norms = _naive(dp, inputs, targets, 1.0)
    max_norm = float(norms.median())  # some groups clipped, some not
    expected, _ = _naive(dp, inputs, targets, max_norm)
    got, losses = engine.clipped_sum(inputs, targets, max_norm)
    assert list(got) == list(expected)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5, rtol=1e-4), name
        assert expected[name].abs().sum() > 0, name
    assert not any(p.grad is not None for p in dp.trainable_params().values())  # no autograd parameter grads
    assert losses.shape == (5,)


def test_both_ghost_and_direct_paths_are_exercised():
    dp = _model("vit_last")
    engine = LayerwiseClipper(dp.tail_module, dp.trainable_params())
    with torch.no_grad():
        feats = dp.split.prefix(torch.randn(2, 3, 32, 32))
    engine.clipped_sum(feats.view(2, 1, *feats.shape[1:]), torch.zeros(2, 1, dtype=torch.long), 1.0)
    ghost = {type(layer.module).__name__ for layer in engine._layers if layer.ghost}
    direct = {type(layer.module).__name__ for layer in engine._layers if not layer.ghost}
    assert "Linear" in ghost and direct


def test_unsupported_layers_are_refused():
    model = timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=32, dynamic_img_size=True)
    dp = make_dp_model(model, trainable="all")
    engine = LayerwiseClipper(dp.tail_module, dp.trainable_params())
    with pytest.raises(UnsupportedLayer, match="pos_embed made for"):  # 64 px input: resampled pos_embed
        engine.clipped_sum(torch.randn(2, 1, 3, 64, 64), torch.zeros(2, 1, dtype=torch.long), 1.0)
    emb = nn.Embedding(4, 3, scale_grad_by_freq=True)
    with pytest.raises(UnsupportedLayer, match="Embedding"):
        LayerwiseClipper(emb, dict(emb.named_parameters()))
    bn = nn.BatchNorm1d(3)  # a trainable BatchNorm mixes examples: no per-example gradient exists
    with pytest.raises(UnsupportedLayer, match="BatchNorm1d"):
        LayerwiseClipper(bn, dict(bn.named_parameters()))


@pytest.mark.parametrize("variant", [{}, {"no_embed_class": True, "reg_tokens": 2}])
@pytest.mark.parametrize("num_views", [1, 4])
def test_vit_fully_trainable_with_cls_pos_and_reg_tokens(variant, num_views):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=32, init_values=0.1, **variant)
    dp = make_dp_model(model, trainable="all")
    with torch.no_grad():
        dp.model.get_classifier().weight.normal_(0, 0.5)
    assert {"model.cls_token", "model.pos_embed"} <= set(dp.trainable_names)
    gen = torch.Generator().manual_seed(4)
    inputs = torch.randn(4, num_views, 3, 32, 32, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (4, num_views), generator=gen)
    engine = LayerwiseClipper(dp.tail_module, dp.trainable_params())
    expected, _ = _naive(dp, inputs, targets, 0.5)
    got, _ = engine.clipped_sum(inputs, targets, 0.5)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5, rtol=1e-4), name


def test_bf16_autocast_keeps_fp32_sums_close_to_fp32():
    dp = _model("efficientnet")
    with torch.no_grad():
        dp.model.get_classifier().weight.normal_(0, 0.5)
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
    grads, norms = [], []
    for x, y in zip(ids, targets):
        g = torch.autograd.grad(group_loss(model(x), y), list(params.values()))
        grads.append(g)
        norms.append(torch.sqrt(sum(t.pow(2).sum() for t in g)))
    max_norm = float(torch.stack(norms).median())
    factors = [min(1.0, max_norm / (float(n) + 1e-6)) for n in norms]
    got, _ = LayerwiseClipper(model, params).clipped_sum(ids, targets, max_norm)
    for i, name in enumerate(params):
        expected = sum(f * g[i] for f, g in zip(factors, grads))
        assert torch.allclose(got[name], expected, atol=1e-5, rtol=1e-4), name
    assert got["emb.weight"][0].abs().sum() == 0  # padding row untouched


@pytest.mark.parametrize("kind", ["vit_last", "efficientnet"])
def test_each_example_contributes_alone_and_at_most_c(kind):
    """Sensitivity in the batched engine: S(all) - S(all but j) == S(j alone), with norm <= C, for every j."""
    dp = _model(kind)
    with torch.no_grad():
        dp.model.get_classifier().weight.normal_(0, 0.5)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        feats = dp.split.prefix(torch.randn(6 * 2, 3, 32, 32, generator=gen))
    inputs = feats.view(6, 2, *feats.shape[1:])
    targets = torch.randint(0, NUM_CLASSES, (6, 2), generator=gen)
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
