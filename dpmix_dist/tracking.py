"""MLflow as the record of every run: params, guarantee tags, accuracy against ε, artifacts, and the registry.

Only the main process creates a `Tracker`. Every MLflow call is an *operation* in an ordered queue: when the
tracking server is unreachable (at the start, or gone mid-run) the queue waits and training goes on; each metric
is also appended to `OUTPUT_DIR/metrics.jsonl` first, so nothing is lost. The queue is retried at every
evaluation and, at the end, for up to `tracking.flush_timeout_s`; what still could not be sent is named.

Nothing private is logged: the config holds no seed, the tags hold the guarantee, the metrics are aggregates on
held-out data, the model signature's input example comes from public (or synthetic) data, and a registered
version's model card (`model_card.py`) is rendered from those public values only.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpmix_dist.config import Config, TrackingConfig, config_to_dict
from dpmix_dist.errors import ConfigError

DEFAULT_URI = "sqlite:///mlflow.db"
SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")
REPO = Path(__file__).resolve().parent.parent


def resolve_uri(cfg: TrackingConfig) -> str:
    """The config's tracking.uri, else MLFLOW_TRACKING_URI, else an SQLite file in the working folder."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "") or DEFAULT_URI


def check_uri(uri: str) -> None:
    """Fail before any work when a tracking URI cannot work at all (an unreachable server is not that)."""
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme not in SCHEMES:
        raise ConfigError(
            f"tracking.uri: {uri!r} has no supported scheme ({', '.join(SCHEMES)}); e.g. "
            f"{DEFAULT_URI} or http://127.0.0.1:5000"
        )
    if scheme in ("http", "https"):
        try:
            parsed.port  # noqa: B018 - parsing it is the check
        except ValueError:
            raise ConfigError(f"tracking.uri: {uri!r} has a bad port; e.g. http://127.0.0.1:5000") from None
        if not parsed.hostname:
            raise ConfigError(f"tracking.uri: {uri!r} names no host; e.g. http://127.0.0.1:5000")
    if scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if path is None or not str(path):
            raise ConfigError(f"tracking.uri: {uri!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db")
        if not path.parent.resolve().is_dir():
            raise ConfigError(f"tracking.uri: the folder of {path} does not exist; create it or choose another path")
    if scheme == "file" and not Path(parsed.path).parent.is_dir():
        raise ConfigError(f"tracking.uri: the folder of {parsed.path} does not exist; create it or choose another path")


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


@functools.cache  # asked at the start and the end of a run; git need not run twice
def git_version() -> str | None:
    """`git describe --always --dirty` of this checkout, or None (not a git checkout, no git)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name).split("+")[0]  # torch's local part (+cu130) is not on PyPI
    except PackageNotFoundError:
        return "unknown"


def code_version() -> str:
    """The git commit if this is a checkout, else the installed package's version."""
    return git_version() or _package_version("dpmix-dist")


def code_versions() -> dict[str, str]:
    """What trained a model, for its card: the commit, this package's version and the libraries the model needs."""
    versions = {"git": git_version()} if git_version() else {}
    return {**versions, **{name: _package_version(name) for name in ("dpmix-dist", "torch", "timm", "mlflow")}}


def model_requirements() -> list[str]:
    """The logged model's pip requirements, pinned to what logged it. Given rather than inferred: mlflow's inference
    loads the model again in a subprocess to see what it imports (25 s of a 60 s tiny test run on 2 cores), and the
    pickled model references torch and timm modules only (no dpmix_dist class)."""
    return [f"{n}=={_package_version(n)}" for n in ("mlflow", "torch", "torchvision", "timm", "cloudpickle", "numpy")]


def serving_input(model, image_size: int) -> dict:
    """The pyfunc model's input, for the MLmodel metadata and the model card: how an image becomes a row of X."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = [float(v) for v in cfg.get("mean", (0.5,) * 3)]  # the same defaults as data.inputs.RunInputs
    std = [float(v) for v in cfg.get("std", (0.5,) * 3)]
    return {
        "layout": "NCHW",
        "dtype": "float32",
        "channels": 3,
        "image_size": image_size,
        "mean": mean,
        "std": std,
        "preprocessing": (
            f"pixel values / 255, a grey image repeated on 3 channels, resized to {image_size}x{image_size} "
            f"(bilinear, antialiased), then (x - mean) / std per channel with mean {[round(v, 4) for v in mean]} "
            f"and std {[round(v, 4) for v in std]} (dpmix_dist.data.transforms.to_model_input)"
        ),
    }


def accuracy_plot(history: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    private = all(math.isfinite(h["epsilon"]) for h in history)  # else the non-private ceiling: against steps
    key = next((k for k in (history[0] if history else {}) if k.endswith("_accuracy")), "test_accuracy")
    ax.plot([h["epsilon" if private else "step"] for h in history], [100 * h[key] for h in history], marker="o")
    ax.set_xlabel("ε spent" if private else "step (non-private: ε = ∞)")
    ax.set_ylabel(f"{key.replace('_', ' ')} (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def experiment_id(client, uri: str, name: str) -> str:
    """The experiment's id, creating it if needed; with an SQLite store its artifacts go beside the database
    file (mlartifacts/), not into whatever folder the process happens to run in."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean 'the tracking server is away or failing now', as opposed to a bug in our calls."""
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.exceptions.RequestException, OSError)


