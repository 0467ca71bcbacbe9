"""Top-k classes of image files from a private model: a finished run's folder, or a registered MLflow version.

    python launch/predict.py --model runs/fmnist_effnet_lite0-20261130-101500 shoe.png shirt.jpg
    python launch/predict.py --model models:/fmnist-effnet-lite0/3 --top-k 3 photos/*.jpg
    dpmix predict --model models:/fmnist-effnet-lite0@champion shoe.png

A run folder holds config.yaml, model.safetensors and summary.json (what launch/finetune.py writes).
models:/NAME/VERSION (or models:/NAME@ALIAS) is read from --tracking-uri (default: MLFLOW_TRACKING_URI, else
sqlite:///mlflow.db, as training): the registered model, and config.yaml and summary.json of the run that logged it.

Every image (PNG, JPEG, whatever PIL reads) gets the test split's transform: converted to the training images'
channels (grey or RGB) and stored size (as launch/prepare_data.py stores images), then resized to data.image_size
and normalized like the model's training inputs. Predicting is post-processing of the released model: it spends
no privacy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from dpmix_dist.errors import DataError, ModelError, run_command

REGISTRY_PREFIX = "models:/"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a finished run's folder, or models:/NAME/VERSION")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="where models:/ is registered (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: predict(parse_args(argv)))


# ---------------------------------------------------------------------------------------------- the model


class Predictor:
    """A private model with what it needs to read images: its config (input size), the normalization of its
    training inputs, the stored image shape (H, W, C) and the class names."""

    def __init__(self, model, config, summary: dict) -> None:
        self.model, self.config, self.summary = model.eval(), config, summary
        self.classes, self.image_shape = labels_and_shape(config, summary)
        cfg = getattr(model, "pretrained_cfg", None) or {}  # as RunInputs normalizes training inputs
        self.mean, self.std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))

    def probabilities(self, images):
        """uint8 images (n, H, W, C) at the stored shape -> class probabilities (n, classes)."""
        import torch

        from dpmix_dist.data.transforms import to_model_input

        with torch.no_grad():
            x = to_model_input(images, self.config.data.image_size, self.mean, self.std)
            return torch.softmax(self.model(x).float(), dim=1)


def labels_and_shape(config, summary: dict) -> tuple[list[str], tuple[int, ...]]:
    """The class names and stored image shape, from summary.json (or, for an older run, its data folder)."""
    from dpmix_dist.data.shards import read_metadata

    classes, shape = summary.get("classes"), summary.get("image_shape")
    if classes is None or shape is None:
        try:
            meta = read_metadata(config.data.root)
        except (DataError, OSError):
            raise ModelError(
                f"the run's summary.json names no classes (a run from before they were recorded) and its data "
                f"folder {config.data.root} is not readable here; run predict where that folder exists"
            ) from None
        classes, shape = meta["classes"], meta["splits"]["train"]["image_shape"]
    return list(classes), tuple(shape)


def _read_run_files(folder: Path) -> tuple:
    """(config, summary) of a finished run's folder."""
    from dpmix_dist import summary as summary_json
    from dpmix_dist.config import load_config

    for name in ("config.yaml", "summary.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"--model {folder}: no {name}; give the folder of a finished launch/finetune.py run "
                "(config.yaml, model.safetensors, summary.json)"
            )
    return load_config(str(folder / "config.yaml")), summary_json.read(folder / "summary.json")


