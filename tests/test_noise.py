"""Contract item 5 under sharding: the noise of coordinate j is a function of (seed, step, j) alone, so any rank can
draw exactly its slice, and the slices of any partition concatenate to the whole vector (each coordinate noised
once). Checked against a naive reference that draws every chunk whole, and statistically (std, independence)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from scipy import stats

from dpmix_dist.privacy import secure_random
from dpmix_dist.privacy.mechanism import PrivateGradient, shard_bounds
from dpmix_dist.privacy.noise import CHUNK, chunk_spans, gaussian_noise_slice
from dpmix_dist.privacy.seeding import derive_seed

NUMEL = 2 * CHUNK + 1001  # three chunks, the last one short


def _naive(seed: int, step: int, numel: int, secure: bool) -> torch.Tensor:
    """The whole vector, the simplest way: chunk c drawn whole from its own stream, (seed, "noise", step, c)."""
    parts = []
    for c in range(-(-numel // CHUNK)):
        if secure:
            parts.append(torch.from_numpy(secure_random.standard_normals(seed, ("noise", step, c), CHUNK)).float())
        else:
            gen = torch.Generator().manual_seed(derive_seed(seed, "noise", step, c))
            parts.append(torch.randn(CHUNK, generator=gen))
    return torch.cat(parts)[:numel]


@pytest.mark.parametrize("secure", [False, True], ids=["torch", "secure"])
def test_slices_of_any_partition_concatenate_to_the_naive_whole_vector(secure):
    reference = _naive(5, 3, NUMEL, secure)
    whole = gaussian_noise_slice(5, 3, 0, NUMEL, 1.0, secure=secure)
    assert torch.allclose(whole, reference, atol=1e-6, rtol=0) if secure else torch.equal(whole, reference)
    rng = np.random.default_rng(0)
    cuts = [
        [CHUNK, 2 * CHUNK],  # on the chunk boundaries
        [CHUNK - 1, CHUNK + 1, CHUNK + 1],  # around one, with an empty slice
        sorted(rng.integers(0, NUMEL, 6).tolist()),
        *[[shard_bounds(NUMEL, w, r)[1] for r in range(w - 1)] for w in (2, 3, 4, 7)],  # ZeRO shards
    ]
    for inner in cuts:
        edges = [0, *inner, NUMEL]
        parts = [gaussian_noise_slice(5, 3, a, b, 1.0, secure=secure) for a, b in zip(edges, edges[1:])]
        assert [len(p) for p in parts] == [b - a for a, b in zip(edges, edges[1:])]
        assert torch.equal(torch.cat(parts), whole), inner


def test_chunk_spans_cover_a_slice_once():
    for start, stop in [(0, 0), (0, 1), (5, CHUNK), (CHUNK - 3, 3 * CHUNK + 4), (2 * CHUNK, 2 * CHUNK + 1)]:
        covered = [c * CHUNK + k for c, lo, hi in chunk_spans(start, stop) for k in range(lo, hi)]
        assert covered == list(range(start, stop))
    with pytest.raises(ValueError):
        list(chunk_spans(3, 2))


@pytest.mark.parametrize("secure", [False, True], ids=["torch", "secure"])
def test_noise_differs_across_steps_chunks_and_seeds(secure):
    a = gaussian_noise_slice(1, 0, 0, 2 * CHUNK, 1.0, secure=secure)
    assert not torch.equal(a[:CHUNK], a[CHUNK:])  # chunk 1 is not chunk 0 again
    assert not torch.equal(a, gaussian_noise_slice(1, 1, 0, 2 * CHUNK, 1.0, secure=secure))  # fresh each step
    assert not torch.equal(a, gaussian_noise_slice(2, 0, 0, 2 * CHUNK, 1.0, secure=secure))  # depends on the seed
    assert torch.equal(a, gaussian_noise_slice(1, 0, 0, 2 * CHUNK, 1.0, secure=secure))  # reproducible


def test_noise_is_normal_with_the_std_asked_for_and_independent_across_chunks_steps_and_neighbours():
    std = 0.37
    x = gaussian_noise_slice(11, 0, 0, 2 * CHUNK, std).double()
    y = gaussian_noise_slice(11, 1, 0, 2 * CHUNK, std).double()
    n = x.numel()
    assert abs(x.std().item() / std - 1) < 5 / math.sqrt(2 * n)
    assert abs(x.mean().item()) < 5 * std / math.sqrt(n)
    assert stats.kstest((x / std).numpy(), "norm").pvalue > 1e-4
    bound = 5 / math.sqrt(CHUNK)  # a correlation of independent normals has std 1/sqrt(n)
    pairs = {
        "chunk 0 vs chunk 1": (x[:CHUNK], x[CHUNK:]),
        "step 0 vs step 1": (x[:CHUNK], y[:CHUNK]),
        "neighbours": (x[: CHUNK - 1], x[1:CHUNK]),
    }
    for what, (u, v) in pairs.items():
        r = torch.corrcoef(torch.stack([u, v]))[0, 1].item()
        assert abs(r) < bound, what


def test_shard_bounds_partition_the_vector():
    for numel in (0, 1, 7, 1000, 1001):
        for world_size in (1, 2, 3, 4, 8):
            bounds = [shard_bounds(numel, world_size, r) for r in range(world_size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == numel
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert all(0 <= stop - start <= -(-numel // world_size) for start, stop in bounds)


# ------------------------------------------------------------------------------------ the sharded mechanism


def _threaded_ranks(world_size: int, run) -> list:
    """`run(rank, reduce_scatter_sum)` in `world_size` threads that reduce-scatter through shared memory: each
    waits for all, then takes its row of the SUM (the semantics of torch.distributed.reduce_scatter_tensor)."""
    barrier, inputs, results = threading.Barrier(world_size), [None] * world_size, [None] * world_size

    def rank_main(rank):
        def reduce_scatter_sum(rows):
            inputs[rank] = rows.clone()
            barrier.wait()
            row = torch.stack(inputs).sum(0)[rank].clone()
            barrier.wait()
            return row

        results[rank] = run(rank, reduce_scatter_sum)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sharded_release_of_zero_gradients_is_the_noise_of_each_coordinate_once(world_size):
    """All clipped gradients zero (nothing sampled): each rank's reduce-scattered shard is pure noise σC/(qN), and the
    shards concatenate to the replicated release: no coordinate without noise, none noised twice."""
    shapes = {"w": torch.Size([CHUNK // 2 + 3, 2]), "b": torch.Size([999])}  # crosses a chunk edge, odd length
    sigma, c, batch, steps = 1.3, 0.7, 40.0, 3

    def mechanism(**reduction):
        return PrivateGradient(
            shapes, noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=batch, secret_seed=9, **reduction
        )

    def run(rank, reduce_scatter_sum):
        mech = mechanism(world_size=world_size, shard_index=rank, reduce_scatter_sum=reduce_scatter_sum)
        out = []
        for step in range(steps):
            mech.begin_step(step)
            out.append(mech.finish_step())
        return mech.owned, out

    shards = _threaded_ranks(world_size, run)
    replicated = mechanism(world_size=1, all_reduce_sum=lambda t: None)
    numel = replicated.numel
    assert [o for o, _ in shards] == [shard_bounds(numel, world_size, r) for r in range(world_size)]
    released = []
    for step in range(steps):
        whole = torch.cat([out[step] for _, out in shards])
        replicated.begin_step(step)
        assert torch.equal(whole, replicated.finish_step())
        released.append(whole)
    noise = torch.stack(released).double()
    expected = sigma * c / batch
    assert abs(noise.std().item() / expected - 1) < 5 / math.sqrt(2 * noise.numel())
    # per shard: the noise std is σC/(qN) on every shard (a shard without noise, or noised twice, shows as 0 or √2)
    for start, stop in (o for o, _ in shards):
        if stop > start:
            part = noise[:, start:stop]
            assert abs(part.std().item() / expected - 1) < 5 / math.sqrt(2 * part.numel())


def test_sharded_mechanism_sums_the_clipped_sums_of_all_ranks_and_counts_them():
    """Rank r's clipped sum differs per rank: each shard receives the SUM over ranks (not a mean), plus its noise."""
    shapes = {"w": torch.Size([10, 3]), "b": torch.Size([5])}
    world_size = 3

    def run(rank, reduce_scatter_sum):
        mech = PrivateGradient(
            shapes,
            noise_multiplier=0.0,
            max_grad_norm=100.0,
            expected_batch_size=2.0,
            secret_seed=1,
            world_size=world_size,
            shard_index=rank,
            reduce_scatter_sum=reduce_scatter_sum,
        )
        mech.begin_step(0)
        mech.accumulate({k: torch.full((1, *s), float(rank + 1)) for k, s in shapes.items()})
        return mech.owned, mech.finish_step()

    results = _threaded_ranks(world_size, run)
    whole = torch.cat([out for _, out in results])
    assert torch.equal(whole, torch.full((35,), (1 + 2 + 3) / 2.0))
    with pytest.raises(ValueError, match="exactly one"):
        PrivateGradient(
            shapes,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=1.0,
            secret_seed=1,
            world_size=1,
            shard_index=0,
        )
    lonely = PrivateGradient(  # a reduce-scatter that saw only this rank of two
        shapes,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=1.0,
        secret_seed=1,
        world_size=2,
        shard_index=0,
        reduce_scatter_sum=lambda rows: rows[0].clone(),
    )
    lonely.begin_step(0)
    with pytest.raises(RuntimeError, match="counted 1 ranks, expected 2"):
        lonely.finish_step()
