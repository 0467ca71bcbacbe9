"""The DP-SGD gradient mechanism: the one place where sampling, clipping, noise and scaling meet.

Guarantee. For one logical step, given the locally sampled examples of every rank (Poisson, rate q, see
`sampling`), `PrivateGradient` releases the vector

    g = ( Σ_ranks Σ_{i sampled on rank} clip_C(∇ mean-loss of group i)  +  N(0, σ² C² I) ) / (q·N)

where clipping is flat over all trainable parameters, the sum runs over micro-batches locally and then once over
ranks (SUM), and the noise is added once, after that sum. Replacing one example changes one clipped term, so the
sum has L2 sensitivity C and each step is the sampled Gaussian mechanism with noise multiplier σ; `accounting`
turns (σ, q, steps, δ) into ε. The divisor is the expected batch size q·N, never the realised one (which would
leak the batch size and change the sensitivity).

Who holds what. Replicated (the default): an all-reduce gives every rank the whole sum and every rank adds the
identical noise of every coordinate (the same draw, not W independent ones). Sharded (ZeRO, `shard_index` given):
the flat vector is cut into W contiguous shards (`shard_bounds`); rank r receives the SUM of shard r only (by a
reduce-scatter, or by slicing an all-reduce) and adds the noise of exactly those coordinates. Either way the
noise of coordinate j is `noise.gaussian_noise_slice` at j, a function of (secret seed, step, j) alone: the
shards' noises concatenate to the replicated vector, so each coordinate is noised once and the model does not
depend on W or on the sharding.

Invariants checked at run time: each step is finished once (no double noise), every rank took part in the
reduction (a slot of each shard counts the ranks), no non-finite per-example gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from dpmix_dist.privacy.clipping import clipped_sum
from dpmix_dist.privacy.noise import gaussian_noise_slice

AllReduceSum = Callable[[torch.Tensor], None]  # in place, SUM over ranks
ReduceScatterSum = Callable[[torch.Tensor], torch.Tensor]  # (W, L) on every rank -> row `rank` summed over ranks


def shard_bounds(numel: int, num_shards: int, index: int) -> tuple[int, int]:
    """[start, stop) of shard `index` when [0, numel) is cut into `num_shards` contiguous shards of
    ceil(numel / num_shards) coordinates (the last ones shorter, possibly empty). The one place the cut is made."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard {index} outside [0, {num_shards})")
    width = -(-numel // num_shards)
    return min(numel, index * width), min(numel, (index + 1) * width)


class PrivateGradient:
    """Accumulates clipped per-example gradients for one step at a time and releases their noisy mean.

    Args:
        param_shapes: name -> shape of each trainable parameter (the order fixes the flat layout).
        noise_multiplier: σ.
        max_grad_norm: C.
        expected_batch_size: q·N, the divisor.
        secret_seed: shared by all ranks; seeds the noise stream. Never log it.
        world_size: number of ranks taking part in the reduction.
        all_reduce_sum: in-place SUM over all ranks (identity for one process).
        device: where the flat buffers live.
        secure_noise: draw the noise from `secure_random` (a cryptographic stream, float-attack-resistant
            sampler) instead of torch's generator; same distribution, slower.
        shard_index: this rank's shard (ZeRO): `finish_step` then releases shard `shard_index` of
            `shard_bounds(numel, world_size, ·)` only, noised on exactly its coordinates. None: the whole vector.
        reduce_scatter_sum: with `shard_index`, reduce by a reduce-scatter instead of `all_reduce_sum` (only the
            owned shard of the sum is ever materialised, ZeRO-2); give one of the two.
    """

    def __init__(
        self,
        param_shapes: Mapping[str, torch.Size],
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        secret_seed: int,
        world_size: int,
        all_reduce_sum: AllReduceSum | None = None,
        device: torch.device | str = "cpu",
        secure_noise: bool = False,
        shard_index: int | None = None,
        reduce_scatter_sum: ReduceScatterSum | None = None,
    ) -> None:
        if noise_multiplier < 0 or max_grad_norm <= 0 or expected_batch_size <= 0:
            raise ValueError("need σ >= 0, C > 0 and expected batch size > 0")
        if (all_reduce_sum is None) == (reduce_scatter_sum is None):
            raise ValueError("give exactly one of all_reduce_sum and reduce_scatter_sum")
        if reduce_scatter_sum is not None and shard_index is None:
            raise ValueError("reduce_scatter_sum needs shard_index: the rank's shard of the sum")
        self.shapes = dict(param_shapes)
        self.numel = sum(int(torch.Size(s).numel()) for s in self.shapes.values())
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self._secret_seed = secret_seed
        self.world_size = world_size
        self._all_reduce_sum = all_reduce_sum
        self._reduce_scatter_sum = reduce_scatter_sum
        self.shard_index = shard_index
        self.owned = (0, self.numel) if shard_index is None else shard_bounds(self.numel, world_size, shard_index)
        self.device = torch.device(device)
        self.secure_noise = secure_noise
        self._step: int | None = None
        self._last_finished_step = -1
        self._local_sum = torch.zeros(self.numel, dtype=torch.float32, device=self.device)

    def begin_step(self, step: int) -> None:
        if self._step is not None:
            raise RuntimeError(f"step {self._step} was begun but never finished")
        if step <= self._last_finished_step:
            raise RuntimeError(f"step {step} already released: noise is added once per step, never twice")
        self._step = step
        self._local_sum.zero_()

    def accumulate(self, per_example_grads: Mapping[str, torch.Tensor]) -> None:
        """Clip each example's gradient (flat, to C) and add the micro-batch's sum to the local sum."""
        self._check_keys(per_example_grads, "per-example gradients")
        self._local_sum += self._flat(clipped_sum(per_example_grads, self.max_grad_norm))

    def accumulate_clipped_sum(self, summed: Mapping[str, torch.Tensor], num_groups: int) -> None:
        """Add the sum of `num_groups` gradients that an engine clipped itself, to this mechanism's C (the engine
        must be handed `max_grad_norm`). Checked: the keys and shapes, and the bound every such sum obeys,
        ‖sum‖ ≤ num_groups·C (an engine that forgot to clip, or clipped to another C, fails here)."""
        self._check_keys(summed, "the clipped sum")
        wrong = [name for name, shape in self.shapes.items() if summed[name].shape != torch.Size(shape)]
        if wrong:
            raise ValueError(
                f"the clipped sum of {wrong[0]} has shape {tuple(summed[wrong[0]].shape)}, the parameter "
                f"{tuple(self.shapes[wrong[0]])}"
            )
        flat = self._flat(summed)
        norm = float(torch.linalg.vector_norm(flat))
        if not norm <= num_groups * self.max_grad_norm * (1 + 1e-3):  # fp32 sums of b terms: relative slack
            raise RuntimeError(
                f"a clipped sum of {num_groups} groups has norm {norm:.4g} > {num_groups} x C = "
                f"{num_groups * self.max_grad_norm:.4g}: the engine did not clip to this mechanism's C"
            )
        self._local_sum += flat

    def _check_keys(self, grads: Mapping[str, torch.Tensor], what: str) -> None:
        if self._step is None:
            raise RuntimeError("accumulate() outside a step: call begin_step(step) first")
        if list(grads) != list(self.shapes):
            raise KeyError(f"{what} must cover exactly the trainable parameters, in order")

    def _flat(self, summed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([summed[name].reshape(-1).float() for name in self.shapes])

    def finish_step(self) -> torch.Tensor:
        """Sum the clipped sums over ranks, add noise once, divide by q·N. Returns the flat fp32 gradient of the
        coordinates this rank owns, `self.owned` (all of them unless sharded)."""
        if self._step is None:
            raise RuntimeError("finish_step() without begin_step()")
        step, self._step = self._step, None
        start, stop = self.owned
        if self._reduce_scatter_sum is None:
            # The last slot counts the ranks that took part: a rank that skipped or sent a short buffer shows.
            buffer = torch.cat([self._local_sum, torch.ones(1, device=self.device)])
            self._all_reduce_sum(buffer)
            summed, ranks_seen = buffer[start:stop], buffer[-1]
        else:
            # Row r is shard r, padded to the common width, plus a slot counting the ranks; rank r receives row r.
            width = -(-self.numel // self.world_size)
            padded = torch.zeros(self.world_size * width, device=self.device)
            padded[: self.numel] = self._local_sum
            ones = torch.ones(self.world_size, 1, device=self.device)
            rows = torch.cat([padded.view(self.world_size, width), ones], dim=1)
            row = self._reduce_scatter_sum(rows)
            if row.shape != (width + 1,):
                raise RuntimeError(f"reduce-scatter returned shape {tuple(row.shape)}, expected ({width + 1},)")
            summed, ranks_seen = row[: stop - start], row[width]
        ranks_seen = int(round(ranks_seen.item()))
        if ranks_seen != self.world_size:
            raise RuntimeError(f"the reduction counted {ranks_seen} ranks, expected {self.world_size}")
        self._last_finished_step = step
        if self.noise_multiplier == 0:  # only the non-private ceiling (privacy.enabled=false) gets here
            return summed / self.expected_batch_size
        std = self.noise_multiplier * self.max_grad_norm
        noise = gaussian_noise_slice(self._secret_seed, step, start, stop, std, self.device, self.secure_noise)
        return (summed + noise) / self.expected_batch_size

    def resume_after(self, last_finished_step: int) -> None:
        """Continue a run whose steps up to `last_finished_step` were released (from a checkpoint)."""
        if self._step is not None:
            raise RuntimeError("cannot resume in the middle of a step")
        self._last_finished_step = last_finished_step

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat gradient back into name -> tensor of the parameter's shape."""
        out, offset = {}, 0
        for name, shape in self.shapes.items():
            n = int(torch.Size(shape).numel())
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
        return out
