"""Contract items 1, 4-6, 8: sampling, one all-reduce, noise once, division by q·N, derived random streams."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from dpmix_dist.privacy.mechanism import PrivateGradient
from dpmix_dist.privacy.noise import CHUNK, gaussian_noise_slice
from dpmix_dist.privacy.sampling import owned_indices, poisson_mask, sample_local
from dpmix_dist.privacy.seeding import derive_seed

SHAPES = {"w": torch.Size([40, 25]), "b": torch.Size([25])}


def _mechanism(sigma=1.0, c=2.0, batch=50.0, seed=7, world_size=1, all_reduce=lambda t: None, secure=False):
    return PrivateGradient(
        SHAPES,
        noise_multiplier=sigma,
        max_grad_norm=c,
        expected_batch_size=batch,
        secret_seed=seed,
        world_size=world_size,
        all_reduce_sum=all_reduce,
        secure_noise=secure,
    )


def _grads(n, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, *shape, generator=gen) * scale for name, shape in SHAPES.items()}


# ------------------------------------------------------------------------------------------------ sampling


def test_owned_indices_partition_the_data_set():
    for world_size in (1, 2, 3, 4):
        parts = [owned_indices(103, r, world_size) for r in range(world_size)]
        assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(103))


@pytest.mark.parametrize("secure", [False, True], ids=["torch", "secure"])
def test_union_of_local_samples_is_the_global_poisson_sample_for_any_world_size(secure):
    n, q = 1000, 0.05
    for step in range(5):
        reference = poisson_mask(11, step, n, q, secure).nonzero().squeeze(1)
        for world_size in (1, 2, 4):
            union = torch.cat(
                [sample_local(11, step, owned_indices(n, r, world_size), n, q, secure) for r in range(world_size)]
            )
            assert torch.equal(torch.sort(union).values, reference)


@pytest.mark.parametrize("secure", [False, True], ids=["torch", "secure"])
def test_empirical_sampling_rate_is_q_including_multi_rank_and_empty_local_batches(secure):
    n, q, steps, world_size = 200, 0.01, 400, 4
    counts = torch.zeros(n)
    empty_local = 0
    for step in range(steps):
        for rank in range(world_size):
            local = sample_local(5, step, owned_indices(n, rank, world_size), n, q, secure)
            empty_local += len(local) == 0
            counts[local] += 1
    total = counts.sum().item()
    # Binomial(n·steps, q): a two-sided test at 1e-4 (fixed seed: deterministic)
    assert stats.binomtest(int(total), n * steps, q).pvalue > 1e-4
    assert empty_local > 0  # q·n/W = 0.5: empty local batches happen and are handled
    # each example is sampled independently: per-example counts ~ Binomial(steps, q)
    assert (
        stats.chisquare(
            torch.bincount(counts.long(), minlength=12)[:4].numpy() + 0.0,
            [n * stats.binom.pmf(k, steps, q) for k in range(4)],
            sum_check=False,
        ).pvalue
        > 1e-4
    )


@pytest.mark.parametrize("secure", [False, True], ids=["torch", "secure"])
def test_sampling_depends_on_seed_and_step(secure):
    assert not torch.equal(poisson_mask(1, 0, 500, 0.5, secure), poisson_mask(2, 0, 500, 0.5, secure))
    assert not torch.equal(poisson_mask(1, 0, 500, 0.5, secure), poisson_mask(1, 1, 500, 0.5, secure))
    assert torch.equal(poisson_mask(1, 3, 500, 0.5, secure), poisson_mask(1, 3, 500, 0.5, secure))
    assert not torch.equal(poisson_mask(1, 3, 500, 0.5, secure), poisson_mask(1, 3, 500, 0.5, not secure))


# ------------------------------------------------------------------------------------------------ mechanism


def test_without_noise_the_result_is_the_clipped_sum_over_expected_batch_size():
    mech = _mechanism(sigma=0.0, c=2.0, batch=50.0)
    grads = _grads(7, scale=0.3)
    mech.begin_step(0)
    mech.accumulate({k: v[:3] for k, v in grads.items()})  # two micro-batches
    mech.accumulate({k: v[3:] for k, v in grads.items()})
    out = mech.unflatten(mech.finish_step())
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    factors = torch.clamp(2.0 / (norms + 1e-6), max=1.0)
    for name, g in grads.items():
        expected = (g * factors.view(-1, *[1] * (g.dim() - 1))).sum(0) / 50.0  # q·N, not the realised 7
        assert torch.allclose(out[name], expected, atol=1e-6)


@pytest.mark.parametrize("secure", [False, True], ids=["torch", "secure"])
def test_noise_std_is_sigma_c_over_expected_batch_size(secure):
    sigma, c, batch = 1.3, 0.7, 40.0
    mech = _mechanism(sigma=sigma, c=c, batch=batch, secure=secure)
    samples = []
    for step in range(20):  # 20 × 1025 coordinates; no example sampled: pure noise
        mech.begin_step(step)
        samples.append(mech.finish_step())
    noise = torch.cat(samples)
    expected_std = sigma * c / batch
    n = noise.numel()
    # the sample std of n normals has relative std ≈ 1/sqrt(2n): allow 5 of those
    assert abs(noise.std().item() / expected_std - 1) < 5 / math.sqrt(2 * n)
    assert abs(noise.mean().item()) < 5 * expected_std / math.sqrt(n)
    assert stats.kstest((noise / expected_std).numpy(), "norm").pvalue > 1e-4


@pytest.mark.parametrize("secure", [False, True], ids=["torch", "secure"])
def test_noise_is_identical_across_ranks_and_fresh_each_step(secure):
    a, b = _mechanism(seed=99, secure=secure), _mechanism(seed=99, secure=secure)
    outs = []
    for mech in (a, b):
        mech.begin_step(4)
        outs.append(mech.finish_step())
    assert torch.equal(outs[0], outs[1])
    a.begin_step(5)
    assert not torch.equal(a.finish_step(), outs[0])
    c = _mechanism(seed=100, secure=secure)
    c.begin_step(4)
    assert not torch.equal(c.finish_step(), outs[0])


def test_noise_is_added_once_after_the_all_reduce():
    """Two simulated ranks: the reduced buffer holds both clipped sums and no noise; noise comes after, once."""
    seen = []

    def all_reduce(buffer):  # stands for SUM over two ranks holding the same local sum
        seen.append(buffer.clone())
        buffer.mul_(2)

    mech = _mechanism(sigma=1.0, c=1.0, batch=10.0, world_size=2, all_reduce=all_reduce)
    grads = _grads(3, scale=0.01)  # unclipped
    mech.begin_step(0)
    mech.accumulate(grads)
    out = mech.finish_step()
    local = torch.cat([grads[k].sum(0).reshape(-1) for k in SHAPES])
    assert torch.allclose(seen[0][:-1], local, atol=1e-7)  # nothing but the clipped sum went into the reduce
    noise = gaussian_noise_slice(7, 0, 0, local.numel(), 1.0)
    assert torch.allclose(out, (2 * local + noise) / 10.0, atol=1e-6)  # noise added once, not per rank


def test_invariants_fail_loudly():
    mech = _mechanism()
    mech.begin_step(0)
    mech.finish_step()
    with pytest.raises(RuntimeError, match="never twice"):
        mech.begin_step(0)  # releasing step 0 again would add fresh noise to the same step
    with pytest.raises(RuntimeError, match="without begin_step"):
        mech.finish_step()
    with pytest.raises(RuntimeError, match="outside a step"):
        mech.accumulate(_grads(2))
    skipped = _mechanism(world_size=2)  # the all-reduce saw only this rank
    skipped.begin_step(0)
    with pytest.raises(RuntimeError, match="counted 1 ranks, expected 2"):
        skipped.finish_step()
    wrong = _mechanism()
    wrong.begin_step(0)
    with pytest.raises(KeyError):
        wrong.accumulate({"w": torch.zeros(2, 40, 25)})


def test_an_engines_clipped_sum_is_checked_against_the_mechanisms_own_c():
    """An engine that clips internally is handed C by the mechanism; what it returns must cover the parameters in
    their shapes and obey ‖sum of b clipped groups‖ ≤ b·C. A correctly clipped sum is added exactly."""
    from dpmix_dist.privacy.clipping import clipped_sum

    mech = _mechanism(c=2.0)
    mech.begin_step(0)
    grads = _grads(4, scale=3.0)
    unclipped = {k: g.sum(0) for k, g in grads.items()}
    with pytest.raises(RuntimeError, match="did not clip"):
        mech.accumulate_clipped_sum(unclipped, num_groups=4)  # forgot to clip
    with pytest.raises(RuntimeError, match="did not clip"):
        mech.accumulate_clipped_sum(clipped_sum(grads, 8.0), num_groups=4)  # clipped to another C
    with pytest.raises(KeyError, match="exactly the trainable parameters"):
        mech.accumulate_clipped_sum({"w": unclipped["w"]}, num_groups=4)
    with pytest.raises(ValueError, match="shape"):
        mech.accumulate_clipped_sum({"w": unclipped["w"].T, "b": unclipped["b"]}, num_groups=4)
    assert torch.count_nonzero(mech._local_sum) == 0  # nothing refused was added
    mech.accumulate_clipped_sum(clipped_sum(grads, 2.0), num_groups=4)
    reference = _mechanism(c=2.0)
    reference.begin_step(0)
    reference.accumulate(grads)
    assert torch.equal(mech._local_sum, reference._local_sum)


def test_derived_streams_are_distinct_and_reproducible():
    assert derive_seed(1, "noise", 0) == derive_seed(1, "noise", 0)
    seeds = {derive_seed(1, "noise", s) for s in range(1000)} | {derive_seed(1, "sample", s) for s in range(1000)}
    assert len(seeds) == 2000
    assert all(0 <= s < 2**63 for s in seeds)


def test_secure_noise_is_chunked_by_coordinate_and_normal_in_the_tails():
    """Coordinate j's value depends on (seed, step, j) only: a longer vector extends a shorter one. The combined
    sampler is N(0, 1) (KS) with the right tail mass beyond 3σ and 4σ (a float-sampler defect shows in tails)."""
    from dpmix_dist.privacy import secure_random

    short = gaussian_noise_slice(3, 0, 0, 1000, 1.0, secure=True)
    long = gaussian_noise_slice(3, 0, 0, CHUNK + 7, 1.0, secure=True)
    assert torch.equal(long[:1000], short) and not torch.equal(long[CHUNK:][:7], short[:7])
    z = long.double().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-4
    for k in (3, 4):
        tail = int((abs(z) > k).sum())
        assert stats.binomtest(tail, len(z), 2 * stats.norm.sf(k)).pvalue > 1e-4
    u = secure_random.uniforms(3, "x", count=100_000)
    assert u.min() > 0 and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-4
