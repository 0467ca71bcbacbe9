"""Readers for the raw data sets that `launch/prepare_data.py` turns into shards.

Each reader returns a `RawSplit` per split: uint8 images (N, H, W, C) and int64 labels, plus class names.
"""

from __future__ import annotations

import gzip
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpmix_dist.errors import DataError

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class RawSplit:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64


@dataclass(frozen=True)
class RawDataset:
    name: str
    classes: tuple[str, ...]
    splits: dict[str, RawSplit]
    source: str


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read idx file ({exc}); reinstall the data set") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated idx file ({body.size} bytes for shape {dims})")
    return body.reshape(dims)


def read_fashion_mnist(folder: str | Path = FASHION_MNIST_DEFAULT_DIR) -> RawDataset:
    """Fashion-MNIST from its four idx files (the Debian package `dataset-fashion-mnist` by default)."""
    folder = Path(folder)
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        paths = [
            folder / f"{prefix}-{kind}-idx{n}-ubyte{ext}"
            for kind, n in (("images", 3), ("labels", 1))
            for ext in (".gz", "")
        ]
        images_path = next((p for p in paths[:2] if p.exists()), None)
        labels_path = next((p for p in paths[2:] if p.exists()), None)
        if images_path is None or labels_path is None:
            raise DataError(
                f"{folder}: missing {prefix}-images-idx3-ubyte(.gz) or {prefix}-labels-idx1-ubyte(.gz); "
                "install them with `apt-get install dataset-fashion-mnist` or pass --source DIR"
            )
        images, labels = _read_idx(images_path), _read_idx(labels_path)
        if len(images) != len(labels):
            raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels in the {split} split")
        splits[split] = RawSplit(images[..., None].copy(), labels.astype(np.int64))
    return RawDataset("fashion_mnist", FASHION_MNIST_CLASSES, splits, str(folder))


def _cifar_from_tarball(path: Path, num_classes: int) -> RawDataset:
    """CIFAR-10/100 from the official python tarball (cifar-10-python.tar.gz / cifar-100-python.tar.gz)."""
    if num_classes == 10:
        members = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        meta_name, names_key, label_key = "batches.meta", b"label_names", b"labels"
    else:
        members = {"train": ["train"], "test": ["test"]}
        meta_name, names_key, label_key = "meta", b"fine_label_names", b"fine_labels"
    try:
        with tarfile.open(path, "r:*") as tar:
            by_base = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

            def load(base: str) -> dict:
                if base not in by_base:
                    raise DataError(f"{path}: no member {base!r}; is this the CIFAR-{num_classes} python tarball?")
                return pickle.load(tar.extractfile(by_base[base]), encoding="bytes")

            classes = tuple(n.decode() for n in load(meta_name)[names_key])
            splits = {}
            for split, bases in members.items():
                batches = [load(b) for b in bases]
                data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
                labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
                splits[split] = RawSplit(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels)
    except (tarfile.TarError, EOFError, pickle.UnpicklingError, KeyError, OSError) as exc:
        raise DataError(f"{path}: not a readable CIFAR-{num_classes} python tarball ({exc})") from None
    return RawDataset(f"cifar{num_classes}", classes, splits, str(path))


def read_cifar(num_classes: int, source: str | Path | None, download_dir: str | Path) -> RawDataset:
    """CIFAR from a local tarball (`source`), or downloaded through torchvision into `download_dir`."""
    if source is not None:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{path}: no such CIFAR tarball; pass the cifar-*-python.tar.gz file or omit --source")
        return _cifar_from_tarball(path, num_classes)
    from torchvision import datasets  # only on this path: torchvision's downloader needs the internet

    cls = datasets.CIFAR10 if num_classes == 10 else datasets.CIFAR100
    try:
        train, test = (cls(str(download_dir), train=t, download=True) for t in (True, False))
    except Exception as exc:  # noqa: BLE001 - urllib/ssl/socket errors all mean "could not download"
        raise DataError(
            f"CIFAR-{num_classes}: download failed ({type(exc).__name__}: {exc}); on a machine without internet "
            "pass --source path/to/the/python tarball"
        ) from None
    splits = {
        s: RawSplit(np.asarray(d.data, dtype=np.uint8), np.asarray(d.targets, dtype=np.int64))
        for s, d in (("train", train), ("test", test))
    }
    return RawDataset(f"cifar{num_classes}", tuple(train.classes), splits, f"torchvision:{cls.__name__}")


def read_image_folder(root: str | Path, image_size: int | None) -> RawDataset:
    """An ImageFolder tree: ROOT/train/CLASS/*.png|jpg and ROOT/test/CLASS/... (RGB, resized if asked)."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = Path(root)
    splits, classes = {}, None
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{root}: expected subfolders train/ and test/, each with one folder per class")
        folder = ImageFolder(str(root / split))
        if classes is not None and tuple(folder.classes) != classes:
            raise DataError(f"{root}: train/ and test/ have different class folders")
        classes = tuple(folder.classes)
        images = []
        for path, _ in folder.samples:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if image_size is not None:
                    img = img.resize((image_size, image_size), Image.BICUBIC)
                images.append(np.asarray(img, dtype=np.uint8))
        sizes = {im.shape for im in images}
        if len(sizes) > 1:
            raise DataError(f"{root / split}: images have different sizes {sorted(sizes)[:3]}...; pass --image-size N")
        splits[split] = RawSplit(np.stack(images), np.asarray([t for _, t in folder.samples], dtype=np.int64))
    return RawDataset(root.name, classes, splits, str(root))


SPLIT_INDICES = "source_indices.npy"
VALIDATION_INDICES = "validation_indices.npy"


def carve_validation(public_idx: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the public indices into (public train, validation), both sorted. Only public examples are ever
    candidates, so validation data is never private or test data; the choice depends on the public seed alone."""
    if not 0 < count < len(public_idx):
        raise DataError(
            f"--validation-count must be between 1 and {len(public_idx) - 1} (the public part has "
            f"{len(public_idx)} examples), got {count}"
        )
    order = np.random.default_rng([seed, 1]).permutation(len(public_idx))
    return np.sort(public_idx[order[count:]]), np.sort(public_idx[order[:count]])


def private_subset(private_idx: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` of the private indices, sorted, at positions drawn from the public seed alone: which examples are
    kept does not depend on any image or label (the subset is data-independent, so it costs no privacy)."""
    if not 0 < count <= len(private_idx):
        raise DataError(f"--subset-count must be between 1 and {len(private_idx)} (the private part), got {count}")
    positions = np.random.default_rng([seed, 2]).permutation(len(private_idx))[:count]
    return np.sort(private_idx[positions])


def split_public_private(num_examples: int, public_count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a disjoint private part and public part of a train split of `num_examples`, each sorted.

    The public part is for models that must never see the private data (e.g. the diffusion generator of
    DP-Mix_Diff); fine-tuning uses the private part only. Returns (private_idx, public_idx); the choice depends on
    the (public) seed alone.
    """
    n = num_examples
    if not 0 < public_count < n:
        raise DataError(
            f"--public-count must be between 1 and {n - 1} (the train split has {n} examples), got {public_count}"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[public_count:]), np.sort(order[:public_count])