_TRANSIENT: tuple[type[BaseException], ...] = ()


class Tracker:
    """One run in MLflow, fed by the main process. Calls never raise into training: they queue and retry."""

    def __init__(self, cfg: TrackingConfig, output_dir: Path, log: Callable[[str], None] = print) -> None:
        # MLflow 3 sends usage telemetry to its maintainers unless told not to; a toolkit for private data sends
        # nothing anywhere it was not pointed at (set MLFLOW_DISABLE_TELEMETRY=false to opt in).
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # Fail fast per request; our own queue does the retrying (mlflow's default retries take minutes).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault(
            "MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(cfg.request_timeout_s)))
        )  # int seconds
        from mlflow.tracking import MlflowClient

        global _TRANSIENT
        _TRANSIENT = _transient_errors()
        self.cfg, self.output_dir, self.log = cfg, output_dir, log
        self.uri = resolve_uri(cfg)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._queue: list[tuple[str, Callable[[], Any]]] = []
        self._last_failure = 0.0
        self._last_error = ""  # the last send's failure, named when the queue is given up on
        self._warned = False
        self.journal = output_dir / "metrics.jsonl"
        self.model_version: str | None = None

    # ------------------------------------------------------------------------------------------ queue

    def _op(self, what: str, fn: Callable[[], Any]) -> None:
        self._queue.append((what, fn))
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send what is queued, in order; stop at the first failure. True when the queue is empty."""
        if not force and self._queue and time.time() - self._last_failure < self.cfg.retry_every_s:
            return False
        while self._queue:
            what, fn = self._queue[0]
            try:
                fn()
            except _TRANSIENT as exc:  # the server is away or failing: keep training, keep the op for later
                self._last_failure = time.time()
                self._last_error = f"{what}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
                if not self._warned:
                    self.log(
                        f"MLflow at {self.uri} unreachable ({self._last_error}); "
                        f"training goes on, metrics are kept in {self.journal} and sent when it answers"
                    )
                    self._warned = True
                return False
            self._queue.pop(0)
        if self._warned:
            self.log(f"MLflow at {self.uri} answers again; queued records sent")
            self._warned = False
        return True

    # ------------------------------------------------------------------------------------------ the run

    def start(self, config: Config, tags: dict[str, str], run_name: str, resume_run_id: str | None = None) -> None:
        def experiment() -> None:
            self.experiment_id = experiment_id(self.client, self.uri, self.cfg.experiment)

        def create() -> None:
            if resume_run_id:
                self.run_id = resume_run_id
                self.client.update_run(resume_run_id, status="RUNNING")
                return
            run_tags = dict(tags)
            if self.cfg.parent_run_id:
                run_tags["mlflow.parentRunId"] = self.cfg.parent_run_id
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=run_tags)
            self.run_id = run.info.run_id
            (self.output_dir / "mlflow_run.json").write_text(json.dumps({"run_id": self.run_id, "uri": self.uri}))

        def params() -> None:
            from mlflow.entities import Param, RunTag

            flat = flatten(config_to_dict(config))
            items = [Param(k, v) for k, v in flat.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

        self._op("experiment", experiment)
        self._op("run", create)
        if not resume_run_id:
            self._op("params and tags", params)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        with open(self.journal, "a") as f:  # the local record comes first
            f.write(json.dumps(record) + "\n")

        def send() -> None:
            from mlflow.entities import Metric

            stamp = int(record["time"] * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in metrics.items()])

        self._op(f"metrics at step {step}", send)

    def finish(
        self,
        summary: dict,
        model,
        example_input,
        guarantee_tags: dict[str, str],
        config: Config,
        data_metadata: dict,
    ) -> None:
        """Artifacts (config, summary, accuracy-vs-ε plot), the model with its signature, the registry entry and its
        model card. `data_metadata` is the private data folder's metadata.json (class names and sizes: public)."""
        plot = accuracy_plot(
            summary.get("history", []),
            self.output_dir / "accuracy_vs_epsilon.png",
            f"{summary['model']} on {summary['dataset']}, {summary['method']}, "
            f"ε={summary['epsilon']:.2f}, δ={summary['delta']:g}",
        )

        split = summary.get("eval_split", "test")
        name = self.cfg.register_as or None
        inputs = serving_input(model, int(example_input.shape[-1]))
        classes = list(data_metadata.get("classes", []))

        def artifacts() -> None:
            for file in ("config.yaml", "summary.json"):
                self.client.log_artifact(self.run_id, str(self.output_dir / file))
            self.client.log_artifact(self.run_id, str(plot))

        def model_op() -> None:
            import mlflow
            import mlflow.pytorch
            import torch
            from mlflow.models import infer_signature

            mlflow.set_tracking_uri(self.uri)
            mlflow.set_registry_uri(self.uri)
            # a plain C-ordered (n, 3, S, S) array, as requests carry it (a channels-last tensor gives a strided view)
            example = example_input.contiguous().numpy()
            with torch.no_grad():
                logits = model(example_input)
            signature = infer_signature(example, logits.numpy())
            with mlflow.start_run(run_id=self.run_id):  # attach to our run; status is set below, not here
                # pickle, not mlflow 3's default pt2 (torch.export): an exported program is fixed to the example's
                # batch size and cannot leave eval mode, so it would not be the model users expect to load.
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    signature=signature,
                    serialization_format="pickle",
                    input_example=example,
                    pip_requirements=model_requirements(),
                    metadata={"dpmix_input": inputs, "classes": classes},
                    registered_model_name=name,
                )
            if name:
                self.model_version = str(info.registered_model_version)
                for key, value in guarantee_tags.items():
                    self.client.set_model_version_tag(name, self.model_version, key, value)

        def card_op() -> None:
            """The version's model card, logged to the run, and the description that names the guarantee and it."""
            from dpmix_dist import model_card

            uri = f"models:/{name}/{self.model_version}"
            text = model_card.render(
                summary, config, data_metadata, inputs, model_uri=uri, run_id=self.run_id, code=code_versions()
            )
            path = self.output_dir / model_card.FILE_NAME
            path.write_text(text)
            self.client.log_artifact(self.run_id, str(path))
            card_uri = f"runs:/{self.run_id}/{model_card.FILE_NAME}"
            self.client.set_model_version_tag(name, self.model_version, "model_card", card_uri)
            description = (
                f"({summary['epsilon']:.3f}, {summary['delta']:g})-DP ({summary['accountant']} accountant) on "
                f"{summary['dataset']} ({summary['num_train_examples']} private examples), method "
                f"{summary['method']}, σ={summary['noise_multiplier']:.4f}, q={summary['sample_rate']:.5g}, "
                f"{summary['steps']} steps, C={summary['max_grad_norm']:g}; "
                f"{split} accuracy {summary[f'{split}_accuracy']:.4f}. "
                f"Model card (what the guarantee covers and does not): {card_uri} "
                f"(artifact {model_card.FILE_NAME} of the source run)"
            )
            self.client.update_model_version(name, self.model_version, description=description)

        def final_metrics() -> None:
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            metrics = [Metric(f"final_{split}_accuracy", float(summary[f"{split}_accuracy"]), stamp, summary["steps"])]
            if math.isfinite(summary["epsilon"]):  # infinite for the non-private ceiling
                metrics.append(Metric("final_epsilon", float(summary["epsilon"]), stamp, summary["steps"]))
            self.client.log_batch(self.run_id, metrics=metrics)

        def end() -> None:
            self.client.set_terminated(self.run_id, status="FINISHED")

        self._op("final metrics", final_metrics)
        self._op("artifacts", artifacts)
        self._op("model and registry", model_op)
        if name:
            self._op("model card", card_op)
        self._op("run end", end)
        deadline = time.time() + self.cfg.flush_timeout_s
        while not self.flush(force=True) and time.time() < deadline:
            time.sleep(min(self.cfg.retry_every_s, max(deadline - time.time(), 0)))
        if self._queue:
            self.log(
                f"MLflow at {self.uri}: could not send {', '.join(w for w, _ in self._queue)} within "
                f"{self.cfg.flush_timeout_s:g} s (last failure: {self._last_error}); every metric is in "
                f"{self.journal}, the model in "
                f"{self.output_dir / 'model.safetensors'}"
            )

    def end_interrupted(self) -> None:
        def end() -> None:
            self.client.set_terminated(self.run_id, status="KILLED")

        self._op("run end", end)
        self.flush(force=True)

    @property
    def unsent(self) -> list[str]:
        return [w for w, _ in self._queue]


def guarantee_tags(summary_or_guarantee: dict, config: Config, dataset: str, world_size: int) -> dict[str, str]:
    g = summary_or_guarantee
    return {
        "dp.epsilon": f"{g['epsilon']:.6g}",
        "dp.delta": f"{g['delta']:g}",
        "dp.noise_multiplier": f"{g['noise_multiplier']:.6g}",
        "dp.max_grad_norm": f"{g['max_grad_norm']:g}",
        "dp.sample_rate": f"{g['sample_rate']:.6g}",
        "dp.steps": str(g["steps"]),
        "dp.accountant": g["accountant"],
        "dp.private": str(math.isfinite(g["epsilon"])).lower(),
        "augment.method": config.augment.method,
        "model": config.model.name,
        "dataset": dataset,
        "world_size": str(world_size),
        "code_version": code_version(),
    }
