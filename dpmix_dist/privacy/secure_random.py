"""Noise and sampling uniforms from a cryptographic stream, for `privacy.secure_noise=true`.

The default streams (`seeding.generator`) are torch's Mersenne Twister / Philox seeded from the secret seed: fine
statistically, but not built to resist an adversary who sees released values and knows the generator. Here:

- Uniforms come from SHAKE-256 (an extendable-output function of the Keccak family, a CSPRNG when its input holds
  the secret) over (secret seed, purpose, step, chunk). Like `seeding`, the stream is a pure function of those
  labels, so every rank draws the same values and nothing depends on the number of processes.
- A Gaussian is the variance-preserving combination of four independent standard normals, (z1 + z2 + z3 + z4) / 2,
  made by Box-Muller in float64 from four 53-bit uniforms (two pairs, cosine and sine of each). Summing several
  draws smooths the gaps that floating-point sampling leaves in the low-order bits, which the attacks on textbook
  float noise exploit (Mironov 2012 for Laplace; Holohan & Braghin 2021 for Gaussian samplers, the scheme
  Opacus's secure mode uses).
- `noise.gaussian_noise_slice` draws the noise in fixed chunks of `noise.CHUNK` coordinates, each with its own
  stream from here: memory stays bounded and the value of coordinate j depends on (seed, step, j) alone.

The secret seed has 63 bits of entropy (it travels as one int64 through the process group); see README.
Numpy and hashlib only.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def uniforms(secret_seed: int, *labels: int | str, count: int) -> np.ndarray:
    """`count` float64 values uniform on (0, 1) (never 0 or 1), from SHAKE-256 of the seed and labels."""
    text = ":".join(["dpmix-secure", str(secret_seed), *map(str, labels)]).encode()
    words = np.frombuffer(hashlib.shake_256(text).digest(8 * count), dtype="<u8")
    return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def standard_normals(secret_seed: int, labels: tuple, count: int) -> np.ndarray:
    """`count` N(0, 1) values, each the combination of four normals: two Box-Muller pairs (cos and sin of each
    are independent) from the coordinate's own four uniforms, so value k does not depend on `count`."""
    u = uniforms(secret_seed, *labels, count=4 * count).reshape(count, 2, 2)
    radius = np.sqrt(-2.0 * np.log(u[:, :, 0]))
    angle = 2.0 * math.pi * u[:, :, 1]
    return (radius * (np.cos(angle) + np.sin(angle))).sum(1) / 2.0