def load_run(folder: Path) -> Predictor:
    """The model of a finished run's folder: built from its config.yaml, weights from model.safetensors."""
    from safetensors.torch import load_file

    from dpmix_dist.models import build_dp_model

    if not folder.is_dir():
        raise FileNotFoundError(f"--model {folder}: no such folder (give a run's folder or models:/NAME/VERSION)")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"--model {folder}: no model.safetensors (written when a run finishes; an interrupted run continues "
            "with --resume)"
        )
    config, summary = _read_run_files(folder)
    m = config.model
    classes, _ = labels_and_shape(config, summary)
    # weights=none: every tensor comes from model.safetensors (nothing downloaded); the normalization is the
    # architecture's, the same as with its pretrained weights
    dp = build_dp_model(
        m.name,
        "none",
        len(classes),
        norm=m.norm,
        groupnorm_groups=m.groupnorm_groups,
        trainable=m.trainable,
        num_trainable_blocks=m.num_trainable_blocks,
        image_size=config.data.image_size,
    )
    try:
        dp.model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise ModelError(f"--model {folder}: model.safetensors does not fit {m.name} ({str(exc)[:200]})") from None
    return Predictor(dp.model, config, summary)


def load_registered(uri: str, tracking_uri: str) -> Predictor:
    """models:/NAME/VERSION or models:/NAME@ALIAS: the logged model, and its run's config.yaml and summary.json."""
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from dpmix_dist.tracking import check_uri

    check_uri(tracking_uri)
    ref = uri[len(REGISTRY_PREFIX) :]
    name, sep, version = ref.partition("@") if "@" in ref else ref.rpartition("/")
    if not (name and sep and version):
        raise ValueError(f"--model {uri}: write models:/NAME/VERSION or models:/NAME@ALIAS")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        found = (
            client.get_model_version_by_alias(name, version) if sep == "@" else client.get_model_version(name, version)
        )
        with tempfile.TemporaryDirectory() as tmp:
            for artifact in ("config.yaml", "summary.json"):
                client.download_artifacts(found.run_id, artifact, tmp)
            config, summary = _read_run_files(Path(tmp))
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        model = mlflow.pytorch.load_model(f"{REGISTRY_PREFIX}{name}/{found.version}", map_location="cpu")
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"--model {uri}: not found or not readable in {tracking_uri} ({first})") from None
    return Predictor(model, config, summary)


# ---------------------------------------------------------------------------------------------- images


def read_image(path: Path, shape: tuple[int, ...]):
    """One image file as uint8 (H, W, C) at the training images' stored shape: channels (grey or RGB) and size."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if path.is_dir():
        raise DataError(f"{path}: is a folder; give image files (PNG, JPEG, ...)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    height, width, channels = shape
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (width, height):  # the stored size, resized as prepare_data resizes image folders
                img = img.resize((width, height), Image.BICUBIC)
            return np.asarray(img, dtype=np.uint8).reshape(height, width, channels)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not an image PIL can read ({type(exc).__name__}); give PNG or JPEG files") from None


def predict(args: argparse.Namespace) -> int:
    import numpy as np

    if args.model.startswith(REGISTRY_PREFIX):
        tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        predictor = load_registered(args.model, tracking_uri)
    else:
        predictor = load_run(Path(args.model))
    images = np.stack([read_image(path, predictor.image_shape) for path in args.images])  # every file checked first
    s = predictor.summary
    private = f"(ε = {s['epsilon']:.3f}, δ = {s['delta']:g})-DP" if s.get("private", True) else "NON-PRIVATE"
    accuracy = f", {s['eval_split']} accuracy {s[s['eval_split'] + '_accuracy']:.4f}" if "eval_split" in s else ""
    print(f"{args.model}: {s.get('model')} on {s.get('dataset')}, {private}{accuracy}")
    top_k = min(args.top_k, len(predictor.classes))
    width = max(len(name) for name in predictor.classes)
    for start in range(0, len(images), 64):
        probabilities = predictor.probabilities(images[start : start + 64])
        values, indices = probabilities.topk(top_k, dim=1)
        for path, row_values, row_indices in zip(args.images[start : start + 64], values, indices):
            print(path)
            for rank, (p, c) in enumerate(zip(row_values.tolist(), row_indices.tolist()), 1):
                print(f"  {rank}. {predictor.classes[c]:<{width}}  {100 * p:6.2f}%")
    return 0
