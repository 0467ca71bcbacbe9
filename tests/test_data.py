"""Real shards: raw files in the official formats → launch/prepare_data.py → metadata, shards, memmap cache."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import REPO, offline_env
from PIL import Image

from dpmix_dist.data import shards
from dpmix_dist.data.shards import load_split, read_metadata, write_dataset
from dpmix_dist.data.sources import (
    FASHION_MNIST_CLASSES,
    DataError,
    read_cifar,
    read_fashion_mnist,
    read_image_folder,
)
from dpmix_dist.testing import datagen

KINDS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder")


def prepare(*args: str) -> subprocess.CompletedProcess:
    """Run launch/prepare_data.py as a user would."""
    return subprocess.run(
        [sys.executable, "launch/prepare_data.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=offline_env(),
    )


def prepare_ok(*args: str) -> subprocess.CompletedProcess:
    result = prepare(*args)
    assert result.returncode == 0, result.stderr
    return result


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_clear_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and mtime."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(parent: Path) -> list[str]:
    """Temporary folders write_dataset may leave behind next to its output."""
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or p.name.endswith(".old"))


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[list[str], object]]:
    """For each kind: the prepare_data arguments and the raw data set read back with the library's readers."""
    base = tmp_path_factory.mktemp("sources")
    fm = datagen.make_fashion_mnist_idx(base / "fm", num_train=60, num_test=20, seed=3)
    c10 = datagen.make_cifar_tarball(base / "cifar-10-python.tar.gz", 10, num_train=50, num_test=20, seed=4)
    c100 = datagen.make_cifar_tarball(base / "cifar-100-python.tar.gz", 100, num_train=120, num_test=30, seed=5)
    folder = datagen.make_image_folder(base / "pets")
    downloads = base / "downloads"  # must stay unused: a --source never downloads
    return {
        "fashion_mnist": (["fashion_mnist", "--source", fm], read_fashion_mnist(fm)),
        "cifar10": (["cifar10", "--source", c10, "--download-dir", downloads], read_cifar(10, c10, downloads)),
        "cifar100": (["cifar100", "--source", c100, "--download-dir", downloads], read_cifar(100, c100, downloads)),
        "imagefolder": (["imagefolder", "--source", folder], read_image_folder(folder, None)),
    }


