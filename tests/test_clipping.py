"""Contract items 2-3: per-group gradients and flat clipping, against a naive loop (autograd on each group alone)."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_CLASSES, tiny_dp_model
from torch.func import functional_call

from dpmix_dist.privacy.clipping import clip_factors, clipped_sum, per_example_grads, per_example_norms
from dpmix_dist.testing.reference import naive_clipped_sum, naive_group_grads


@pytest.mark.parametrize("kind", ["vit", "resnet_gn", "efficientnet", "efficientnet_last"])
@pytest.mark.parametrize("num_views", [1, 3])
def test_per_group_grads_and_clipped_sum_match_naive_loop(kind, num_views):
    dp_model = tiny_dp_model(kind)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        images = torch.randn(4 * num_views, 3, 32, 32, generator=gen)
        feats = dp_model.cut.prefix(images)
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
        naive, norms = naive_group_grads(dp_model.cut.tail, dp_model.trainable_params(), inputs, tgt)
        assert set(fast) == set(naive) and len(fast) == len(dp_model.trainable_names)
        for name in naive:
            assert torch.allclose(fast[name], naive[name], atol=1e-5, rtol=1e-4), name
            assert naive[name].abs().sum() > 0, f"{name} got no gradient: the check would be vacuous"
        # clipped sum == Σ_i g_i · min(1, C/||g_i||) computed group by group on the naive gradients
        max_norm = float(norms.median())  # some groups clipped, some not
        summed, expected = clipped_sum(fast, max_norm), naive_clipped_sum(naive, norms, max_norm)
        for name in naive:
            assert torch.allclose(summed[name], expected[name], atol=1e-5, rtol=1e-4), name
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
    dp_model = tiny_dp_model("efficientnet_last")
    params = {n: p.detach() for n, p in dp_model.trainable_params().items()}
    forward = lambda p, x: functional_call(dp_model.tail_module, p, (x,))  # noqa: E731
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(6, 2, 3, 32, 32, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (6, 2), generator=gen)
    with torch.no_grad():
        feats = dp_model.cut.prefix(images.flatten(0, 1))
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
