"""The checkpoint carries the guarantee its steps were taken under; --resume checks it instead of re-deriving it.

The same config can plan a different guarantee: here the data folder is rewritten in place with more private
examples (N, hence q and σ, change while every config key stays the same). Before the record existed, such a
resume went on silently and accounted the old steps under the new plan.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import prepare_data

from dpmix_dist.testing.datagen import make_fashion_mnist_idx
from dpmix_dist.zero import ShardedOptimizer


def _prepare(root: Path, num_train: int) -> Path:
    raw = make_fashion_mnist_idx(root / f"idx{num_train}", num_train=num_train, num_test=40)
    prepare_data(
        "fashion_mnist",
        "--source",
        str(raw),
        "--out",
        str(root / "priv"),
        "--public-out",
        str(root / "pub"),
        "--public-count",
        "40",
        "--overwrite",
    )
    return root / "priv"


def _trainer(root: Path, out: Path, *overrides: str):
    from dpmix_dist.config import load_config
    from dpmix_dist.distributed import Distributed
    from dpmix_dist.train import Trainer

    config = load_config("tiny_test", [f"data.root={root / 'priv'}", f"data.cache_dir={root / 'cache'}", *overrides])
    return Trainer(config, Distributed(cpu=True), out, secret_seed=12345)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> tuple[Path, Path]:
    """A run folder whose checkpoint was written after 2 steps, on 160 private examples (the module's tests run in
    order: the last one rewrites the data folder)."""
    tmp_path = tmp_path_factory.mktemp("resume")
    _prepare(tmp_path, 200)
    out = tmp_path / "run"
    out.mkdir()
    trainer = _trainer(tmp_path, out)
    for _ in range(2):
        trainer.train_step(trainer.train_store)
    trainer._save_checkpoint()
    return tmp_path, out


def test_resume_with_the_same_data_and_settings_continues(checkpointed):
    root, out = checkpointed
    trainer = _trainer(root, out)
    trainer.resume()
    assert trainer.step == 2


def test_resume_with_another_precision_is_refused_the_engine_may_change(checkpointed):
    root, out = checkpointed
    with pytest.raises(ValueError, match=r"precision 'fp32' -> 'bf16'"):
        _trainer(root, out, "performance.precision=bf16").resume()
    trainer = _trainer(root, out, "performance.engine=functorch")  # exact like the layer-wise one: equal to rounding
    trainer.resume()
    assert trainer.step == 2


def test_resume_of_a_checkpoint_from_the_old_noise_stream_is_refused(checkpointed, tmp_path):
    """A checkpoint written before the noise was drawn in chunks of (seed, step, chunk) has no noise-stream record:
    resuming it would mix two noise streams, so it is refused with a message that says so."""
    import torch

    root, out = checkpointed
    raw = torch.load(out / "checkpoint.pt", weights_only=False)
    assert raw["guarantee"]["noise_stream"] == 2
    del raw["guarantee"]["noise_stream"]  # what the previous version wrote (resealed: the checksum came later)
    from dpmix_dist.checkpoint import content_sha256

    del raw["sha256"]
    raw["sha256"] = content_sha256(raw)
    old = tmp_path / "old"
    old.mkdir()
    torch.save(raw, old / "checkpoint.pt")
    trainer = _trainer(root, old)
    with pytest.raises(ValueError, match=r"draws the noise differently \(noise stream 1, this version 2\)"):
        trainer.resume()
    assert trainer.step == 0


def test_a_zero_checkpoint_resumes_replicated_and_a_replicated_one_under_zero(checkpointed, tmp_path):
    """A stage-1 run writes its optimizer state as a shard file named (with its SHA-256) in checkpoint.pt; a stage-0
    run writes it in checkpoint.pt itself. The two take the same steps and hold the same state, and each resumes
    under the other stage to the same next step (one process: the shard is the whole vector, the code path is
    ZeRO's). A missing shard file, or one from another checkpoint, is refused naming the file."""
    import shutil

    import torch

    from dpmix_dist.checkpoint import CorruptCheckpoint

    root, _ = checkpointed
    adam = ["optim.name=adam", "optim.lr=0.01", "optim.momentum=null"]
    runs = {}
    for stage in (0, 1):
        (tmp_path / str(stage)).mkdir()
        trainer = _trainer(root, tmp_path / str(stage), *adam, f"performance.zero_stage={stage}")
        for _ in range(2):
            trainer.train_step(trainer.train_store)
        trainer._save_checkpoint()
        runs[stage] = trainer
    assert isinstance(runs[1].update, ShardedOptimizer) and not isinstance(runs[0].update, ShardedOptimizer)
    assert [p.name for p in (tmp_path / "1").glob("optimizer-shard-*")] == [
        "optimizer-shard-0000-of-0001-step000000002.pt"
    ]
    assert not list((tmp_path / "0").glob("optimizer-shard-*"))
    shard, plain = runs[1].update.shard_state(), runs[0].optimizer.state_dict()
    for key in ("exp_avg", "exp_avg_sq"):
        flat = torch.cat([plain["state"][i][key].reshape(-1) for i in sorted(plain["state"])])
        assert torch.allclose(shard["state"][key], flat, atol=1e-7), key
    runs[0].train_step(runs[0].train_store)  # the reference for step 3
    for written, other in ((1, 0), (0, 1)):
        resumed = _trainer(root, tmp_path / str(written), *adam, f"performance.zero_stage={other}")
        resumed.resume()
        assert resumed.step == 2
        resumed.train_step(resumed.train_store)
        for name, param in resumed.params.items():
            assert torch.allclose(param, runs[0].params[name], atol=1e-6), (written, other, name)

    shard_file = next((tmp_path / "1").glob("optimizer-shard-*"))
    runs[1].train_step(runs[1].train_store)
    runs[1]._save_checkpoint()  # step 3: a new shard file, and the step-2 one removed once checkpoint.pt names it
    newer = next((tmp_path / "1").glob("optimizer-shard-*"))
    assert newer.name.endswith("step000000003.pt") and not shard_file.exists()
    shutil.copy(newer, tmp_path / "newer")
    newer.unlink()
    with pytest.raises(CorruptCheckpoint, match=rf"names the optimizer shard {newer.name}, which is missing"):
        _trainer(root, tmp_path / "1", *adam, "performance.zero_stage=1").resume()
    from dpmix_dist.checkpoint import content_sha256

    other = torch.load(tmp_path / "newer", weights_only=False)
    other["state"]["exp_avg"] = other["state"]["exp_avg"] + 1  # a shard of another run, checksummed correctly
    del other["sha256"]
    torch.save({**other, "sha256": content_sha256(other)}, newer)
    with pytest.raises(CorruptCheckpoint, match=r"is not the file checkpoint.pt recorded"):
        _trainer(root, tmp_path / "1", *adam, "performance.zero_stage=1").resume()


def test_resume_on_a_rewritten_data_folder_is_refused(checkpointed):
    root, out = checkpointed
    _prepare(root, 240)  # same path, same config, 200 private examples now
    trainer = _trainer(root, out)
    with pytest.raises(ValueError, match=r"different guarantee \(num_train_examples 160 -> 200.*sample_rate"):
        trainer.resume()
    assert trainer.step == 0