@pytest.fixture(scope="module")
def prepared(sources, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("prepared")
    roots = {}
    for kind, (args, _) in sources.items():
        result = prepare_ok(*args, "--out", out / kind)
        assert str(out / kind) in result.stdout
        roots[kind] = out / kind
    assert leftovers(out) == []
    return roots


# ------------------------------------------------------------------------------------------ good shards


def test_sources_are_what_datagen_wrote(sources):
    raw = sources["fashion_mnist"][1]
    assert raw.classes == FASHION_MNIST_CLASSES
    assert raw.splits["train"].images.shape == (60, 28, 28, 1)
    assert raw.splits["test"].images.shape == (20, 28, 28, 1)
    c10, c100, folder = sources["cifar10"][1], sources["cifar100"][1], sources["imagefolder"][1]
    assert c10.classes == tuple(f"class{i}" for i in range(10))
    assert c10.splits["train"].images.shape == (50, 32, 32, 3)
    assert len(c100.classes) == 100 and c100.splits["train"].images.shape == (120, 32, 32, 3)
    assert folder.classes == ("cat", "dog", "fox") and folder.splits["train"].images.shape == (12, 20, 20, 3)
    assert not (Path(sources["cifar10"][0][-1])).exists()  # nothing was downloaded


@pytest.mark.parametrize("kind", KINDS)
def test_metadata(kind, sources, prepared):
    raw, root = sources[kind][1], prepared[kind]
    meta = json.loads((root / "metadata.json").read_text())
    assert meta == read_metadata(root)
    assert meta["format_version"] == shards.FORMAT_VERSION
    assert meta["classes"] == list(raw.classes)
    assert meta["num_classes"] == len(raw.classes)
    assert set(meta["splits"]) == {"train", "test"}
    listed = set()
    for split, info in meta["splits"].items():
        images, labels = raw.splits[split].images, raw.splits[split].labels
        assert info["num_examples"] == len(labels)
        assert info["image_shape"] == list(images.shape[1:])
        assert info["class_counts"] == np.bincount(labels, minlength=len(raw.classes)).tolist()
        assert sum(info["class_counts"]) == len(labels)
        on_disk = sorted(p.name for p in root.glob(f"{split}-*.tar"))
        assert sorted(info["shards"]) == on_disk and on_disk
        for name, digest in info["shards"].items():
            assert digest == sha256(root / name)
        listed |= set(info["shards"])
    assert {p.name for p in root.iterdir()} == listed | {"metadata.json"}


@pytest.mark.parametrize("kind", KINDS)
def test_load_split_equals_source(kind, sources, prepared, tmp_path):
    raw, root = sources[kind][1], prepared[kind]
    for split in ("train", "test"):
        data = load_split(root, split, tmp_path / "cache")
        expected = raw.splits[split]
        assert data.images.dtype == np.uint8 and data.labels.dtype == np.int64
        assert data.images.shape == expected.images.shape
        np.testing.assert_array_equal(np.asarray(data.images), expected.images)  # exact, same order
        np.testing.assert_array_equal(data.labels, expected.labels)
        assert len(data) == len(expected.labels)


def test_memmap_cache_is_reused(sources, prepared, tmp_path):
    root, cache = prepared["fashion_mnist"], tmp_path / "cache"
    with pytest.raises(FileNotFoundError):
        load_split(root, "train", cache, build=False)  # nothing cached yet
    first = load_split(root, "train", cache)
    assert isinstance(first.images, np.memmap)
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    assert sorted(p.name for p in files) == ["train.images.npy", "train.labels.npy", "train.verified.json"]
    second = load_split(root, "train", cache)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == files
    third = load_split(root, "train", cache, build=False)
    np.testing.assert_array_equal(np.asarray(second.images), np.asarray(first.images))
    np.testing.assert_array_equal(third.labels, sources["fashion_mnist"][1].splits["train"].labels)


@pytest.mark.parametrize("kind", KINDS)
def test_shards_are_tar_files_readable_by_webdataset(kind, sources, prepared):
    raw, root = sources[kind][1], prepared[kind]
    meta = read_metadata(root)
    for split, info in meta["splits"].items():
        expected = raw.splits[split]
        seen = []
        for name in info["shards"]:
            path = root / name
            assert tarfile.is_tarfile(path)
            with tarfile.open(path) as tar:
                members = tar.getnames()
            assert all(m.endswith((".png", ".cls")) for m in members)
            for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
                index = int(sample["__key__"])
                image = np.asarray(Image.open(io.BytesIO(sample["png"])))
                np.testing.assert_array_equal(image.reshape(expected.images.shape[1:]), expected.images[index])
                assert int(sample["cls"]) == expected.labels[index]
                seen.append(index)
        assert seen == list(range(len(expected.labels)))


def test_many_shards_keep_the_order(sources, tmp_path, monkeypatch):
    # The real shard size is 10,000 samples; a small one exercises the multi-shard path with tiny data.
    monkeypatch.setattr(shards, "SAMPLES_PER_SHARD", 7)
    raw = sources["cifar10"][1]
    root = write_dataset(raw, tmp_path / "many")
    meta = read_metadata(root)
    assert len(meta["splits"]["train"]["shards"]) == 8  # ceil(50 / 7)
    data = load_split(root, "train", tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(data.images), raw.splits["train"].images)
    np.testing.assert_array_equal(data.labels, raw.splits["train"].labels)


# ---------------------------------------------------------------------------------- prepare_data errors


def test_existing_out_without_overwrite_is_kept(sources, prepared, tmp_path):
    root = tmp_path / "fm"
    shutil.copytree(prepared["fashion_mnist"], root)
    before = snapshot(root)
    args = sources["cifar10"][0]  # different data: the old folder must not be touched
    result = prepare(*args, "--out", root)
    assert_one_clear_error(result, str(root), "--overwrite")
    assert snapshot(root) == before
    assert leftovers(tmp_path) == []


def test_overwrite_replaces(sources, prepared, tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(prepared["fashion_mnist"], root)
    old = load_split(root, "train", cache)
    assert len(old) == 60
    prepare_ok(*sources["cifar10"][0], "--out", root, "--overwrite")
    meta = read_metadata(root)
    raw = sources["cifar10"][1]
    assert meta["name"] == "cifar10" and meta["splits"]["train"]["num_examples"] == 50
    assert (root / "train-000000.tar").read_bytes() != (prepared["fashion_mnist"] / "train-000000.tar").read_bytes()
    new = load_split(root, "train", cache)  # new shards → a new cache entry, never the stale one
    np.testing.assert_array_equal(np.asarray(new.images), raw.splits["train"].images)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["fashion_mnist", "cifar10", "imagefolder"])
def test_missing_source_is_a_clear_error(kind, tmp_path):
    missing = tmp_path / "no_such_source"
    out = tmp_path / "out"
    result = prepare(kind, "--source", missing, "--download-dir", tmp_path / "downloads", "--out", out)
    assert_one_clear_error(result, str(missing))
    assert not out.exists()
    assert not (tmp_path / "downloads").exists()
    assert leftovers(tmp_path) == []


def test_imagefolder_mixed_sizes_needs_image_size(tmp_path):
    root = datagen.make_image_folder(tmp_path / "mixed")
    Image.fromarray(np.full((24, 30, 3), 200, dtype=np.uint8)).save(root / "train" / "dog" / "odd.png")
    out = tmp_path / "out"
    result = prepare("imagefolder", "--source", root, "--out", out)
    assert_one_clear_error(result, "--image-size")
    assert not out.exists()

    prepare_ok("imagefolder", "--source", root, "--image-size", 16, "--out", out)
    meta = read_metadata(out)
    assert meta["splits"]["train"]["image_shape"] == [16, 16, 3]
    assert meta["splits"]["train"]["num_examples"] == 13
    raw = read_image_folder(root, 16)
    data = load_split(out, "train", tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(data.images), raw.splits["train"].images)
    np.testing.assert_array_equal(data.labels, raw.splits["train"].labels)


# ------------------------------------------------------------------------------------- load_split errors


def _damaged_copy(prepared: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "data"
    shutil.copytree(prepared["fashion_mnist"], root)
    return root, root / "train-000000.tar"


def _assert_data_error(root: Path, cache: Path, *needles: str) -> str:
    with pytest.raises(DataError) as info:
        load_split(root, "train", cache)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    # No half-built cache is left for a later run to trust.
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))
    return message


