"""ZeRO stages 1 and 2 across real gloo processes (contract item 5, sharded): the same model and ε as the
replicated run at W = 2 and W = 1; with nothing sampled the released update is pure noise σC/(qN) on every
coordinate, each noised once, at W = 1, 2, 4; each rank holds about 1/W of the optimizer state."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, accelerate_launch, offline_env, prepare_data
from safetensors.torch import load_file

from dpmix_dist.privacy.noise import gaussian_noise_slice
from dpmix_dist.testing.datagen import make_fashion_mnist_idx

pytestmark = pytest.mark.slow
SEED = "515151"
ADAM = [
    "optim.name=adam",
    "optim.lr=0.01",
    "optim.momentum=null",
]  # optimizer state to shard: two moments and a step per coordinate


def _env(**extra) -> dict[str, str]:
    return offline_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=None, **extra)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    raw = make_fashion_mnist_idx(root / "idx", num_train=240, num_test=60)
    out = root / "shards"
    prepare_data("fashion_mnist", "--source", str(raw), "--out", str(out))
    return out


def _run(shards: Path, out: Path, num_processes: int, *overrides: str, config: str = "cpu_2proc.yaml", env=None):
    cmd = accelerate_launch(num_processes, config) + [
        "launch/finetune.py",
        "--config",
        "tiny_test",
        "--seed",
        SEED,
        "--output-dir",
        str(out),
        f"data.root={shards}",
        f"data.cache_dir={out.parent / 'cache'}",
        *ADAM,
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def _assert_same_model(a: Path, b: Path) -> None:
    ma, mb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ma.keys() == mb.keys()
    for key in ma:
        assert torch.allclose(ma[key], mb[key], atol=1e-5, rtol=1e-4), key
    assert ma["classifier.weight"].abs().sum() > 0  # it starts at zero: the comparison is of real updates


@pytest.fixture(scope="module")
def replicated_w1(shards, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("w1") / "run"
    return out, _run(shards, out, 1)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stages_at_two_ranks_give_the_model_and_epsilon_of_one_process(shards, replicated_w1, tmp_path, stage):
    reference, ref = replicated_w1
    summary = _run(shards, tmp_path / "run", 2, f"performance.zero_stage={stage}")
    assert summary["world_size"] == 2 and summary["zero_stage"] == stage
    assert summary["epsilon"] == ref["epsilon"] and summary["steps"] == ref["steps"]
    _assert_same_model(reference, tmp_path / "run")
    # Adam's state at W = 2: half the moments per rank under ZeRO (one more float where the split is uneven)
    ratio = summary["optimizer_state_bytes_per_rank"] / ref["optimizer_state_bytes_per_rank"]
    assert ratio == 1.0 if stage == 0 else abs(ratio - 0.5) < 0.01, ratio


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="accelerate's DeepSpeed launcher needs it")
def test_the_accelerate_deepspeed_zero2_config_selects_stage_2(shards, replicated_w1, tmp_path):
    reference, _ = replicated_w1
    summary = _run(shards, tmp_path / "run", 2, config="deepspeed_zero2.yaml")
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2
    _assert_same_model(reference, tmp_path / "run")


PURE_NOISE = """
import sys, torch
from dpmix_dist.distributed import Distributed
from dpmix_dist.privacy.mechanism import PrivateGradient
from dpmix_dist.zero import mechanism_reduction

