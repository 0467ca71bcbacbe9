"""The DP-SGD gradient mechanism: the one place where sampling, clipping, noise and scaling meet.

Guarantee. For one logical step, given the locally sampled examples of every rank (Poisson, rate q, see
`sampling`), `PrivateGradient` returns on every rank the same vector

    g = ( Σ_ranks Σ_{i sampled on rank} clip_C(∇ mean-loss of group i)  +  N(0, σ² C² I) ) / (q·N)

where clipping is flat over all trainable parameters, the sum runs over micro-batches locally and then one
all-reduce (SUM) over ranks, and the noise is drawn once, after the all-reduce, from a stream seeded by the
secret seed and the step (identical on all ranks). Replacing one example changes one clipped term, so the
sum has L2 sensitivity C and each step is the sampled Gaussian mechanism with noise multiplier σ;
`accounting` turns (σ, q, steps, δ) into ε. The divisor is the expected batch size q·N, never the realised
one (which would leak the batch size and change the sensitivity).

Invariants checked at run time: each step is finished once (no double noise), every rank took part in the
all-reduce, no non-finite per-example gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from dpmix_dist.privacy import secure_random
from dpmix_dist.privacy.clipping import clipped_sum
from dpmix_dist.privacy.noise import gaussian_noise_like
from dpmix_dist.privacy.seeding import generator

AllReduceSum = Callable[[torch.Tensor], None]


class PrivateGradient:
    """Accumulates clipped per-example gradients for one step at a time and releases their noisy mean.

    Args:
        param_shapes: name -> shape of each trainable parameter (the order fixes the flat layout).
        noise_multiplier: σ.
        max_grad_norm: C.
        expected_batch_size: q·N, the divisor.
        secret_seed: shared by all ranks; seeds the noise stream. Never log it.
        world_size: number of ranks taking part in the all-reduce.
        all_reduce_sum: in-place SUM over all ranks (identity for one process).
        device: where the flat buffers live.
        secure_noise: draw the noise from `secure_random` (a cryptographic stream, float-attack-resistant
            sampler) instead of torch's generator; same distribution, slower.
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
        all_reduce_sum: AllReduceSum,
        device: torch.device | str = "cpu",
        secure_noise: bool = False,
    ) -> None:
        if noise_multiplier < 0 or max_grad_norm <= 0 or expected_batch_size <= 0:
            raise ValueError("need σ >= 0, C > 0 and expected batch size > 0")
        self.shapes = dict(param_shapes)
        self.numel = sum(int(torch.Size(s).numel()) for s in self.shapes.values())
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self._secret_seed = secret_seed
        self.world_size = world_size
        self._all_reduce_sum = all_reduce_sum
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
        """All-reduce the clipped sums, add noise once, divide by q·N. Returns the flat fp32 gradient."""
        if self._step is None:
            raise RuntimeError("finish_step() without begin_step()")
        step, self._step = self._step, None
        # The last slot counts the ranks that took part: a rank that skipped or sent a short buffer shows.
        buffer = torch.cat([self._local_sum, torch.ones(1, device=self.device)])
        self._all_reduce_sum(buffer)
        ranks_seen = int(round(buffer[-1].item()))
        if ranks_seen != self.world_size:
            raise RuntimeError(f"all-reduce counted {ranks_seen} ranks, expected {self.world_size}")
        self._last_finished_step = step
        if self.noise_multiplier == 0:  # only the non-private ceiling (privacy.enabled=false) gets here
            return buffer[:-1] / self.expected_batch_size
        std = self.noise_multiplier * self.max_grad_norm
        if self.secure_noise:
            noise = secure_random.gaussian_noise(self._secret_seed, step, self.numel, std, self.device)
        else:
            noise = gaussian_noise_like(
                buffer[:-1], std, generator(self._secret_seed, "noise", step, device=self.device)
            )
        return (buffer[:-1] + noise) / self.expected_batch_size

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
