"""End to end: launch/finetune.py on bad input fails in one `error:` line and touches no output; a good run works.

Every case runs the real script as a subprocess on tiny shards written by launch/prepare_data.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, offline_env
from safetensors import safe_open

from dpmix_dist.config import load_config
from dpmix_dist.testing import datagen

NUM_TRAIN, NUM_TEST = 200, 50
SECRET_SEED = 918273645  # unusual, so that finding it in an output means it leaked

pytestmark = pytest.mark.slow


def run(args: list, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=offline_env()
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Fashion-MNIST-format shards (200 train / 50 test) made once for the module."""
    base = tmp_path_factory.mktemp("cli_data")
    source = datagen.make_fashion_mnist_idx(base / "idx", num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)
    result = run(["launch/prepare_data.py", "fashion_mnist", "--source", source, "--out", base / "shards"])
    assert result.returncode == 0, result.stderr
    return {"root": base / "shards", "base": base}


def finetune(
    data: dict[str, Path],
    output_dir: Path,
    overrides: list[str] = (),
    *extra: str,
    cache: Path | None = None,
    seed: int = 1,
) -> subprocess.CompletedProcess:
    cache = cache or data["base"] / "cache"
    args = [
        "launch/finetune.py",
        "--config",
        "tiny_test",
        f"data.root={data['root']}",
        f"data.cache_dir={cache}",
        *overrides,
        "--output-dir",
        output_dir,
        "--seed",
        seed,
        "--cpu",
        *extra,
    ]
    return run(args)


def populated_output(folder: Path) -> Path:
    """An output folder from an earlier run, which a failing run must leave as it is."""
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"test_accuracy": 0.91, "epsilon": 3.0}))
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    return folder


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def assert_one_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- errors found before anything is built


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["privacy.target_epsilonn=2"], ["privacy.target_epsilonn", "unknown key"]),
        (["privacy.target_epsilon=abc"], ["privacy.target_epsilon", "abc"]),
    ],
    ids=["unknown_key", "wrong_type"],
)
def test_config_errors_keep_existing_output(data, tmp_path, overrides, needles):
    out = populated_output(tmp_path / "run")
    before = snapshot(out)
    assert_one_error(finetune(data, out, overrides), *needles)
    assert snapshot(out) == before


def test_non_empty_output_dir_without_resume(data, tmp_path):
    out = populated_output(tmp_path / "run")
    before = snapshot(out)
    assert_one_error(finetune(data, out), "--output-dir", str(out), "--resume")
    assert snapshot(out) == before


def test_resume_without_checkpoint(data, tmp_path):
    out = populated_output(tmp_path / "run")
    before = snapshot(out)
    assert_one_error(finetune(data, out, [], "--resume"), "--resume", "checkpoint.pt")
    assert snapshot(out) == before


# ---------------------------------------------------- errors found once the data and the model are known


@pytest.mark.parametrize(
    "overrides, needles",
    [
        # δ = 1/N exactly (N = 200) is already too large.
        (["privacy.target_delta=0.005"], ["privacy.target_delta", str(NUM_TRAIN)]),
        (["privacy.expected_batch_size=201"], ["privacy.expected_batch_size", str(NUM_TRAIN)]),
        (["model.name=resnet5O"], ["model.name", "resnet5O"]),
    ],
    ids=["delta_too_large", "batch_larger_than_n", "unknown_model"],
)
def test_errors_that_need_the_data_or_model(data, tmp_path, overrides, needles):
    out = tmp_path / "run"
    assert_one_error(finetune(data, out, overrides), *needles)
    assert not out.exists()  # nothing was written, not even the folder


def test_missing_data_folder(data, tmp_path):
    missing = tmp_path / "no_such_data"
    out = tmp_path / "run"
    assert_one_error(finetune(data, out, [f"data.root={missing}"]), "data.root", str(missing), "prepare_data")
    assert not out.exists()


def test_corrupt_shard(data, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(data["root"], root)
    shard = root / "train-000000.tar"
    content = bytearray(shard.read_bytes())
    for offset in (600, len(content) // 2):
        content[offset] ^= 0xFF
    shard.write_bytes(bytes(content))
    out = tmp_path / "run"
    out.mkdir()  # an empty folder is a valid --output-dir: it must stay empty
    # A fresh cache: the decoded cache is keyed by the shards' recorded digests, so a shared one would be reused.
    result = finetune(data, out, [f"data.root={root}"], cache=tmp_path / "cache")
    assert_one_error(result, str(shard), "prepare_data")
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------- a good run


def test_tiny_run_succeeds_and_does_not_leak_the_seed(data, tmp_path):
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    result = finetune(data, out, cache=cache, seed=SECRET_SEED)
    assert result.returncode == 0, result.stderr[-5000:]
    assert not [line for line in result.stderr.splitlines() if line.startswith("error:")]

    summary = json.loads((out / "summary.json").read_text())
    keys = {
        "test_accuracy",
        "epsilon",
        "delta",
        "accountant",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "expected_batch_size",
        "max_grad_norm",
        "world_size",
        "method",
    }
    assert keys <= set(summary)
    config = load_config("tiny_test", [f"data.root={data['root']}", f"data.cache_dir={cache}"])
    p = config.privacy
    assert 0 < summary["epsilon"] <= p.target_epsilon
    assert summary["delta"] == p.target_delta
    assert summary["accountant"] == p.accountant
    assert summary["expected_batch_size"] == p.expected_batch_size
    assert summary["max_grad_norm"] == p.max_grad_norm
    assert summary["sample_rate"] == pytest.approx(p.expected_batch_size / NUM_TRAIN)
    assert summary["steps"] == round(p.epochs * NUM_TRAIN / p.expected_batch_size)
    assert summary["noise_multiplier"] > 0
    assert summary["world_size"] == 1
    assert summary["method"] == "dpsgd"
    assert 0.0 <= summary["test_accuracy"] <= 1.0

    # The resolved config is saved and is exactly what ran.
    assert load_config(str(out / "config.yaml")) == config
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) > 0
    assert not (out / "checkpoint.pt").exists()  # the private resume state is gone once the run is done

    # The secret seed appears nowhere: not in the logs, not in any output or cache file.
    text_needle = str(SECRET_SEED)
    assert text_needle not in result.stdout and text_needle not in result.stderr
    byte_needles = [
        text_needle.encode(),
        SECRET_SEED.to_bytes(8, "little"),
        SECRET_SEED.to_bytes(8, "big"),
        SECRET_SEED.to_bytes(4, "little"),
    ]
    files = [p for folder in (out, cache) for p in folder.rglob("*") if p.is_file()]
    assert {p.name for p in files if p.parent == out} == {"config.yaml", "model.safetensors", "summary.json"}
    for path in files:
        content = path.read_bytes()
        for needle in byte_needles:
            assert needle not in content, f"the seed leaked into {path}"
