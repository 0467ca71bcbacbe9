"""The examples one rank holds, served as inputs to the trainable tail (frozen prefix applied, maybe cached)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from dpmix_dist.data.shards import Split

Prefix = Callable[[torch.Tensor], torch.Tensor]
ToInput = Callable[..., torch.Tensor]


class ExampleStore:
    """Random access, by global index, to the examples this rank owns.

    Args:
        split: the decoded split (memmap).
        owned: sorted global indices this rank holds.
        to_input: uint8 images -> normalized model input.
        prefix: the frozen part of the model.
        cache_features: run `prefix` once per example now and keep the result (exact when nothing random
            happens before the prefix, i.e. no augmentation).
        batch_size: examples per prefix call while caching.
        cache_file: where the cached features are kept between runs (see `feature_cache_key`); None: memory only.
    """

    def __init__(
        self,
        split: Split,
        owned: torch.Tensor,
        to_input: ToInput,
        prefix: Prefix,
        *,
        cache_features: bool,
        batch_size: int,
        progress: Callable[[int], None] | None = None,
        cache_file: Path | None = None,
    ) -> None:
        self.split = split
        self.owned = owned
        self._to_input = to_input
        self._prefix = prefix
        self._labels = torch.from_numpy(split.labels)
        self._cache: torch.Tensor | None = None
        if cache_features and cache_file is not None and cache_file.is_file():
            self._cache = torch.load(cache_file, weights_only=True)  # onto the device it was computed on
            if progress is not None:
                progress(len(owned))
        elif cache_features:
            chunks = [self._compute(chunk, progress) for chunk in owned.split(batch_size)]
            self._cache = torch.cat(chunks) if chunks else None
            if cache_file is not None and self._cache is not None:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.partial")
                torch.save(self._cache, tmp)
                os.replace(tmp, cache_file)  # readers see the whole file or none

    def __len__(self) -> int:
        return len(self.owned)

    @torch.no_grad()
    def _compute(self, global_indices: torch.Tensor, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        out = self._prefix(self._to_input(self.split.images[global_indices.numpy()]))
        if progress is not None:
            progress(len(global_indices))
        return out

    @property
    def cached(self) -> torch.Tensor | None:
        return self._cache

    def features(self, global_indices: torch.Tensor) -> torch.Tensor:
        """Prefix output for these (owned) examples, in the given order."""
        if self._cache is None:
            return self._compute(global_indices)
        positions = torch.searchsorted(self.owned, global_indices)
        if not torch.equal(self.owned[positions], global_indices):
            raise IndexError("asked for an example this rank does not own")
        return self._cache[positions.to(self._cache.device)]

    def labels(self, global_indices: torch.Tensor) -> torch.Tensor:
        return self._labels[global_indices]


# Raised when what a cut's prefix returns changes for the same settings (2: `trainable=head` caches the pooled
# pre-logits, not the last feature map), so older cache files are never read as the new features.
FEATURE_CACHE_FORMAT = 2


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every weight and buffer of `model` (names and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def feature_cache_key(weights: str, shards: dict, owned: torch.Tensor, **settings) -> str:
    """A digest of everything the cached features depend on: the model's weights as built (`weights_digest`; the
    frozen prefix among them), the split's shard digests, the examples held, and the settings that reach the
    prefix (where the model is cut, input size, memory layout, batch size, threads, torch version). Equal keys give
    bit-identical features."""
    h = hashlib.sha256(weights.encode())
    record = {"shards": shards, "settings": settings, "torch": torch.__version__, "format": FEATURE_CACHE_FORMAT}
    h.update(json.dumps(record, sort_keys=True).encode())
    h.update(owned.numpy().tobytes())
    return h.hexdigest()[:32]
