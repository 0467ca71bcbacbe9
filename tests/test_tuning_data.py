"""The data of a fair comparison: a validation split carved from the PUBLIC part (for choosing settings) and a
data-independent private subset (the small-data regime), both one `prepare_data.py` command and recorded."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, offline_env

from dpmix_dist.data.shards import load_split, read_metadata
from dpmix_dist.data.sources import read_fashion_mnist
from dpmix_dist.testing.datagen import make_fashion_mnist_idx


def _prepare(raw: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "launch/prepare_data.py",
        "fashion_mnist",
        "--source",
        str(raw),
        "--out",
        str(root / "private"),
        "--public-out",
        str(root / "public"),
        "--public-count",
        "100",
        "--split-seed",
        "5",
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=offline_env())


def _sha(indices: np.ndarray) -> str:
    return hashlib.sha256(indices.astype(np.int64).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tuning")
    raw = make_fashion_mnist_idx(root / "idx", num_train=300, num_test=40, seed=1)
    proc = _prepare(raw, root, "--validation-count", "30", "--subset-out", str(root / "subset"), "--subset-count", "50")
    assert proc.returncode == 0, proc.stderr
    return root, raw


def test_validation_is_public_and_disjoint_from_everything_else(prepared):
    root, raw = prepared
    public_train = np.load(root / "public" / "source_indices.npy")
    private = np.load(root / "private" / "source_indices.npy")
    validation = np.load(root / "public" / "validation_indices.npy")
    assert len(validation) == 30 and len(public_train) == 70 and len(private) == 200
    assert not set(validation.tolist()) & set(public_train.tolist())  # the generator never trains on it
    assert not set(validation.tolist()) & set(private.tolist())  # never private data
    assert sorted([*validation, *public_train, *private]) == list(range(300))
    source = read_fashion_mnist(raw)
    for folder in ("private", "public", "subset"):
        meta = read_metadata(root / folder)
        assert meta["partition"]["validation_indices_sha256"] == _sha(validation)
        assert meta["partition"]["public_indices_sha256"] == _sha(np.sort(np.concatenate([public_train, validation])))
        val = load_split(root / folder, "validation", root / "cache")
        np.testing.assert_array_equal(np.asarray(val.images), source.splits["train"].images[validation])
        test = load_split(root / folder, "test", root / "cache")  # the test split is the source's, untouched
        np.testing.assert_array_equal(test.labels, source.splits["test"].labels)


def test_subset_is_private_recorded_and_data_independent(prepared, tmp_path):
    root, raw = prepared
    private = np.load(root / "private" / "source_indices.npy")
    subset = np.load(root / "subset" / "source_indices.npy")
    assert len(subset) == 50 and set(subset.tolist()) <= set(private.tolist())
    meta = read_metadata(root / "subset")
    assert meta["partition"]["role"] == "private" and meta["partition"]["partner"] == str(root / "public")
    assert meta["subset"] == {"of": str(root / "private"), "count": 50, "seed": 5, "indices_sha256": _sha(subset)}
    assert meta["splits"]["train"]["num_examples"] == 50
    source = read_fashion_mnist(raw).splits["train"]
    train = load_split(root / "subset", "train", root / "cache")
    np.testing.assert_array_equal(np.asarray(train.images), source.images[subset])
    # other pixels and labels, same sizes and seed: the very same indices (nothing depends on the data)
    other_raw = make_fashion_mnist_idx(tmp_path / "idx", num_train=300, num_test=40, seed=99)
    proc = _prepare(
        other_raw,
        tmp_path,
        "--validation-count",
        "30",
        "--subset-out",
        str(tmp_path / "subset"),
        "--subset-count",
        "50",
    )
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "subset" / "source_indices.npy"), subset)
    np.testing.assert_array_equal(
        np.load(tmp_path / "public" / "validation_indices.npy"), np.load(root / "public" / "validation_indices.npy")
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--subset-out", "S", "--subset-count", "500"], "--subset-count must be between 1 and 200"),
        (["--validation-count", "100"], "--validation-count must be between 1 and 99"),
        (["--subset-out", "S"], "--subset-out DIR and --subset-count N go together"),
    ],
)
def test_bad_counts_fail_before_anything_is_written(prepared, tmp_path, extra, message):
    _, raw = prepared
    extra = [str(tmp_path / "subset") if a == "S" else a for a in extra]
    proc = _prepare(raw, tmp_path, *extra)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not any(tmp_path.glob("*/metadata.json"))


def test_runs_evaluate_on_validation_without_touching_the_test_split(prepared, tmp_path):
    root, _ = prepared
    args = [
        sys.executable,
        "launch/finetune.py",
        "--config",
        "tiny_test",
        "--output-dir",
        str(tmp_path / "run"),
        f"data.root={root / 'subset'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.eval_split=validation",
        "privacy.expected_batch_size=10",
        "privacy.epochs=1",
        "tracking.enabled=false",
    ]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=offline_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_split"] == "validation" and 0 <= summary["validation_accuracy"] <= 1
    assert "test_accuracy" not in summary and all("test_accuracy" not in h for h in summary["history"])
    assert "validation accuracy" in proc.stdout


def test_eval_split_validation_without_one_says_how_to_make_it(prepared, tmp_path):
    _, raw = prepared
    assert _prepare(raw, tmp_path).returncode == 0  # no --validation-count
    proc = subprocess.run(
        [
            sys.executable,
            "launch/finetune.py",
            "--config",
            "tiny_test",
            "--output-dir",
            str(tmp_path / "run"),
            f"data.root={tmp_path / 'private'}",
            "data.eval_split=validation",
            f"data.cache_dir={tmp_path / 'cache'}",
            "tracking.enabled=false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=offline_env(),
    )
    assert proc.returncode == 2 and "has no validation split" in proc.stderr and "--validation-count" in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
