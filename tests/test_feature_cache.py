"""Frozen features reused across runs (a sweep's runs share data and model): a hit is bit-identical to computing
them, and anything the features depend on (weights, data, input size) changes the key; dpmix_diff's unmixed
synthetic members come from a per-run cache that equals the prefix on each image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dpmix_dist.config import load_config
from dpmix_dist.data.shards import write_dataset
from dpmix_dist.data.sources import RawDataset, RawSplit
from dpmix_dist.distributed import Distributed
from dpmix_dist.testing.datagen import class_images, make_synthetic_folder
from dpmix_dist.train import Trainer

CLASSES = [f"c{i}" for i in range(10)]
SEED = 99


def _write(root: Path, seed: int) -> Path:
    labels = np.arange(48) % 10
    splits = {
        "train": RawSplit(class_images(labels, 28, 1, seed), labels),
        "test": RawSplit(class_images(labels[:20], 28, 1, 5), labels[:20]),
    }
    return write_dataset(RawDataset("fashion_mnist", tuple(CLASSES), splits, "tests"), root)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("featcache")
    return {
        "a": _write(root / "a", 1),
        "b": _write(root / "b", 2),
        "root": root,
        "syn": make_synthetic_folder(root / "syn", CLASSES, per_class=4),
    }


def _trainer(data: dict, cache: Path, *extra: str, root: str = "a") -> Trainer:
    overrides = [
        f"data.root={data[root]}",
        f"data.cache_dir={cache}",
        "model.trainable=head",
        "model.num_trainable_blocks=null",
        *extra,
    ]  # tiny_test trains its last 2 blocks: the head only
    return Trainer(load_config("tiny_test", overrides), Distributed(cpu=True), data["root"], SEED)


def _files(cache: Path) -> set[str]:
    return {p.name for p in (cache / "features").glob("*.pt")}


def test_second_run_loads_bit_identical_features_and_trains_identically(data, tmp_path):
    cache = tmp_path / "cache"
    first = _trainer(data, cache)
    assert len(_files(cache)) == 2  # train and test features of this model on this data
    second = _trainer(data, cache)
    assert len(_files(cache)) == 2  # reused, not recomputed under a new name
    for a, b in ((first.train_store, second.train_store), (first.eval_store, second.eval_store)):
        assert torch.equal(a.cached, b.cached)
    without = _trainer(data, tmp_path / "other", "performance.feature_cache_on_disk=false")
    assert not (tmp_path / "other" / "features").exists()
    for t in (first, second, without):
        t.train_step(t.train_store)
    for name in first.params:
        assert torch.equal(first.params[name], second.params[name])
        assert torch.equal(first.params[name], without.params[name])


def test_what_the_features_depend_on_changes_the_key(data, tmp_path):
    cache = tmp_path / "cache"
    _trainer(data, cache)
    base = _files(cache)
    _trainer(data, cache, root="b")  # other images
    other_data = _files(cache) - base
    assert len(other_data) == 2
    _trainer(data, cache, "data.image_size=36")  # another input size
    assert len(_files(cache) - base - other_data) == 2
    trainer = _trainer(data, cache, "model.trainable=last_blocks", "model.num_trainable_blocks=1")  # another cut
    assert trainer.train_store.cached.ndim == 4 and len(_files(cache)) == 8


def test_synthetic_members_come_from_a_cache_equal_to_the_prefix(data, tmp_path):
    trainer = _trainer(
        data,
        tmp_path / "cache",
        "augment.method=dpmix_diff",
        "augment.num_views=2",
        "augment.num_mixes=2",
        "augment.num_synthetic=2",
        f"augment.synthetic_root={data['syn']}",
    )
    synthetic = trainer.groups.synthetic
    assert trainer.synthetic_store is not None and len(trainer.synthetic_store) == len(synthetic)
    with torch.no_grad():
        for j in (0, 7, len(synthetic) - 1):
            direct = trainer.dp_model.cut.prefix(trainer._to_input(synthetic.images[[j]]))
            torch.testing.assert_close(
                trainer.synthetic_store.features(torch.tensor([j])), direct, rtol=1e-5, atol=1e-6
            )
    # with feature caching off, nothing is cached and every member runs the prefix (the same groups)
    plain = _trainer(
        data,
        tmp_path / "cache2",
        "augment.method=dpmix_diff",
        "augment.num_views=2",
        "augment.num_mixes=2",
        "augment.num_synthetic=2",
        f"augment.synthetic_root={data['syn']}",
        "performance.cache_frozen_features=false",
    )
    assert plain.synthetic_store is None
    chunk = torch.arange(8)
    cached_inputs, targets = trainer._groups(trainer.train_store, chunk)
    plain_inputs, plain_targets = plain._groups(plain.train_store, chunk)
    torch.testing.assert_close(cached_inputs, plain_inputs, rtol=1e-5, atol=1e-6)
    assert torch.equal(targets, plain_targets)