def test_truncated_shard(prepared, tmp_path):
    root, shard = _damaged_copy(prepared, tmp_path)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _assert_data_error(root, tmp_path / "cache", str(shard), "prepare_data")


def test_bit_flipped_shard(prepared, tmp_path):
    root, shard = _damaged_copy(prepared, tmp_path)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    _assert_data_error(root, tmp_path / "cache", str(shard), "prepare_data")


def test_missing_shard(prepared, tmp_path):
    root, shard = _damaged_copy(prepared, tmp_path)
    shard.unlink()
    _assert_data_error(root, tmp_path / "cache", str(shard), "missing", "prepare_data")


def test_cache_of_an_intact_copy_never_serves_a_damaged_one(prepared, tmp_path, sources):
    """The cache is keyed by the digests in metadata.json; a copy of the folder with a truncated shard has the same
    metadata, so the cache must also check the files it stands for (before: the damaged copy trained silently)."""
    cache = tmp_path / "cache"
    load_split(prepared["fashion_mnist"], "train", cache)  # the intact original fills the cache
    root, shard = _damaged_copy(prepared, tmp_path)
    intact = load_split(root, "train", cache)  # an identical copy: digests checked once, then the cache serves it
    np.testing.assert_array_equal(intact.labels, sources["fashion_mnist"][1].splits["train"].labels)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt"):
        load_split(root, "train", cache)
    shard.write_bytes(data)  # restored (new modification time, same bytes): re-verified and served again
    assert len(load_split(root, "train", cache)) == len(intact)
    flipped = bytearray(data)
    flipped[len(flipped) // 3] ^= 0x01  # same size: the modification time still changes, so the digest is checked
    shard.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="corrupt"):
        load_split(root, "train", cache)


def test_test_split_still_loads_when_only_train_is_damaged(prepared, tmp_path, sources):
    root, shard = _damaged_copy(prepared, tmp_path)
    shard.unlink()
    data = load_split(root, "test", tmp_path / "cache")
    np.testing.assert_array_equal(data.labels, sources["fashion_mnist"][1].splits["test"].labels)


def test_root_without_metadata(tmp_path):
    root = tmp_path / "shards_only"
    root.mkdir()
    (root / "train-000000.tar").write_bytes(b"")
    with pytest.raises(DataError) as info:
        load_split(root, "train", tmp_path / "cache")
    assert "metadata.json" in str(info.value) and str(root) in str(info.value)
    assert "prepare_data" in str(info.value)


def test_root_that_does_not_exist(tmp_path):
    with pytest.raises(DataError) as info:
        load_split(tmp_path / "nope", "train", tmp_path / "cache")
    assert str(tmp_path / "nope") in str(info.value) and "prepare_data" in str(info.value)


def test_corrupt_metadata(prepared, tmp_path):
    root, _ = _damaged_copy(prepared, tmp_path)
    (root / "metadata.json").write_text('{"format_version": 1, "splits": ')
    with pytest.raises(DataError, match="metadata.json"):
        load_split(root, "train", tmp_path / "cache")


def test_unknown_split(prepared, tmp_path):
    with pytest.raises(DataError, match="validation"):
        load_split(prepared["fashion_mnist"], "validation", tmp_path / "cache")


@pytest.mark.parametrize(
    "folder,command",
    [
        ("data/cifar100", "prepare_data.py cifar100 --out data/cifar100"),
        ("data/cifar10", "prepare_data.py cifar10 --out data/cifar10"),
        ("data/fashion_mnist", "make data"),
        ("data/fashion_mnist_2k", "make data"),
        ("data/mine", "DATASET --out data/mine"),
    ],
)
def test_missing_data_folder_names_the_command_for_its_own_data_set(folder, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"folder {folder} does not exist") as info:
        load_split(folder, "train", tmp_path / "cache")
    assert command in str(info.value)
    if "cifar" in folder:
        assert "fashion_mnist" not in str(info.value)