shapes = {"w": torch.Size([131075, 2]), "b": torch.Size([999])}  # 263149 coordinates: across a chunk edge
with Distributed(cpu=True) as dist:
    mech = PrivateGradient(shapes, noise_multiplier=1.3, max_grad_norm=0.7, expected_batch_size=40.0, secret_seed=9,
                           world_size=dist.world_size, **mechanism_reduction(int(sys.argv[2]), dist))
    width = -(-mech.numel // dist.world_size)
    released = []
    for step in range(3):
        mech.begin_step(step)
        mech.accumulate({k: torch.zeros(4, *s) for k, s in shapes.items()})  # four sampled, all gradients zero
        shard = mech.finish_step()
        padded = torch.zeros(width)
        padded[: shard.numel()] = shard
        released.append(dist.all_gather_rows(padded).reshape(-1)[: mech.numel])
    if dist.is_main:
        torch.save({"released": torch.stack(released), "owned": mech.owned}, sys.argv[1])
"""


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_zero_gradients_release_pure_noise_on_every_coordinate_once(tmp_path, world_size):
    """Reduce-scatter (stage 2) over real ranks, every clipped gradient zero: the gathered release equals the noise
    drawn whole, σC/(qN) per coordinate: no coordinate without noise, none noised twice (either would differ)."""
    script, result = tmp_path / "pure_noise.py", tmp_path / "released.pt"
    script.write_text(PURE_NOISE)
    cmd = accelerate_launch(world_size) + [str(script), str(result), "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    released = torch.load(result)["released"]
    numel, expected_std = released.shape[1], 1.3 * 0.7 / 40.0
    for step in range(3):
        assert torch.equal(released[step], gaussian_noise_slice(9, step, 0, numel, 1.3 * 0.7) / 40.0)
    assert abs(released.double().std().item() / expected_std - 1) < 5 / (2 * released.numel()) ** 0.5
    width = -(-numel // world_size)
    for r in range(world_size):  # each rank's shard alone: the same std (0 or √2 times it would show)
        part = released[:, r * width : (r + 1) * width].double()
        assert abs(part.std().item() / expected_std - 1) < 5 / (2 * part.numel()) ** 0.5


SHARDED_RESUME = """
import shutil, sys, torch
from pathlib import Path
from dpmix_dist.config import load_config
from dpmix_dist.distributed import Distributed
from dpmix_dist.train import Trainer

data, root, mode, stage = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
overrides = [f"data.root={data}", f"data.cache_dir={root / 'cache'}", "optim.name=adam", "optim.lr=0.01",
             "optim.momentum=null", "privacy.epochs=2", f"performance.zero_stage={stage}"]
with Distributed(cpu=True) as dist:
    def trainer(out):
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        return Trainer(load_config("tiny_test", overrides), dist, out, secret_seed=77)
    if mode == "straight_and_checkpoint":
        trainer(root / "straight").train()
        t = trainer(root / "stopped")
        for _ in range(3):
            t.train_step(t.train_store)
        t._save_checkpoint()
    else:  # resume a copy of the stopped run at this world size and stage
        if dist.is_main:
            shutil.copytree(root / "stopped", root / mode)
        t = trainer(root / mode)
        t.resume()
        assert t.step == 3
        t.train()
"""


def test_zero_checkpoints_are_one_shard_file_per_rank_and_resume_at_any_world_size(shards, tmp_path):
    """ZeRO-2 at W = 2: each rank writes its own optimizer shard (nothing is gathered), `checkpoint.pt` names both
    files; resumed at W = 2 the run ends bit-identical to an uninterrupted one, and resumed at W = 3 (ranks whose
    coordinates straddle the two files) or W = 1 replicated, equal to float tolerance."""
    script = tmp_path / "sharded_resume.py"
    script.write_text(SHARDED_RESUME)

    def launch(world_size: int, mode: str, stage: int) -> None:
        cmd = accelerate_launch(world_size) + [str(script), str(shards), str(tmp_path), mode, str(stage)]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(2, "straight_and_checkpoint", 2)
    stopped = tmp_path / "stopped"
    files = sorted(p.name for p in stopped.glob("optimizer-shard-*"))
    assert files == [f"optimizer-shard-{r:04d}-of-0002-step000000003.pt" for r in range(2)]
    manifest = torch.load(stopped / "checkpoint.pt", weights_only=False)["optimizer"]["zero_shards"]
    numel = manifest[-1]["stop"]
    assert [(e["file"], e["start"]) for e in manifest] == [(files[0], 0), (files[1], manifest[0]["stop"])]
    for entry in manifest:  # each file holds its own rank's Adam moments only
        shard = torch.load(stopped / entry["file"], weights_only=False)
        assert shard["state"]["exp_avg"].numel() == entry["stop"] - entry["start"] <= -(-numel // 2)

    launch(2, "resumed_w2", 2)
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed_w2" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not list((tmp_path / "resumed_w2").glob("optimizer-shard-*"))  # a finished run keeps no private state
    launch(3, "resumed_w3", 2)
    launch(1, "resumed_w1", 0)
    for other in ("resumed_w3", "resumed_w1"):
        _assert_same_model(tmp_path / "straight", tmp_path / other)
