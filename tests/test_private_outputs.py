"""Contract item 9: no value computed from the sampled private batch (here: its loss) leaves a run un-noised.

A tracked tiny run trains in this process with a spy on the clipping engines that records every group loss
they return; then stdout, stderr (progress bar on), every file the run wrote and the MLflow SQLite store are
searched for each step's mean private loss and each evaluation interval's. A second run with
`tracking.log_train_loss=true` is the positive control: there the same search must find the interval losses,
so the search is shown to be able to fail.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from conftest import prepare_data

from dpmix_dist.testing.datagen import make_fashion_mnist_idx

pytestmark = pytest.mark.slow
NUMBER = re.compile(r"-?\d+\.\d{3,}(?:[eE][-+]?\d+)?")


@pytest.fixture(scope="module")
def private_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pv")
    raw = make_fashion_mnist_idx(root / "idx", num_train=200, num_test=40)
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
    )
    return root / "priv"


def _tracked_run(cwd: Path, private_root: Path, monkeypatch, capfd, *overrides: str) -> tuple[dict, str]:
    """Train in this process; returns the private losses {step means, interval means} and stdout + stderr."""
    from dpmix_dist import train
    from dpmix_dist.commands.finetune import parse_args, run_finetune
    from dpmix_dist.privacy.layerwise import LayerwiseClipper

    per_step: list[list[float]] = []
    original_step, original_clip, original_grads = (
        train.Trainer.train_step,
        LayerwiseClipper.clipped_sum,
        train.per_example_grads,
    )

    def step_spy(self, store):
        per_step.append([])
        return original_step(self, store)

    def clip_spy(self, *args, **kwargs):
        summed, losses = original_clip(self, *args, **kwargs)
        if per_step:  # not the engine's construction-time check on a mid-grey (public) image
            per_step[-1].extend(losses.tolist())
        return summed, losses

    def grads_spy(*args, **kwargs):
        grads, losses = original_grads(*args, **kwargs)
        per_step[-1].extend(losses.tolist())
        return grads, losses

    monkeypatch.setattr(train.Trainer, "train_step", step_spy)
    monkeypatch.setattr(LayerwiseClipper, "clipped_sum", clip_spy)
    monkeypatch.setattr(train, "per_example_grads", grads_spy)
    monkeypatch.chdir(cwd)
    args = parse_args(  # the command line's own parser: its defaults, in-process so that the spies see the run
        [
            "--config",
            "tiny_test",
            "--output-dir",
            str(cwd / "run"),
            "--cpu",
            f"data.root={private_root}",
            f"data.cache_dir={cwd / 'cache'}",
            "tracking.enabled=true",
            f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}",
            "tracking.register_as=tiny",
            "run.progress_bar=true",
            "run.eval_every_epochs=0.5",
            *overrides,
        ]
    )
    assert run_finetune(args) == 0
    out = capfd.readouterr()
    steps = [s for s in per_step if s]
    assert len(per_step) >= 8 and steps, "the spy saw no step"
    evals = [h["step"] for h in __import__("json").loads((cwd / "run" / "summary.json").read_text())["history"]]
    intervals, start = [], 0
    for end in evals:
        losses = [x for s in per_step[start:end] for x in s]
        if losses:
            intervals.append(sum(losses) / len(losses))
        start = end
    return {"step": [sum(s) / len(s) for s in steps], "interval": intervals}, out.out + out.err


def _found(values: list[float], text: str, files: list[Path]) -> list[str]:
    """Where any of `values` shows up: as a decimal number (to the digits printed, at least 3) in the text or a
    text file, or as a number stored in any column of an SQLite file (the MLflow store), to 1e-6."""
    hits = []

    def close(x: float, digits: int | None) -> bool:
        # printed to `digits` decimals, or stored in full (the spy sums in float64, the trainer in float32: 1e-6)
        rounding = 0.0 if digits is None else 0.5 * 10**-digits
        return any(abs(x - v) <= max(rounding, 1e-6 * abs(v)) for v in values)

    def scan(body: str, where: str) -> None:
        for token in NUMBER.findall(body):
            mantissa = token.lower().split("e")[0]
            if close(float(token), None if "e" in token.lower() else len(mantissa.split(".")[1])):
                hits.append(f"{where}: {token}")

    scan(text, "stdout/stderr")
    for path in files:
        raw = path.read_bytes()
        if raw.startswith(b"SQLite format 3"):
            with sqlite3.connect(path) as db:
                for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'"):
                    for row in db.execute(f'SELECT * FROM "{table}"'):
                        for cell in row:
                            if isinstance(cell, float) and close(cell, None):
                                hits.append(f"{path}:{table}: {cell!r}")
                            elif isinstance(cell, str):
                                scan(cell, f"{path}:{table}")
        elif b"\0" not in raw[:4096]:
            scan(raw.decode("utf-8", errors="ignore"), str(path))
    return hits


def _outputs(cwd: Path) -> list[Path]:
    """Everything the run wrote except the node-local data cache (decoded private shards live there by design)."""
    return [p for p in cwd.rglob("*") if p.is_file() and "cache" not in p.relative_to(cwd).parts]


def test_no_private_loss_on_screen_in_artifacts_or_in_the_tracker(private_root, tmp_path, monkeypatch, capfd):
    cwd = tmp_path / "default"
    cwd.mkdir()
    private, text = _tracked_run(cwd, private_root, monkeypatch, capfd)
    files = _outputs(cwd)
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "summary.json" for p in files)
    assert "DP training" in text and "ε ≤" in text  # the progress bar was on, and shows the guarantee
    assert "loss" not in text.replace(str(tmp_path), "").lower()
    assert _found(private["step"] + private["interval"], text, files) == []


def test_log_train_loss_is_marked_and_found_by_the_same_search(private_root, tmp_path, monkeypatch, capfd):
    """The positive control: asked for, the interval losses are recorded (marked as not private) and found."""
    import json

    cwd = tmp_path / "asked"
    cwd.mkdir()
    private, text = _tracked_run(cwd, private_root, monkeypatch, capfd, "tracking.log_train_loss=true")
    assert "NOT covered by the (ε, δ) guarantee" in text
    history = json.loads((cwd / "run" / "summary.json").read_text())["history"]
    logged = [h["train_loss_not_private"] for h in history]
    assert logged == pytest.approx(private["interval"], rel=1e-6)
    files = _outputs(cwd)
    hits = _found(private["interval"], "", files)
    assert any("summary.json" in h for h in hits) and any("mlflow.db" in h for h in hits), hits
