"""Derived random streams: every random draw of a run is a pure function of (secret seed, purpose, step, ...).

All ranks hold the same secret seed, so a stream derived here is identical on every rank; this is what makes
sampling and noise independent of the number of processes and of the micro-batch size.
"""

from __future__ import annotations

import hashlib
import secrets

import torch


def fresh_secret_seed() -> int:
    """A 63-bit seed from the OS CSPRNG (the default: the guarantee needs the noise to be unpredictable)."""
    return secrets.randbits(63)


def derive_seed(secret_seed: int, *labels: int | str) -> int:
    """A 63-bit seed for the stream named by `labels`, e.g. ("noise", step). Collision-free in practice."""
    text = ":".join([str(secret_seed), *map(str, labels)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(secret_seed: int, *labels: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded for the stream named by `labels`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(secret_seed, *labels))
    return gen
