"""WebDataset shards on disk and the node-local uint8 memmap cache that training reads.

Layout written by `write_dataset` (atomically: a temp folder renamed into place):

    ROOT/train-000000.tar ...   samples: KEY.png (the image), KEY.cls (label), KEY = global index (8 digits)
    ROOT/test-000000.tar ...
    ROOT/metadata.json          classes, per-split counts, class counts, shard names and SHA-256 digests

Poisson sampling needs random access to the private set, so `load_split` decodes a split's shards once into
`CACHE_DIR/<digest>/SPLIT.{images,labels}.npy` (uint8 N×H×W×C, at the stored resolution) and memory-maps it.
The cache is keyed by the shards' recorded digests: new shards get a new cache, a stale one is never read. It
also stands for the files on disk: each folder whose shards were checked against those digests is noted in
`SPLIT.verified.json` with every shard's size and modification time, and a load from a folder that is not
noted, or whose shards changed since, first checks their digests again (a truncated or replaced shard fails
there; it is never silently served from the cache of an intact copy).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from dpmix_dist.data.sources import DataError, RawDataset

METADATA = "metadata.json"
FORMAT_VERSION = 1
SAMPLES_PER_SHARD = 10_000


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_dataset(
    dataset: RawDataset,
    root: str | Path,
    *,
    overwrite: bool = False,
    extra: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write `dataset` as shards + metadata into `root`, all or nothing.

    `extra` adds keys to metadata.json; `extra_files` (name -> bytes) are written beside it.
    An existing `root` is kept unless `overwrite`; even then it is replaced only once the new one is complete.
    """
    root = Path(root)
    if root.exists() and not overwrite:
        raise DataError(
            f"{root} already exists; pass --overwrite to replace it (it is kept until the new one is complete)"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the data folder is meant to be shared by a node's processes
    try:
        meta = {
            "format_version": FORMAT_VERSION,
            "name": dataset.name,
            "source": dataset.source,
            "classes": list(dataset.classes),
            "num_classes": len(dataset.classes),
            "splits": {},
            **(extra or {}),
        }
        for split, raw in dataset.splits.items():
            if raw.images.ndim != 4 or raw.images.dtype != np.uint8:
                raise DataError(f"{split}: images must be uint8 N×H×W×C, got {raw.images.dtype} {raw.images.shape}")
            with wds.ShardWriter(str(tmp / f"{split}-%06d.tar"), maxcount=SAMPLES_PER_SHARD, verbose=0) as sink:
                for index, (image, label) in enumerate(zip(raw.images, raw.labels)):
                    sink.write({"__key__": f"{index:08d}", "png": _png(image), "cls": int(label)})
            shards = sorted(p.name for p in tmp.glob(f"{split}-*.tar"))
            meta["splits"][split] = {
                "num_examples": int(len(raw.labels)),
                "image_shape": list(raw.images.shape[1:]),
                "class_counts": np.bincount(raw.labels, minlength=len(dataset.classes)).tolist(),
                "shards": {name: _sha256(tmp / name) for name in shards},
            }
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / METADATA).write_text(json.dumps(meta, indent=2))
        if root.exists():
            old = root.with_name(f".{root.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            root.rename(old)
            tmp.rename(root)
            shutil.rmtree(old)
        else:
            tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def read_metadata(root: str | Path) -> dict:
    """metadata.json of a prepared data folder, with a clear error when the folder is not one."""
    root = Path(root)
    path = root / METADATA
    if not root.is_dir():
        raise DataError(f"data.root: folder {root} does not exist; create it with {_prepare_hint(root)}")
    if not path.is_file():
        raise DataError(f"data.root: {root} has no {METADATA}; it was not written by launch/prepare_data.py")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupt JSON ({exc}); re-create the folder with launch/prepare_data.py") from None
    if meta.get("format_version") != FORMAT_VERSION or "splits" not in meta:
        raise DataError(f"{path}: unknown format; re-create the folder with launch/prepare_data.py")
    return with_partition_key(meta)


def with_partition_key(meta: dict) -> dict:
    """Folders and generator records written before the public/private record was renamed called it "split" (a
    word that means train/test elsewhere in the metadata); read them under the new name, "partition"."""
    if "split" in meta:
        meta.setdefault("partition", meta.pop("split"))
    trained_on = ((meta.get("synthetic") or {}).get("generator_info") or {}).get("trained_on") or meta.get("trained_on")
    if isinstance(trained_on, dict) and "split" in trained_on:
        trained_on.setdefault("partition", trained_on.pop("split"))
    return meta


# The command that writes each data set's folder, recognised from the folder's name (longest name first).
_PREPARE = {
    "fashion_mnist_2k": "`make data` (it writes data/fashion_mnist_2k with its parent split)",
    "fashion_mnist": "`make data`, or `python launch/prepare_data.py fashion_mnist --out {root}`",
    "cifar100": "`python launch/prepare_data.py cifar100 --out {root}` (downloads once; or --source TARBALL)",
    "cifar10": "`python launch/prepare_data.py cifar10 --out {root}` (downloads once; or --source TARBALL)",
}


def _prepare_hint(root: Path) -> str:
    name = root.name.lower().replace("-", "_")
    for key in sorted(_PREPARE, key=len, reverse=True):
        if name.startswith(key) and (key != "fashion_mnist_2k" or name == key):
            return _PREPARE[key].format(root=root)
    return (
        f"`python launch/prepare_data.py DATASET --out {root}` (DATASET: fashion_mnist, cifar10, cifar100, or "
        "imagefolder --source DIR for your own images)"
    )


@dataclass(frozen=True)
class Split:
    """A decoded split: memory-mapped uint8 images (N, H, W, C) and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _all_shards(urls):
    return urls


def _decode_shards(root: Path, split: str, info: dict) -> tuple[np.ndarray, np.ndarray]:
    n, shape = info["num_examples"], tuple(info["image_shape"])
    images = np.zeros((n, *shape), dtype=np.uint8)
    labels = np.full(n, -1, dtype=np.int64)
    _verify_shards(root, info)
    for name in info["shards"]:
        path = root / name
        try:
            # Every node decodes every shard into its own cache (ranks own examples by index, not by shard),
            # so no node splitting: the identity nodesplitter says so to webdataset.
            samples = wds.WebDataset(str(path), shardshuffle=False, empty_check=False, nodesplitter=_all_shards)
            for sample in samples:
                index = int(sample["__key__"])
                image = np.asarray(Image.open(io.BytesIO(sample["png"])))
                images[index] = image.reshape(shape)
                labels[index] = int(sample["cls"])
        except (tarfile.TarError, OSError, ValueError, KeyError, IndexError) as exc:
            raise DataError(
                f"{path}: shard is unreadable ({type(exc).__name__}: {exc}); re-create it with launch/prepare_data.py"
            ) from None
    if (labels < 0).any():
        raise DataError(
            f"{root}: {int((labels < 0).sum())} {split} examples missing from the shards; re-create the folder"
        )
    return images, labels


def shards_digest(shards: dict[str, str]) -> str:
    """SHA-256 of a split's shard list (name -> digest): names the decoded cache, and a run's training data."""
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()


def load_split(root: str | Path, split: str, cache_dir: str | Path, *, build: bool = True) -> Split:
    """Memory-map a split's decoded cache, decoding the shards first if needed (and `build`)."""
    root = Path(root)
    meta = read_metadata(root)
    if split not in meta["splits"]:
        raise DataError(f"{root}: no {split!r} split in {METADATA}")
    info = meta["splits"][split]
    key = shards_digest(info["shards"])[:16]
    folder = Path(cache_dir) / key
    images_path, labels_path = folder / f"{split}.images.npy", folder / f"{split}.labels.npy"
    verified_path = folder / f"{split}.verified.json"
    if not (images_path.exists() and labels_path.exists()):
        if not build:
            raise FileNotFoundError(images_path)
        images, labels = _decode_shards(root, split, info)  # checks every digest
        folder.mkdir(parents=True, exist_ok=True)
        for path, array in ((images_path, images), (labels_path, labels)):
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npy.partial")
            with os.fdopen(fd, "wb") as f:
                np.save(f, array)
            os.replace(tmp, path)  # atomic: a reader never sees a half-written cache
        _note_verified(verified_path, root, info)
    elif _stamps(root, info) != _read_json(verified_path).get(str(root.resolve())):
        _verify_shards(root, info)  # another copy, or files changed since: the cache stands for them only if equal
        _note_verified(verified_path, root, info)
    return Split(np.load(images_path, mmap_mode="r"), np.load(labels_path))


def _stamps(root: Path, info: dict) -> dict | None:
    """Size and modification time of every shard (None if one is missing): cheap to compare on every load."""
    stamps = {}
    for name in info["shards"]:
        try:
            st = (root / name).stat()
        except FileNotFoundError:
            return None
        stamps[name] = [st.st_size, st.st_mtime_ns]
    return stamps


def _verify_shards(root: Path, info: dict) -> None:
    for name, digest in info["shards"].items():
        path = root / name
        if not path.is_file():
            raise DataError(
                f"{path}: shard listed in {METADATA} is missing; re-create the folder with launch/prepare_data.py"
            )
        if _sha256(path) != digest:
            raise DataError(
                f"{path}: shard is corrupt (checksum mismatch); re-create the folder with launch/prepare_data.py"
            )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _note_verified(path: Path, root: Path, info: dict) -> None:
    """Record that `root`'s shards, as they are now, match the digests the cache was decoded from."""
    noted = _read_json(path)
    noted[str(root.resolve())] = _stamps(root, info)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.partial")
    with os.fdopen(fd, "w") as f:
        json.dump(noted, f)
    os.replace(tmp, path)
