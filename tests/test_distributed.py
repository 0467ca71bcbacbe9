"""Contract items 1, 4-6 across real processes: W = 1, 2, 4 gloo ranks (and 2 simulated nodes) give the same
model and the same ε for the same seed; micro-batch size and feature caching do not change the result; an
interrupted run resumes exactly; ranks hold identical parameters (checked by the trainer every step here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, offline_env
from safetensors.torch import load_file

from dpmix_dist.testing.datagen import make_fashion_mnist_idx, make_synthetic_folder

pytestmark = pytest.mark.slow
SEED = "424242"


def _env() -> dict[str, str]:
    return offline_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=None)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    raw = make_fashion_mnist_idx(root / "idx", num_train=240, num_test=60)
    out = root / "shards"
    subprocess.run(
        [sys.executable, "launch/prepare_data.py", "fashion_mnist", "--source", str(raw), "--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        env=offline_env(),
    )
    return out


def _launch_cmd(num_processes: int, port: int, extra_launch: list[str] = ()) -> list[str]:
    config = "cpu_1proc.yaml" if num_processes == 1 else "cpu_2proc.yaml"
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"configs/accelerate/{config}",
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(port),
        *extra_launch,
    ]


def _train_args(shards: Path, out: Path, cache: Path, *overrides: str) -> list[str]:
    return [
        "launch/finetune.py",
        "--config",
        "tiny_test",
        "--seed",
        SEED,
        "--output-dir",
        str(out),
        f"data.root={shards}",
        f"data.cache_dir={cache}",
        "run.eval_every_epochs=0.1",
        *overrides,
    ]


def _run(num_processes: int, shards: Path, out: Path, *overrides: str, timeout: int = 300) -> dict:
    cmd = _launch_cmd(num_processes, free_port()) + _train_args(shards, out, out.parent / "cache", *overrides)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SEED not in proc.stdout + proc.stderr.replace(f"--seed {SEED}", "")
    return json.loads((out / "summary.json").read_text())


def _assert_same_model(a: Path, b: Path, atol: float = 1e-5) -> None:
    ma, mb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ma.keys() == mb.keys()
    for key in ma:
        assert torch.allclose(ma[key], mb[key], atol=atol, rtol=1e-4), key


def _trained_something(a: Path) -> None:
    head = load_file(a / "model.safetensors")["classifier.weight"]
    assert head.abs().sum() > 0  # starts at zero: the check above compares real updates


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w1") / "run"
    _run(1, shards, out)
    _trained_something(out)
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_world_size_does_not_change_the_result(shards, reference, tmp_path, world_size):
    summary = _run(world_size, shards, tmp_path / "run")
    ref = json.loads((reference / "summary.json").read_text())
    assert summary["world_size"] == world_size
    assert summary["epsilon"] == ref["epsilon"] and summary["steps"] == ref["steps"]
    assert summary["test_accuracy"] == pytest.approx(ref["test_accuracy"], abs=1 / 60 + 1e-9)
    _assert_same_model(reference, tmp_path / "run")


def test_micro_batch_size_feature_cache_and_engine_do_not_change_the_result(shards, reference, tmp_path):
    # the reference ran the default layer-wise engine; this one the generic torch.func engine
    _run(
        1,
        shards,
        tmp_path / "run",
        "performance.micro_batch_size=3",
        "performance.cache_frozen_features=false",
        "performance.engine=functorch",
    )
    _assert_same_model(reference, tmp_path / "run")


AUGMENTED = {
    "self_aug": ["augment.num_views=3"],
    "dpmix_self": ["augment.num_views=2", "augment.num_mixes=3"],
    "dpmix_diff": ["augment.num_views=2", "augment.num_mixes=3", "augment.num_synthetic=2"],
}


@pytest.mark.parametrize("method", list(AUGMENTED))
def test_world_size_does_not_change_an_augmented_run(shards, reference, tmp_path, method):
    """Each example's views, mixes and synthetic draws depend on (seed, step, example) only: 1 process (with
    another micro-batch size) and 2 processes give the same model, and the same ε as plain DP-SGD."""
    overrides = [f"augment.method={method}", *AUGMENTED[method]]
    if method == "dpmix_diff":
        classes = json.loads((shards / "metadata.json").read_text())["classes"]
        overrides.append(f"augment.synthetic_root={make_synthetic_folder(tmp_path / 'syn', classes, per_class=3)}")
    one = _run(1, shards, tmp_path / "w1", *overrides, "performance.micro_batch_size=5")
    two = _run(2, shards, tmp_path / "w2", *overrides)
    _trained_something(tmp_path / "w1")
    _assert_same_model(tmp_path / "w1", tmp_path / "w2")
    ref = json.loads((reference / "summary.json").read_text())
    assert one["method"] == two["method"] == method and one["group_size"] > 1
    assert one["epsilon"] == two["epsilon"] == ref["epsilon"] and one["steps"] == ref["steps"]
    a, b = load_file(reference / "model.safetensors"), load_file(tmp_path / "w1" / "model.safetensors")
    assert not torch.allclose(a["classifier.weight"], b["classifier.weight"])  # the method did change training


def test_different_seed_gives_a_different_model(shards, reference, tmp_path):
    out = tmp_path / "run"
    cmd = _launch_cmd(1, free_port()) + _train_args(shards, out, tmp_path / "cache")
    cmd[cmd.index(SEED)] = "7"
    subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, check=True, timeout=300)
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.allclose(a["classifier.weight"], b["classifier.weight"])


def test_two_simulated_nodes_match_one_process(shards, reference, tmp_path):
    port, out = free_port(), tmp_path / "run"
    procs = []
    for machine_rank in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            "configs/accelerate/multinode.yaml",
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
        ]
        cmd += _train_args(shards, out, tmp_path / f"cache{machine_rank}")  # node-local caches
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    _assert_same_model(reference, out)


def test_interrupted_run_resumes_to_the_same_model(shards, reference, tmp_path):
    out = tmp_path / "run"
    # slow the steps a little so the signal lands mid-run, and checkpoint every step
    cmd = _launch_cmd(2, free_port()) + _train_args(shards, out, tmp_path / "cache", "run.checkpoint_every_epochs=0.1")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 240
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    if (out / "summary.json").exists():
        pytest.skip("the run finished before the signal landed")  # fixed-size work: should not happen
    assert proc.returncode != 0
    assert (out / "checkpoint.pt").exists()
    assert (os.stat(out / "checkpoint.pt").st_mode & 0o777) == 0o600  # private artifact: holds the seed
    resumed = subprocess.run(
        _launch_cmd(2, free_port()) + _train_args(shards, out, tmp_path / "cache") + ["--resume"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (out / "checkpoint.pt").exists()
    _assert_same_model(reference, out)


def test_check_identical_detects_diverged_ranks(tmp_path):
    script = tmp_path / "diverge.py"
    script.write_text(
        "import sys, torch\n"
        "from dpmix_dist.distributed import Distributed\n"
        "d = Distributed()\n"
        "d.check_identical(torch.ones(10), 'same')\n"
        "try:\n"
        "    d.check_identical(torch.ones(10) * (1 + d.rank * 1e-6), 'parameters')\n"
        "    result = 'NOT DETECTED'\n"
        "except RuntimeError as e:\n"
        "    result = f'DETECTED {e}'\n"
        f"open(f'{tmp_path}/rank{{d.rank}}.txt', 'w').write(result)\n"
        "d.close()\n"
    )
    proc = subprocess.run(
        _launch_cmd(2, free_port()) + [str(script)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for rank in (0, 1):  # every rank sees the divergence, not only the one that differs
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith("DETECTED parameters differ across ranks")
