"""Writing a source data set as shard folders, partitioned into a public part, the private rest and a subset.

The partition record (`"partition"` in each folder's metadata.json) is what `data/provenance.py` checks later: the
source, the split seed, the counts and SHA-256 digests of the source indices of either part. All index choices
depend only on the split seed, which is public.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpmix_dist.data.shards import write_dataset
from dpmix_dist.data.sources import (
    SPLIT_INDICES,
    VALIDATION_INDICES,
    RawDataset,
    RawSplit,
    carve_validation,
    private_subset,
    split_public_private,
)


@dataclass(frozen=True)
class PartitionRequest:
    """Where the parts go and how large they are (the options of launch/prepare_data.py)."""

    out: Path
    public_out: Path
    public_count: int
    validation_count: int | None = None
    subset_out: Path | None = None
    subset_count: int | None = None
    split_seed: int = 0
    overwrite: bool = False


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()


def _with(dataset: RawDataset, name: str, train_idx: np.ndarray, validation_idx: np.ndarray | None) -> RawDataset:
    """`dataset` with its train split cut to `train_idx` (source indices) and, if given, a validation split."""
    train = dataset.splits["train"]
    splits = {**dataset.splits, "train": RawSplit(train.images[train_idx], train.labels[train_idx])}
    if validation_idx is not None:
        splits["validation"] = RawSplit(train.images[validation_idx], train.labels[validation_idx])
    return RawDataset(name, dataset.classes, splits, dataset.source)


def write_partition(dataset: RawDataset, args: PartitionRequest) -> list[tuple[Path, RawDataset]]:
    """The private part (`args.out`), the public part and, if asked, the private subset, each recording the
    partition in metadata.json and its source indices in source_indices.npy. Returns (folder, data set) per part."""
    private_idx, public_idx = split_public_private(
        len(dataset.splits["train"].labels), args.public_count, args.split_seed
    )
    public_train_idx, validation_idx = public_idx, None
    if args.validation_count is not None:
        public_train_idx, validation_idx = carve_validation(public_idx, args.validation_count, args.split_seed)
    partition = {
        "source_split": "train",
        "source_num_examples": int(len(private_idx) + len(public_idx)),
        "split_seed": args.split_seed,
        "public_count": int(len(public_idx)),
        "private_count": int(len(private_idx)),
        "public_indices_sha256": _digest(public_idx),  # the whole public part (its train split and validation)
        "private_indices_sha256": _digest(private_idx),
        "indices_file": SPLIT_INDICES,  # the source indices of this folder's train split
    }
    files = {}
    if validation_idx is not None:
        partition.update(
            validation_count=int(len(validation_idx)),
            validation_indices_sha256=_digest(validation_idx),
            validation_indices_file=VALIDATION_INDICES,
        )
        files[VALIDATION_INDICES] = _npy(validation_idx)
    parts = [
        ("private", private_idx, dataset.name, args.out, {}),
        ("public", public_train_idx, f"{dataset.name}_public", args.public_out, {}),
    ]
    if args.subset_out is not None:
        subset_idx = private_subset(private_idx, args.subset_count, args.split_seed)
        subset = {
            "of": str(args.out),
            "count": int(len(subset_idx)),
            "seed": args.split_seed,
            "indices_sha256": _digest(subset_idx),
        }
        parts.append(("private", subset_idx, f"{dataset.name}_{len(subset_idx)}", args.subset_out, {"subset": subset}))
    written = []
    for role, idx, name, out, extra in parts:
        partner = args.out if role == "public" else args.public_out
        meta = {"partition": {"role": role, "partner": str(partner), **partition}, **extra}
        part = _with(dataset, name, idx, validation_idx)
        root = write_dataset(
            part, out, overwrite=args.overwrite, extra=meta, extra_files={SPLIT_INDICES: _npy(idx), **files}
        )
        written.append((root, part))
    return written
