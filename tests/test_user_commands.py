"""A user's first commands, end to end on the tiny config: `--plan` before a run, the `dpmix` command, `predict`.

One tracked run (`dpmix finetune`, registered in a test-local MLflow store) serves every test: its `--plan` must
announce the guarantee the run then records, predict must give the model's own argmax for PNG files, from the run
folder and from the registry.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import timm
import tomllib
import torch
import torch.nn.functional as F
from conftest import REPO, offline_env, prepare_data
from PIL import Image
from safetensors.torch import load_file

from dpmix_dist import cli, sweep
from dpmix_dist.commands import finetune, predict
from dpmix_dist.testing.datagen import class_images, make_fashion_mnist_idx

pytestmark = pytest.mark.slow
NUM_TRAIN, NUM_TEST = 200, 50
REGISTERED = "tiny-first-hour"


def dpmix(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The installed `dpmix` script when this environment has it (pip install -e .), else `python -m dpmix_dist.cli`:
    the same entry point (test_entry_point checks the script's target)."""
    script = Path(sys.executable).parent / "dpmix"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "dpmix_dist.cli"]
    env = offline_env(OMP_NUM_THREADS="1")
    return subprocess.run([*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def plan_json(stdout: str) -> dict:
    """The JSON object that ends a plan's output (after the lines for people)."""
    return json.loads(stdout[stdout.index("\n{") :])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("first_hour")
    raw = make_fashion_mnist_idx(base / "idx", num_train=NUM_TRAIN, num_test=NUM_TEST)
    prepare_data("fashion_mnist", "--source", str(raw), "--out", str(base / "data"))
    return base


def finetune_args(base: Path, *overrides: str, output_dir: Path | None = None) -> list:
    return [
        "finetune",
        "--config",
        "tiny_test",
        f"data.root={base / 'data'}",
        f"data.cache_dir={base / 'cache'}",
        "tracking.enabled=true",
        f"tracking.uri=sqlite:///{base / 'mlflow.db'}",
        f"tracking.register_as={REGISTERED}",
        *overrides,
        "--output-dir",
        output_dir or base / "run",
    ]


def finetune_in_process(args: list) -> tuple[int, str, str]:
    """`dpmix finetune ARGS` in this process (the command's own code; no interpreter start-up): status, out, err."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = finetune.main(list(map(str, args[1:])))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def planned_run(base) -> tuple[str, Path]:
    """`finetune --plan` (checked to have written and read nothing), then the run: `dpmix finetune`, same arguments."""
    code, planned, err = finetune_in_process([*finetune_args(base), "--plan"])
    assert code == 0, err[-3000:]
    assert not (base / "run").exists()  # no output folder, no model
    assert not (base / "cache").exists()  # the shards were never decoded: no private image was read
    assert not (base / "mlflow.db").exists()  # nothing sent to the tracker
    ran = dpmix(*finetune_args(base), cwd=base)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return planned, base / "run"


# ---------------------------------------------------------------------------------------------- --plan


def test_plan_announces_the_guarantee_the_run_records(planned_run):
    planned, run_dir = planned_run
    plan, summary = plan_json(planned), json.loads((run_dir / "summary.json").read_text())
    for key in (
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
        "group_size",
        "num_train_examples",
        "trainable_parameters",
    ):
        assert plan[key] == summary[key], key
    assert f"σ = {summary['noise_multiplier']:.4f}" in planned
    assert f"ε = {summary['epsilon']:.3f}" in planned
    assert f"{summary['steps']:,} steps" in planned
    seconds = plan["estimated_seconds"]
    assert seconds["total"] == pytest.approx(sum(v for k, v in seconds.items() if k != "total"), abs=0.05)
    assert seconds["steps"] > 0 and seconds["setup"] > 0
    assert plan["evaluations"] == len(summary["history"])


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("privacy.target_delta=0.01", "privacy.target_delta"),  # ≥ 1/N: found once N is read from the metadata
        # found with the model built: the features of one example × the examples held (a mid-grey image's size)
        ("performance.feature_cache_max_gb=1e-6", "feature_cache_max_gb"),
    ],
    ids=["delta", "feature_cache"],
)
def test_plan_fails_on_a_bad_setting_as_the_run_does(base, tmp_path, bad, needle):
    planned = finetune_in_process([*finetune_args(base, bad, output_dir=tmp_path / "a"), "--plan"])
    ran = finetune_in_process(finetune_args(base, bad, output_dir=tmp_path / "b"))
    assert planned[0] == ran[0] == 2
    errors = [[line for line in err.splitlines() if line.startswith("error:")] for _, _, err in (planned, ran)]
    assert errors[0] == errors[1] and len(errors[0]) == 1 and needle in errors[0][0], errors
    assert not list(tmp_path.iterdir())


def test_sweep_plan_plans_every_point(base, planned_run, tmp_path, monkeypatch, capsys):
    """In this process (the sweep's own code): the ε = 8 point is the run above; nothing is written."""
    _, run_dir = planned_run
    summary = json.loads((run_dir / "summary.json").read_text())
    monkeypatch.chdir(tmp_path)
    code = sweep.main(
        [
            "--config",
            "tiny_test",
            "--epsilons",
            "2,8",
            "--seeds",
            "0,1",
            f"data.root={base / 'data'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "--plan",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    plan = plan_json(out)
    by_name = {run["name"]: run for run in plan["runs"]}
    assert sorted(by_name) == ["dpsgd-eps2", "dpsgd-eps8"] and plan["replicates"] == 2
    for key in ("epsilon", "noise_multiplier", "steps", "sample_rate"):
        assert by_name["dpsgd-eps8"][key] == summary[key], key
    assert by_name["dpsgd-eps2"]["epsilon"] <= 2 < by_name["dpsgd-eps8"]["epsilon"]
    assert by_name["dpsgd-eps2"]["noise_multiplier"] > by_name["dpsgd-eps8"]["noise_multiplier"]
    assert plan["estimated_seconds_total"] > 0
    assert "| dpsgd-eps2 |" in out and "2 points × 2 replicate(s) = 4 runs" in out
    assert not list(tmp_path.iterdir())  # no runs/, no mlflow.db, no decoded shards


# ---------------------------------------------------------------------------------------------- dpmix


def test_entry_point():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert EntryPoint("dpmix", scripts["dpmix"], "console_scripts").load() is cli.main


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_subcommand_is_its_launch_script(name, capsys):
    module, function, script, _ = cli.COMMANDS[name]
    assert f"from {module} import {function}" in (REPO / "launch" / script).read_text()
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dpmix {name}")
    assert importlib.import_module(module).__doc__.strip().splitlines()[0] in out  # the module docstring is --help


def test_top_level_help_and_unknown_subcommand(base, capsys):
    result = dpmix("--help", cwd=base)
    assert result.returncode == 0
    for name in cli.COMMANDS:
        assert f"\n  {name} " in result.stdout
    assert cli.main(["train"]) == 2
    assert "unknown subcommand 'train'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- predict


def reference_probabilities(run_dir: Path, images: np.ndarray) -> torch.Tensor:
    """The model's probabilities, computed here from model.safetensors without the package's code: a plain timm
    model, and the transform written out (grey to RGB, bilinear antialiased resize to 32 px, normalize)."""
    model = timm.create_model("test_efficientnet", num_classes=10)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    model.eval()
    x = torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.softmax(model((x - mean) / std), dim=1)


def predicted(stdout: str, paths: list[Path]) -> dict[str, list[tuple[str, float]]]:
    """{file: [(class, probability %), ...]} from predict's output."""
    lines, result, current = stdout.splitlines(), {}, None
    for line in lines[1:]:
        if not line.startswith("  "):
            current = result.setdefault(line, [])
            continue
        rank, rest = line.strip().split(". ", 1)
        name, percent = rest.rsplit(None, 1)
        current.append((name.strip(), float(percent.rstrip("%"))))
    assert sorted(result) == sorted(map(str, paths))
    return result


@pytest.fixture(scope="module")
def pngs(base) -> tuple[list[Path], np.ndarray]:
    """Six 28×28 PNGs of class-like pictures, grey like the training images, the last one saved as RGB with equal
    channels (predict converts it back to the same grey values)."""
    images = class_images(np.arange(6), 28, 1, seed=3)
    folder = base / "pngs"
    folder.mkdir()
    paths = []
    for i, image in enumerate(images):
        path = folder / f"image{i}.png"
        grey = Image.fromarray(image[..., 0])
        (grey.convert("RGB") if i == len(images) - 1 else grey).save(path)
        paths.append(path)
    return paths, images


@pytest.mark.parametrize("source", ["run folder", "registry"])
def test_predict_gives_the_models_argmax(planned_run, base, pngs, source, monkeypatch, capsys):
    _, run_dir = planned_run
    paths, images = pngs
    classes = json.loads((base / "data" / "metadata.json").read_text())["classes"]
    expected = reference_probabilities(run_dir, images)
    model = str(run_dir) if source == "run folder" else f"models:/{REGISTERED}/1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base / 'mlflow.db'}")
    monkeypatch.chdir(base)
    assert predict.main(["--model", model, "--top-k", "3", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "(ε = " in out.splitlines()[0]
    for path, row in zip(paths, expected):
        top = predicted(out, paths)[str(path)]
        assert len(top) == 3
        assert top[0][0] == classes[int(row.argmax())]
        assert [p for _, p in top] == pytest.approx((100 * row.sort(descending=True).values[:3]).tolist(), abs=0.006)


def test_predict_errors(planned_run, base, pngs, tmp_path, capsys):
    _, run_dir = planned_run
    paths, _ = pngs
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    cases = [
        (["--model", run_dir, tmp_path / "missing.png"], "missing.png: no such file"),
        (["--model", run_dir, not_an_image], "notes.png: not an image"),
        (["--model", run_dir, tmp_path], "is a folder"),
        (["--model", base / "data", paths[0]], "no model.safetensors"),
        (["--model", tmp_path / "nowhere", paths[0]], "no such folder"),
        (
            ["--model", "models:/no-such-model/1", "--tracking-uri", f"sqlite:///{base / 'mlflow.db'}", paths[0]],
            "not found",
        ),
    ]
    for args, needle in cases:
        assert predict.main(list(map(str, args))) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
