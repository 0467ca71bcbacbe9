"""Do the synthetic images carry their labels? A classifier trained on REAL public images labels them.

A small CNN is trained on the real public train split, then evaluated on the real test split (the reference:
what the classifier can do at all) and on every synthetic image, class by class. Synthetic images are brought
to the real images' size and channels first.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpmix_dist.data.shards import load_split, read_metadata
from dpmix_dist.errors import DataError
from dpmix_dist.synthetic.config import CheckConfig
from dpmix_dist.synthetic.generate import resize_uint8


def _small_cnn(channels: int, num_classes: int) -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(
        block(channels, 32),
        block(32, 64),
        block(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(128, num_classes),
    )


def _as(images: np.ndarray, size: int, channels: int) -> torch.Tensor:
    images = resize_uint8(np.asarray(images), size)
    if images.shape[-1] != channels:
        if channels == 1:  # RGB -> grey (ITU-R 601 luma)
            images = (images[..., :3] @ np.array([0.299, 0.587, 0.114]))[..., None].round().astype(np.uint8)
        else:
            images = np.repeat(images, channels, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.5)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def check_synthetic(
    synthetic_dir: str | Path, real_dir: str | Path, cfg: CheckConfig, cache_dir: str | Path, log=print
) -> dict:
    syn_meta, real_meta = read_metadata(synthetic_dir), read_metadata(real_dir)
    if not syn_meta.get("synthetic"):
        raise DataError(
            f"{synthetic_dir}: no synthetic set here (metadata.json has no 'synthetic' record); generate it first"
        )
    if real_meta.get("partition", {}).get("role") == "private":
        raise DataError(f"check.real_data: {real_dir} is the private part of a split; the check uses public data only")
    if syn_meta["classes"] != real_meta["classes"]:
        raise DataError(
            f"check.real_data: {real_dir} has classes {real_meta['classes']}, the synthetic set {syn_meta['classes']}"
        )
    classes = syn_meta["classes"]
    real_train = load_split(real_dir, "train", cache_dir)
    real_test = load_split(real_dir, "test", cache_dir)
    synthetic = load_split(synthetic_dir, "train", cache_dir)
    size, channels = real_train.images.shape[1], real_train.images.shape[3]
    x_train, y_train = _as(real_train.images, size, channels), torch.from_numpy(np.asarray(real_train.labels))
    x_test, y_test = _as(real_test.images, size, channels), torch.from_numpy(np.asarray(real_test.labels))
    x_syn, y_syn = _as(synthetic.images, size, channels), torch.from_numpy(np.asarray(synthetic.labels))

    torch.manual_seed(cfg.seed)
    model = _small_cnn(channels, len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * ((len(y_train) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    started = time.time()
    for _ in range(cfg.epochs):
        model.train()
        for idx in torch.randperm(len(y_train), generator=gen).split(cfg.batch_size):
            x = x_train[idx]
            if cfg.hflip:
                x = torch.where(torch.rand(len(idx), 1, 1, 1, generator=gen) < 0.5, x.flip(-1), x)
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    real_acc = (_predict(model, x_test) == y_test).float().mean().item()
    real_mirrored_acc = (_predict(model, x_test.flip(-1)) == y_test).float().mean().item()
    pred = _predict(model, x_syn)
    per_class = {name: (pred[y_syn == c] == c).float().mean().item() for c, name in enumerate(classes)}
    result = {
        "synthetic_accuracy": (pred == y_syn).float().mean().item(),
        "real_test_accuracy": real_acc,
        "real_test_accuracy_mirrored": real_mirrored_acc,
        "classifier_hflip": cfg.hflip,
        "per_class_synthetic_accuracy": per_class,
        "num_synthetic": int(len(y_syn)),
        "classifier_trained_on": str(real_dir),
        "classifier_train_seconds": round(time.time() - started, 1),
    }
    log(
        f"classifier trained on real public images ({len(y_train)}{', random flips' if cfg.hflip else ''}): real test "
        f"accuracy {real_acc:.4f} ({real_mirrored_acc:.4f} on the mirrored test images)"
    )
    log(f"{'class':24} synthetic accuracy")
    for name, acc in per_class.items():
        log(f"{name:24} {acc:.4f}")
    log(f"{'all synthetic':24} {result['synthetic_accuracy']:.4f}  ({len(y_syn)} images)")
    return result
