"""Gaussian noise for the summed clipped gradient (contract item 5), as a function of (secret seed, step, coordinate).

The flat gradient is cut into fixed chunks of `CHUNK` coordinates; chunk c of step t is drawn from its own stream,
seeded by (secret seed, "noise", t, c), and always drawn whole (a prefix of a torch stream is not the shorter
stream: torch's CPU sampler transforms the last 16 values of a vector differently). So the value of coordinate j
depends on (seed, step, j) alone: not on the vector's length, nor on who draws it. A rank that owns the slice
[start, stop) of the summed gradient (ZeRO) draws exactly that slice, and the slices of any partition concatenate
to the whole vector: every coordinate is noised once, whatever the number of ranks or the sharding.

Two streams: torch's generator (default) and `secure_random` (`privacy.secure_noise=true`); both chunk here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from dpmix_dist.privacy import secure_random
from dpmix_dist.privacy.seeding import generator

CHUNK = 1 << 18  # coordinates per noise stream
NOISE_STREAM_VERSION = 2  # 1: one torch stream per step over the whole vector; 2: chunks seeded by (seed, step, c)


def chunk_spans(start: int, stop: int) -> Iterator[tuple[int, int, int]]:
    """(c, lo, hi) for each chunk c that meets [start, stop): the slice covers offsets [lo, hi) of chunk c."""
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop, got [{start}, {stop})")
    for c in range(start // CHUNK, -(-stop // CHUNK)):
        base = c * CHUNK
        yield c, max(start, base) - base, min(stop, base + CHUNK) - base


def _torch_chunk(secret_seed: int, step: int, c: int, lo: int, hi: int, device: torch.device) -> torch.Tensor:
    gen = generator(secret_seed, "noise", step, c, device=device)
    return torch.randn(CHUNK, generator=gen, device=device, dtype=torch.float32)[lo:hi]


def _secure_chunk(secret_seed: int, step: int, c: int, lo: int, hi: int) -> torch.Tensor:
    # value k of a secure stream does not depend on how many are drawn: the prefix up to hi is enough
    return torch.from_numpy(secure_random.standard_normals(secret_seed, ("noise", step, c), hi)[lo:])


def gaussian_noise_slice(
    secret_seed: int,
    step: int,
    start: int,
    stop: int,
    std: float,
    device: torch.device | str = "cpu",
    secure: bool = False,
) -> torch.Tensor:
    """N(0, std²) on coordinates [start, stop) of step `step`'s flat noise vector (fp32, on `device`).

    Args:
        secret_seed: the run's secret seed (identical on every rank). Never log it.
        step: the logical step; each step has fresh noise.
        start, stop: the coordinates drawn (a rank's shard under ZeRO; [0, numel) for the whole vector).
        std: σ·C.
        device: where the torch stream runs and the result lives.
        secure: draw from `secure_random` (SHAKE-256, four-draw Gaussian) instead of torch's generator.
    """
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    device = torch.device(device)
    spans = list(chunk_spans(start, stop))
    if secure:
        # chunks are independent streams; hashlib and numpy release the GIL on large buffers, so threads use every core
        with ThreadPoolExecutor(max_workers=max(1, min(len(spans), os.cpu_count() or 1))) as pool:
            parts = list(pool.map(lambda span: _secure_chunk(secret_seed, step, *span), spans))
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        return (flat * std).to(torch.float32).to(device)
    out = torch.empty(stop - start, dtype=torch.float32, device=device)
    offset = 0
    for span in spans:
        part = _torch_chunk(secret_seed, step, *span, device)
        out[offset : offset + len(part)] = part
        offset += len(part)
    return out.mul_(std)
