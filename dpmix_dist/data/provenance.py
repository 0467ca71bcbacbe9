"""Which data may go where: the private set trains, public data may be mixed in, nothing crosses over.

The refusals of the trainer live here, in one place:

- `check_private_root`: fine-tuning trains on the private part of a split, never on its public part or on
  synthetic images.
- `check_synthetic_root`: DP-Mix_Diff mixes synthetic images into a private example's group. Its guarantee treats
  them as public, so they must come from a generator that provably never saw the private set. That is decided by
  an ALLOWLIST, not by spotting known-bad cases:
    1. a generator trained here (launch/train_diffusion.py records the split of the folder it trained on): its
       training data is the public part of the very split the private folder belongs to (the same source and
       split seed, the same public/private index digests), and, where both folders keep their source indices,
       the two index sets are checked to be disjoint; or
    2. a generator declared an external pretrained model in the generation record (`generator.external_pretrained`,
       e.g. Stable Diffusion from the hub, trained by others on data that does not contain the private set).
  Anything else is refused, with what would make it acceptable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpmix_dist.data.shards import read_metadata
from dpmix_dist.errors import DataError

# What identifies a public/private split: equal values mean the same partition of the same source.
_PARTITION_IDENTITY = (
    "source_split",
    "source_num_examples",
    "split_seed",
    "public_indices_sha256",
    "private_indices_sha256",
)


def check_private_root(root: str, metadata: dict) -> None:
    """A DataError unless `root` holds private training data (not the public part of a split, not synthetic)."""
    partition = metadata.get("partition") or {}
    if partition.get("role") == "public":
        raise DataError(
            f"data.root: {root} is the public part of a public/private split (for the diffusion generator); "
            f"private fine-tuning trains on the private part: {partition['partner']}"
        )
    if metadata.get("synthetic"):
        raise DataError(f"data.root: {root} holds synthetic images; point it at the private data set")


def check_synthetic_root(root: str, private_metadata: dict, private_root: str) -> None:
    """A DataError unless `root` is a synthetic folder written by launch/generate.py, with the private data's
    classes in the same order, from a generator on the allowlist (module docstring)."""
    if not (Path(root) / "metadata.json").is_file():
        raise DataError(
            f"augment.synthetic_root: {root} is not a folder written by launch/generate.py (no "
            "metadata.json); make one with `make synthetic` (data/fmnist_synthetic)"
        )
    meta = read_metadata(root)
    record = meta.get("synthetic")
    if not record:
        raise DataError(
            f"augment.synthetic_root: {root} is not a synthetic set (no 'synthetic' record in its "
            "metadata.json); DP-Mix_Diff may only mix public images. Write one with launch/generate.py"
        )
    if meta["classes"] != private_metadata["classes"]:
        raise DataError(
            f"augment.synthetic_root: {root} has classes {meta['classes']}, the private data "
            f"{private_metadata['classes']}; generate with the private data's class list, in its order"
        )
    trained_on = (record.get("generator_info") or {}).get("trained_on")
    if trained_on:
        _check_trained_on_public_part(root, trained_on, private_metadata, private_root)
        return
    if record.get("external_pretrained"):
        return
    raise DataError(
        f"augment.synthetic_root: {root} does not say what its generator ({record.get('generator')}) was trained "
        "on, so its images cannot be treated as public. Either train the generator on the public part of the "
        "private data's split (launch/train_diffusion.py records it; `make synthetic`), or, for a pretrained model "
        "made by others that never saw the private set (e.g. Stable Diffusion from the hub), declare it with "
        "generator.external_pretrained=true in the generate config and render the images again"
    )


def _check_trained_on_public_part(root: str, trained_on: dict, private_metadata: dict, private_root: str) -> None:
    partition, private_partition = trained_on.get("partition") or {}, private_metadata.get("partition") or {}
    fix = (
        "train the generator on the public part of the private data's split "
        f"({private_partition.get('partner', 'launch/prepare_data.py --public-out')}) with launch/train_diffusion.py"
    )
    trained_root = trained_on.get("root")
    if (
        trained_root
        and Path(trained_root).resolve() == Path(private_root).resolve()
        or partition.get("role") == "private"
    ):
        raise DataError(
            f"augment.synthetic_root: {root} comes from a generator trained on the private data ({trained_root}); {fix}"
        )
    if partition.get("role") != "public" or private_partition.get("role") != "private":
        raise DataError(
            f"augment.synthetic_root: {root} comes from a generator trained on {trained_root}, which is not "
            "recorded as the public part of a public/private split (it may contain private examples); "
            f"{fix}"
        )
    differs = [
        k for k in _PARTITION_IDENTITY if partition.get(k) is None or partition.get(k) != private_partition.get(k)
    ]
    if differs:
        raise DataError(
            f"augment.synthetic_root: {root} comes from a generator trained on the public part of another "
            f"split than the private data's ({', '.join(differs)} differ), so the two sets are not known "
            f"to be disjoint; {fix}"
        )
    public_indices = _source_indices(trained_root, partition)
    private_indices = _source_indices(private_root, private_partition)
    if (
        public_indices is not None
        and private_indices is not None
        and np.intersect1d(public_indices, private_indices).size
    ):
        raise DataError(
            f"augment.synthetic_root: {root}: the generator's training images and the private set share "
            f"source examples (by their recorded source indices); {fix}"
        )


def _source_indices(root: str | None, partition: dict) -> np.ndarray | None:
    """The positions in the source split that a folder's train images came from, when it keeps them."""
    name = partition.get("indices_file")
    if not root or not name or not (Path(root) / name).is_file():
        return None
    return np.load(Path(root) / name)
