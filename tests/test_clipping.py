"""Contract items 2-3: per-group gradients and flat clipping, against a naive loop (autograd on each group alone)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.func import functional_call

from dpmix_dist.models import make_dp_model
from dpmix_dist.privacy.clipping import clip_factors, clipped_sum, group_loss, per_example_grads, per_example_norms

NUM_CLASSES = 5


def _tiny(kind: str):
    """Tiny timm models covering the layer types: ViT (LayerScale, cls/pos), ResNet (GroupNorm), EfficientNet (frozen BN)."""
    torch.manual_seed(0)
    if kind == "vit":
        model = timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=32, init_values=0.1)
        return make_dp_model(model, trainable="all")
    if kind == "resnet_gn":
        model = timm.create_model("test_resnet", num_classes=NUM_CLASSES)
        return make_dp_model(model, norm="groupnorm", groupnorm_groups=4, trainable="all")
    if kind == "efficientnet":
        model = timm.create_model("test_efficientnet", num_classes=NUM_CLASSES)
        return make_dp_model(model, norm="freeze", trainable="all")
    if kind == "efficientnet_last":
        model = timm.create_model("test_efficientnet", num_classes=NUM_CLASSES)
        return make_dp_model(model, norm="freeze", trainable="last_blocks", num_trainable_blocks=2)
    raise ValueError(kind)


def _randomize_head(dp_model):
    # The classifier starts at zero in real runs; random here so that every layer gets a non-zero gradient.
    with torch.no_grad():
        for p in dp_model.model.get_classifier().parameters():
            p.normal_(0, 0.5)


def _naive_group_grads(dp_model, inputs, targets):
    """Reference: for each group alone, autograd of the mean loss over its members."""
    params = dp_model.trainable_params()
    out = {name: [] for name in params}
    for x, y in zip(inputs, targets):
        loss = group_loss(dp_model.split.tail(x), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        for name, g in zip(params, grads):
            out[name].append(g)
    return {name: torch.stack(gs) for name, gs in out.items()}


@pytest.mark.parametrize("kind", ["vit", "resnet_gn", "efficientnet", "efficientnet_last"])
@pytest.mark.parametrize("num_views", [1, 3])
def test_per_group_grads_and_clipped_sum_match_naive_loop(kind, num_views):
    dp_model = _tiny(kind)
    _randomize_head(dp_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        images = torch.randn(4 * num_views, 3, 32, 32, generator=gen)
        feats = dp_model.split.prefix(images)
    inputs = feats.view(4, num_views, *feats.shape[1:])
    targets = torch.randint(0, NUM_CLASSES, (4, num_views), generator=gen)
    if num_views > 1:  # also soft labels, as mixes produce
        soft = torch.softmax(torch.randn(4, num_views, NUM_CLASSES, generator=gen), -1)
        targets_list = [targets, soft]
    else:
        targets_list = [targets]
    params = {n: p.detach() for n, p in dp_model.trainable_params().items()}
    forward = lambda p, x: functional_call(dp_model.tail_module, p, (x,))  # noqa: E731
    for tgt in targets_list:
        fast, losses = per_example_grads(forward, params, inputs, tgt)
        naive = _naive_group_grads(dp_model, inputs, tgt)
        assert set(fast) == set(naive) and len(fast) == len(dp_model.trainable_names)
        for name in naive:
            assert torch.allclose(fast[name], naive[name], atol=1e-5, rtol=1e-4), name
            assert naive[name].abs().sum() > 0, f"{name} got no gradient: the check would be vacuous"
        # clipped sum == Σ_i g_i · min(1, C/||g_i||) computed by hand on the naive gradients
        norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in naive.values()))
        max_norm = float(norms.median())  # some groups clipped, some not
        summed = clipped_sum(fast, max_norm)
        for name, g in naive.items():
            factors = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
            expected = (g * factors.view(-1, *[1] * (g.dim() - 1))).sum(0)
            assert torch.allclose(summed[name], expected, atol=1e-5, rtol=1e-4), name
        assert losses.shape == (4,)


def test_clipped_norms_are_at_most_c():
    gen = torch.Generator().manual_seed(0)
    scale = torch.where(torch.arange(50) % 2 == 0, 10.0, 0.01)  # half far above C, half far below
    grads = {"a": torch.randn(50, 7, 3, generator=gen) * scale.view(-1, 1, 1), "b": torch.randn(50, 4, generator=gen)}
    grads["b"] *= scale.view(-1, 1)
    factors = clip_factors(per_example_norms(grads), 1.5)
    clipped = {k: v * factors.view(-1, *[1] * (v.dim() - 1)) for k, v in grads.items()}
    # ≤ C up to fp32 rounding of the recomputed norm (one ulp); the 1e-6 in the factor keeps it below C exactly
    assert per_example_norms(clipped).max() <= 1.5 * (1 + 1e-6)
    # flat clipping: one factor per example over all parameters, not per parameter
    big = per_example_norms(grads) > 1.5
    assert big.sum() == 25
    assert torch.equal(factors[~big], torch.ones(25))  # small gradients pass unchanged
    assert torch.allclose(per_example_norms(clipped)[big], torch.full((25,), 1.5), rtol=1e-5)


def test_sensitivity_replacing_one_example_changes_only_its_contribution():
    """Each group's clipped gradient depends on that example alone: replace example j, the rest stay put."""
    dp_model = _tiny("efficientnet_last")
    _randomize_head(dp_model)
    params = {n: p.detach() for n, p in dp_model.trainable_params().items()}
    forward = lambda p, x: functional_call(dp_model.tail_module, p, (x,))  # noqa: E731
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(6, 2, 3, 32, 32, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (6, 2), generator=gen)
    with torch.no_grad():
        feats = dp_model.split.prefix(images.flatten(0, 1))
    feats = feats.view(6, 2, *feats.shape[1:])
    changed = feats.clone()
    changed[3] = changed[3] * -3 + 1  # a very different example j = 3
    before, _ = per_example_grads(forward, params, feats, targets)
    after, _ = per_example_grads(forward, params, changed, targets)
    f_before = clip_factors(per_example_norms(before), 0.1)
    f_after = clip_factors(per_example_norms(after), 0.1)
    others = [i for i in range(6) if i != 3]
    for name in before:
        b = before[name] * f_before.view(-1, *[1] * (before[name].dim() - 1))
        a = after[name] * f_after.view(-1, *[1] * (after[name].dim() - 1))
        assert torch.equal(b[others], a[others]) or torch.allclose(b[others], a[others], atol=1e-7)
    total_change = sum((after[n][3] - before[n][3]).norm() for n in before)
    assert total_change > 0
    # the sum moves by at most 2C (old contribution out, new in)
    s_before, s_after = clipped_sum(before, 0.1), clipped_sum(after, 0.1)
    delta = torch.sqrt(sum((s_after[n] - s_before[n]).pow(2).sum() for n in s_before))
    assert delta <= 2 * 0.1 + 1e-6


def test_non_finite_gradient_is_an_error_not_clipped_away():
    grads = {"w": torch.tensor([[1.0, float("nan")], [0.5, 0.5]])}
    with pytest.raises(FloatingPointError, match="non-finite"):
        clipped_sum(grads, 1.0)
