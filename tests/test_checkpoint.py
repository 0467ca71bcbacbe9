"""The private checkpoint: written every `run.checkpoint_every_steps`, checksummed, and a resume from it continues
bit-identically (same world size: every random draw is a function of (seed, step), and the model, optimizer and
schedule are restored exactly). A damaged checkpoint is refused, naming the file and the fix.

In one process, on shards written in-process (seconds). The multi-process cases (a rank killed with SIGKILL, then
--resume at the same and at another world size) are in test_distributed.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from dpmix_dist import checkpoint
from dpmix_dist.commands.finetune import _main_process_seed
from dpmix_dist.config import load_config
from dpmix_dist.data.shards import write_dataset
from dpmix_dist.data.sources import RawDataset, RawSplit
from dpmix_dist.distributed import Distributed
from dpmix_dist.testing.datagen import class_images
from dpmix_dist.train import Trainer

SEED = 31337
CRASH_AFTER = 5  # steps; checkpoints every 2 steps, so the last one before the crash holds step 4


class Crash(Exception):
    """Stands for the process dying: nothing after it runs (no checkpoint on the way out, unlike SIGTERM)."""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("ckpt")
    labels = np.arange(96) % 10
    splits = {
        "train": RawSplit(class_images(labels, 28, 1, 3), labels),
        "test": RawSplit(class_images(labels[:20], 28, 1, 4), labels[:20]),
    }
    write_dataset(RawDataset("fashion_mnist", tuple(f"c{i}" for i in range(10)), splits, "tests"), base / "shards")
    return base


def _trainer(root: Path, out: Path, *overrides: str) -> Trainer:
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(
        "tiny_test",
        [
            f"data.root={root / 'shards'}",
            f"data.cache_dir={root / 'cache'}",
            "privacy.epochs=3",  # 9 steps
            "optim.momentum=0.9",  # optimizer state and a schedule that the resume must restore
            "optim.schedule=cosine",
            "run.eval_every_epochs=0.01",  # evaluate after every step
            "run.checkpoint_every_epochs=100",  # no epoch checkpoint: the step cadence alone
            *overrides,
        ],
    )
    return Trainer(config, Distributed(cpu=True), out, SEED)


def _checkpointed(root: Path, out: Path) -> Trainer:
    trainer = _trainer(root, out)
    for _ in range(2):
        trainer.train_step(trainer.train_store)
    trainer._save_checkpoint()
    return trainer


def test_checkpoint_every_n_steps_and_a_resume_after_a_crash_is_bit_identical(root, tmp_path):
    full = _trainer(root, tmp_path / "full")
    full_summary = full.train()

    out = tmp_path / "crashed"
    crashing = _trainer(root, out, "run.checkpoint_every_steps=2")
    seen = []  # the checkpoint's step as each evaluation (after every step, before that step's checkpoint) sees it

    def crash_at(record: dict) -> None:
        path = out / checkpoint.CHECKPOINT
        seen.append(torch.load(path, weights_only=False)["step"] if path.exists() else None)
        if record["step"] == CRASH_AFTER:
            raise Crash

    crashing.on_eval = crash_at
    with pytest.raises(Crash):
        crashing.train()
    assert seen == [None, None, 2, 2, 4]  # written after steps 2 and 4, not by the epoch cadence

    resumed = _trainer(root, out, "run.checkpoint_every_steps=2")
    resumed.resume()
    assert resumed.step == 4
    summary = resumed.train()
    for name, p in full.params.items():
        assert torch.equal(p, resumed.params[name]), name
    assert summary["epsilon"] == full_summary["epsilon"] and summary["steps"] == full_summary["steps"] == 9
    assert summary["history"] == full_summary["history"]  # the evaluation lost with step 5 is redone, identically
    assert not (out / checkpoint.CHECKPOINT).exists()  # the private resume state goes once the run is done


def _flip_a_model_byte(path: Path, trainer: Trainer) -> None:
    """Flip one byte inside a trained tensor's stored bytes (torch.load reads such a file without complaint)."""
    data = bytearray(path.read_bytes())
    tensor = next(iter(trainer.params.values())).detach().cpu().contiguous()
    at = data.find(tensor.numpy().tobytes()[:64])
    assert at > 0
    data[at + 10] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_fix(root, tmp_path):
    trainer = _checkpointed(root, tmp_path / "run")
    path = tmp_path / "run" / checkpoint.CHECKPOINT
    assert checkpoint.read_seed(tmp_path / "run") == SEED  # intact: reads and resumes
    _trainer(root, tmp_path / "run").resume()

    _flip_a_model_byte(path, trainer)
    torch.load(path, weights_only=False)  # the damage does not stop torch: only the checksum sees it
    for read in (lambda: checkpoint.read_seed(tmp_path / "run"), lambda: _trainer(root, tmp_path / "run").resume()):
        with pytest.raises(checkpoint.CorruptCheckpoint) as refused:
            read()
        message = str(refused.value)
        assert str(path) in message and "SHA-256" in message and "new --output-dir" in message

    path.write_bytes(path.read_bytes()[:1000])  # truncated (a copy cut short)
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"cannot be read .*Restore it from a good copy"):
        checkpoint.read_seed(tmp_path / "run")


def test_finetune_reports_a_damaged_checkpoint_on_every_rank(root, tmp_path):
    """The main process reads the seed alone: a damaged checkpoint comes back as the message every rank raises,
    rather than an exception on the main process that would leave the other ranks waiting in the broadcast."""
    trainer = _checkpointed(root, tmp_path / "run")
    _flip_a_model_byte(tmp_path / "run" / checkpoint.CHECKPOINT, trainer)
    secret, error = _main_process_seed(argparse.Namespace(resume=True, seed=None), tmp_path / "run")
    assert secret is None and "does not match the SHA-256" in error


def test_the_checksum_covers_every_field_and_refuses_unstable_values():
    content = {"step": 3, "model": {"w": torch.ones(2, 2)}, "history": [{"epsilon": 0.5}], "flag": None}
    digest = checkpoint.content_sha256(content)
    assert checkpoint.content_sha256({**content, "step": 4}) != digest
    assert checkpoint.content_sha256({**content, "model": {"w": torch.ones(2, 2).double()}}) != digest
    assert checkpoint.content_sha256({**content, "model": {"w": torch.ones(4)}}) != digest  # same bytes, new shape
    assert checkpoint.content_sha256({**content, "history": [{"epsilon": 0.5000001}]}) != digest
    with pytest.raises(TypeError, match="object"):
        checkpoint.content_sha256({**content, "extra": object()})
