"""MLflow: a real SQLite store and a real `mlflow server` on 127.0.0.1 (started and stopped here by its PID)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, free_port, offline_env, prepare_data
from safetensors.torch import load_file

from dpmix_dist.testing.datagen import make_fashion_mnist_idx

SEED = "918273645"  # distinctive, so a search for it cannot hit by chance
pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return offline_env(OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trk")
    raw = make_fashion_mnist_idx(root / "idx", num_train=240, num_test=60)
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
    return root / "priv", root / "pub"


def _finetune(cwd: Path, priv: Path, out: Path, *overrides: str, timeout: int = 600, popen: bool = False):
    cmd = [
        sys.executable,
        str(REPO / "launch/finetune.py"),
        "--config",
        "tiny_test",
        "--seed",
        SEED,
        "--output-dir",
        str(out),
        f"data.root={priv}",
        f"data.cache_dir={cwd / 'cache'}",
        "tracking.enabled=true",
        "tracking.register_as=tiny-fmnist",
        *overrides,
    ]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


class Server:
    """`mlflow server` on 127.0.0.1 with an SQLite backend; stopped by its PID (process group)."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'server.db'}",
                "--artifacts-destination",
                str(self.root / "server-artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            cwd=self.root,
            # no job runner: it adds eight huey processes (which outlive the server's own for seconds) to two
            # cores and a second writer to the store; these tests use tracking and the registry only
            env={**_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not answer /health within 90 s")

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 20 s; returns once every process of the group is gone (a
        server's children can outlive its parent by seconds, and a restart must not race them for the port)."""
        if self.proc is None:
            return
        group = self.proc.pid
        try:
            for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL only if the group outlives 20 s
                os.killpg(group, sig)
                deadline = time.time() + 20
                while time.time() < deadline:
                    self.proc.poll()  # reap the parent, or the group never empties
                    os.killpg(group, 0)  # ProcessLookupError: the group is empty
                    time.sleep(0.1)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def _held(proc: subprocess.Popen):
    """The process stopped (SIGSTOP) for the block's duration, then continued."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _the_run(client):
    exp = client.get_experiment_by_name("dpmix-dist")
    (run,) = client.search_runs([exp.experiment_id])
    return run


# --------------------------------------------------------------------------------------------- SQLite store


@pytest.fixture(scope="module")
def sqlite_run(data, tmp_path_factory):
    priv, _ = data
    cwd = tmp_path_factory.mktemp("cwd")
    proc = _finetune(cwd, priv, cwd / "run", "run.eval_every_epochs=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


def test_default_store_is_sqlite_in_the_working_folder(sqlite_run):
    cwd, proc = sqlite_run
    assert (cwd / "mlflow.db").is_file() and (cwd / "mlartifacts").is_dir()
    assert "registered models:/tiny-fmnist/1" in proc.stdout


def test_params_tags_metrics_and_artifacts(sqlite_run):
    cwd, _ = sqlite_run
    client = _client(f"sqlite:///{cwd / 'mlflow.db'}")
    run = _the_run(client)
    summary = json.loads((cwd / "run" / "summary.json").read_text())
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["privacy.target_epsilon"] == "8.0" and params["model.name"] == "test_efficientnet"
    assert params["augment.method"] == "dpsgd" and "performance.micro_batch_size" in params
    tags = run.data.tags
    assert float(tags["dp.epsilon"]) == pytest.approx(summary["epsilon"], rel=1e-5)
    assert float(tags["dp.noise_multiplier"]) == pytest.approx(summary["noise_multiplier"], rel=1e-5)
    assert tags["dp.delta"] == "0.001" and tags["dp.accountant"] == "rdp" and tags["dp.steps"] == str(summary["steps"])
    assert float(tags["dp.sample_rate"]) == pytest.approx(summary["sample_rate"]) and tags["dp.max_grad_norm"] == "1"
    assert tags["augment.method"] == "dpsgd" and tags["model"] == "test_efficientnet" and tags["dp.private"] == "true"
    assert tags["dataset"] == "fashion_mnist" and tags["world_size"] == "1" and tags["code_version"]
    history = summary["history"]
    assert len(history) >= 4
    assert all("train_loss" not in key for h in history for key in h)  # nothing on private data (contract item 9)
    for key in ("test_accuracy", "epsilon"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in logged] == [h["step"] for h in history], key
        assert [m.value for m in logged] == pytest.approx([h[key] for h in history]), key
    eps = [m.value for m in client.get_metric_history(run.info.run_id, "epsilon")]
    assert eps == sorted(eps) and eps[-1] <= 8.0
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "accuracy_vs_epsilon.png"} <= names
    local = client.download_artifacts(run.info.run_id, "summary.json", str(cwd / "dl"))
    assert json.loads(Path(local).read_text())["epsilon"] == summary["epsilon"]


def test_registered_model_carries_the_guarantee_and_reproduces_the_logits(sqlite_run, data):
    import mlflow
    import mlflow.pytorch

    from dpmix_dist.config import load_config
    from dpmix_dist.data.shards import load_split
    from dpmix_dist.data.transforms import to_model_input
    from dpmix_dist.models import build_dp_model

    cwd, _ = sqlite_run
    _, pub = data
    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    client = _client(uri)
    summary = json.loads((cwd / "run" / "summary.json").read_text())
    version = client.get_model_version("tiny-fmnist", "1")
    assert float(version.tags["dp.epsilon"]) == pytest.approx(summary["epsilon"], rel=1e-5)
    assert version.tags["dp.delta"] == "0.001" and version.tags["dp.accountant"] == "rdp"
    assert version.tags["dataset"] == "fashion_mnist" and version.tags["augment.method"] == "dpsgd"
    assert "-DP (rdp accountant) on fashion_mnist" in version.description and "dpsgd" in version.description

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    loaded = mlflow.pytorch.load_model("models:/tiny-fmnist/1").eval()
    cfg = load_config("tiny_test")
    saved = build_dp_model(
        cfg.model.name,
        "none",
        10,
        norm=cfg.model.norm,
        trainable=cfg.model.trainable,
        num_trainable_blocks=cfg.model.num_trainable_blocks,
        image_size=32,
    ).model
    saved.load_state_dict(load_file(cwd / "run" / "model.safetensors"))
    saved.eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), saved(x), atol=1e-6)
        assert loaded(x).abs().sum() > 0
    # the signature's input example is a PUBLIC image (the public part of the split), not a private one
    from mlflow.models import Model

    local = mlflow.artifacts.download_artifacts("models:/tiny-fmnist/1", dst_path=str(cwd / "model_dl"))
    example = np.asarray(Model.load(local).load_input_example(local))
    public = load_split(pub, "train", cwd / "cache")
    data_cfg = saved.pretrained_cfg
    expected = to_model_input(public.images[:1], 32, data_cfg["mean"], data_cfg["std"]).numpy()
    assert np.allclose(example, expected, atol=1e-6)


def test_no_seed_anywhere_in_the_tracker(sqlite_run):
    cwd, proc = sqlite_run
    client = _client(f"sqlite:///{cwd / 'mlflow.db'}")
    run = _the_run(client)
    everything = [
        run.info.run_name,
        *run.data.params.keys(),
        *run.data.params.values(),
        *run.data.tags.keys(),
        *run.data.tags.values(),
        *map(str, run.data.metrics.values()),
    ]
    for key in run.data.metrics:
        everything += [str(m.value) for m in client.get_metric_history(run.info.run_id, key)]
    for mv in client.search_model_versions("name='tiny-fmnist'"):
        everything += [mv.description or "", *mv.tags.values()]
    assert everything and not any(SEED in item for item in everything)
    assert any(p.name == "model_card.md" for p in (cwd / "mlartifacts").rglob("*"))  # the card is searched too
    for path in (cwd / "mlartifacts").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".txt", ".jsonl", ".md", ""):
            assert SEED not in path.read_text(errors="ignore"), path
    assert SEED not in (cwd / "run" / "metrics.jsonl").read_text()
    assert SEED not in proc.stdout


def test_bad_tracking_uri_fails_before_any_work(data, tmp_path):
    priv, _ = data
    for uri, message in (
        ("htp://127.0.0.1:5000", "no supported scheme"),
        (f"sqlite:///{tmp_path}/missing/x.db", "does not exist"),
    ):
        proc = _finetune(tmp_path, priv, tmp_path / "run", f"tracking.uri={uri}")
        assert proc.returncode == 2
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "tracking.uri" in lines[0] and message in lines[0]
        assert not (tmp_path / "run").exists()


def test_unreachable_server_training_goes_on_and_says_what_was_not_sent(data, tmp_path):
    priv, _ = data
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = _finetune(tmp_path, priv, tmp_path / "run", f"tracking.uri={uri}", "tracking.flush_timeout_s=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unreachable" in proc.stderr and "could not send" in proc.stderr
    assert "(last failure: experiment: " in proc.stderr  # why, not only what: the first op never got through
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    journal = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in journal] == [h["step"] for h in summary["history"]]
    assert [r["test_accuracy"] for r in journal] == [h["test_accuracy"] for h in summary["history"]]


# --------------------------------------------------------------------------------------------- a real server


def test_server_stopped_mid_run_and_restarted_loses_no_metric(data, tmp_path):
    priv, _ = data
    server = Server(tmp_path, free_port()).start()
    try:
        out = tmp_path / "run"
        proc = _finetune(
            tmp_path,
            priv,
            out,
            f"tracking.uri={server.uri}",
            "privacy.epochs=16",
            "run.eval_every_epochs=0.5",
            "tracking.flush_timeout_s=120",
            popen=True,
        )
        journal = out / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if journal.is_file() and len(journal.read_text().splitlines()) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before the server could be stopped"
        # The run is held (SIGSTOP) while the server stops and while it starts, however long either takes on busy
        # cores: otherwise training can finish inside a slow stop, and then nothing is sent to a restarted server.
        with _held(proc):
            server.stop()  # the server goes away mid-run ...
            stopped_at = len(journal.read_text().splitlines())
        while time.time() < deadline and proc.poll() is None and len(journal.read_text().splitlines()) < stopped_at + 3:
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before the server came back"
        with _held(proc):
            server.start()  # ... and comes back on the same port with the same store
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        for expected in ("unreachable", "answers again"):
            assert expected in stderr, stderr[-3000:]
        assert "could not send" not in stderr, stderr[-3000:]
        client = _client(server.uri)
        run = _the_run(client)
        summary = json.loads((out / "summary.json").read_text())
        logged = client.get_metric_history(run.info.run_id, "test_accuracy")
        assert len(summary["history"]) >= stopped_at + 3
        assert [m.step for m in logged] == [h["step"] for h in summary["history"]]
        assert [m.value for m in logged] == pytest.approx([h["test_accuracy"] for h in summary["history"]])
        assert run.info.status == "FINISHED"
        assert client.get_model_version("tiny-fmnist", "1").tags["dp.accountant"] == "rdp"
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------- sweeps


def test_sweep_nested_runs_interrupted_and_restarted(data, tmp_path):
    priv, _ = data
    out = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(REPO / "launch/sweep.py"),
        "--config",
        "tiny_test",
        "--epsilons",
        "2,8",
        "--seeds",
        "0,1",
        "--output-dir",
        str(out),
        f"data.root={priv}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "tracking.enabled=true",
    ]
    first = subprocess.Popen(
        cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not (out / "dpsgd-eps2-rep0" / "summary.json").is_file():
        time.sleep(0.1)
    assert first.poll() is None, "the sweep ended before it could be interrupted"
    time.sleep(3)  # into the second combination
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C reaches the sweep and its run
    _, err = first.communicate(timeout=300)
    assert first.returncode == 130, err[-2000:]
    assert "run the same command again" in err
    second = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "skipping 1 finished combination(s)" in second.stdout

    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dpmix-dist")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "sweep-tiny_test"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.info.run_name for r in finished) == [
        "dpsgd-eps2-rep0",
        "dpsgd-eps2-rep1",
        "dpsgd-eps8-rep0",
        "dpsgd-eps8-rep1",
    ]
    assert parent.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "results.md", "accuracy_vs_epsilon.png"} <= names
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and {r["target_epsilon"] for r in rows} == {"2.0", "8.0"}
    for r in rows:
        assert float(r["epsilon_spent"]) <= float(r["target_epsilon"])
        summary = json.loads(
            (out / f"dpsgd-eps{float(r['target_epsilon']):g}-rep{r['replicate']}" / "summary.json").read_text()
        )
        assert float(r["test_accuracy"]) == pytest.approx(summary["test_accuracy"])
    table = (out / "results.md").read_text()
    assert "| dpsgd |" in table and "(n=2)" in table and "ε = 2" in table and "ε = 8" in table


def test_mlflow_usage_telemetry_is_off_unless_the_user_turns_it_on(tmp_path):
    """A Tracker turns MLflow 3's usage telemetry off (it would report to MLflow's maintainers), outside pytest's
    and CI's environment, where MLflow turns it off by itself; a user's explicit setting wins."""
    probe = (
        "import sys; from pathlib import Path; from dpmix_dist.config import TrackingConfig; "
        "from dpmix_dist.tracking import Tracker; from mlflow.telemetry.utils import is_telemetry_disabled; "
        f"Tracker(TrackingConfig(uri='sqlite:///{tmp_path}/m.db'), Path('{tmp_path}')); "
        "print(is_telemetry_disabled())"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "CI", "GITHUB", "MLFLOW", "DO_NOT"))}
    for user, expected in ((None, "True"), ("false", "False")):
        env = dict(clean, **({"MLFLOW_DISABLE_TELEMETRY": user} if user else {}))
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == expected, (user, out.stdout)
