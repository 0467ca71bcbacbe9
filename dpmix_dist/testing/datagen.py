"""Small data sets in the real on-disk formats (idx.gz, CIFAR python tarball, ImageFolder), made by tests and
benchmarks; also a tiny random-weight diffusion generator and text-to-image pipeline, and a synthetic-image folder.

Images carry their label (a class-specific pattern plus noise), so a model can learn them in a few steps.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np


def class_images(labels: np.ndarray, size: int, channels: int, seed: int) -> np.ndarray:
    """uint8 (N, size, size, channels): class c lights up the c-th horizontal band, plus noise."""
    rng = np.random.default_rng(seed)
    n, num_classes = len(labels), int(labels.max()) + 1
    images = rng.integers(0, 60, size=(n, size, size, channels)).astype(np.int32)
    band = max(1, size // num_classes)
    for i, c in enumerate(labels):
        images[i, c * band % size : c * band % size + band, :, :] += 180
    return np.clip(images, 0, 255).astype(np.uint8)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist_idx(folder: Path, num_train: int = 200, num_test: int = 50, seed: int = 0) -> Path:
    """Fashion-MNIST's four idx.gz files, 28×28 grey, 10 classes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        labels = rng.integers(0, 10, size=n)
        labels[:10] = np.arange(10)  # every class present
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", class_images(labels, 28, 1, seed + n)[..., 0])
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def make_cifar_tarball(path: Path, num_classes: int, num_train: int = 100, num_test: int = 20, seed: int = 0) -> Path:
    """A cifar-10-python.tar.gz / cifar-100-python.tar.gz with the official member names and pickle keys."""
    rng = np.random.default_rng(seed)
    names = [f"class{i}".encode() for i in range(num_classes)]

    def batch(n: int, key: bytes) -> dict:
        labels = rng.integers(0, num_classes, size=n)
        data = class_images(labels, 32, 3, int(rng.integers(1 << 30))).transpose(0, 3, 1, 2).reshape(n, -1)
        return {b"data": data, key: labels.tolist()}

    if num_classes == 10:
        top = "cifar-10-batches-py"
        members = {f"data_batch_{i}": batch(num_train // 5, b"labels") for i in range(1, 6)}
        members["test_batch"] = batch(num_test, b"labels")
        members["batches.meta"] = {b"label_names": names}
    else:
        top = "cifar-100-python"
        members = {"train": batch(num_train, b"fine_labels"), "test": batch(num_test, b"fine_labels")}
        members["meta"] = {b"fine_label_names": names}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            payload = pickle.dumps(obj)
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def make_image_folder(
    root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 4, size: int = 20
) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            images = class_images(np.full(per_class, c), size, 3, seed=c + 10 * len(split))
            for i, image in enumerate(images):
                Image.fromarray(image).save(root / split / name / f"{i}.png")
    return root


def make_tiny_class_conditional_generator(folder: Path, public_root: Path) -> Path:
    """A random-weight class-conditional generator in train_diffusion.py's layout (unet/, scheduler/, info)."""
    import json

    import torch
    from diffusers import DDPMScheduler

    from dpmix_dist.data.shards import read_metadata
    from dpmix_dist.synthetic.config import UNetConfig
    from dpmix_dist.synthetic.diffusion import GENERATOR_INFO, build_unet

    meta = read_metadata(public_root)
    torch.manual_seed(0)
    unet = build_unet(UNetConfig(block_out_channels=(8, 16), norm_num_groups=4), 28, 1, meta["num_classes"])
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(folder / "scheduler")
    info = {
        "kind": "class_conditional",
        "classes": meta["classes"],
        "num_classes": meta["num_classes"],
        "null_class": meta["num_classes"],
        "image_shape": [28, 28, 1],
        "trained_on": {"root": str(public_root)},
    }
    (folder / GENERATOR_INFO).write_text(json.dumps(info))
    return folder


def make_tiny_text2image_pipeline(folder: Path) -> Path:
    """A random-weight Stable-Diffusion-style pipeline (UNet2DConditionModel + AutoencoderKL + CLIP text encoder),
    built from configs and saved with save_pretrained: the text-to-image code path, without any download."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=32,
    )
    # A byte-level BPE vocabulary over lowercase letters: every prompt tokenises, no download needed.
    # (transformers 5 ignores vocab_file=/merges_file= here; vocab=/merges= objects work.)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            projection_dim=16,
        )
    )
    scheduler = DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def make_synthetic_folder(
    root: Path,
    classes: list[str],
    per_class: int = 20,
    size: int = 28,
    channels: int = 1,
    seed: int = 7,
    trained_on: dict | None = None,
    external_pretrained: bool | None = None,
) -> Path:
    """A synthetic-image folder in the format launch/generate.py writes (shards + metadata with a 'synthetic'
    record), filled with class-pattern images: stands in for a diffusion generator's output in trainer tests.
    Its generator is declared an external pretrained model unless `trained_on` records its training data."""
    from dpmix_dist.data.shards import write_dataset
    from dpmix_dist.data.sources import RawDataset, RawSplit

    labels = np.repeat(np.arange(len(classes)), per_class)
    images = class_images(labels, size, channels, seed)
    record = {
        "generator": "dpmix_dist.testing.datagen",
        "kind": "class_conditional",
        "base_seed": seed,
        "per_class_counts": {c: per_class for c in classes},
        "generator_info": {"trained_on": trained_on} if trained_on else None,
        "external_pretrained": not trained_on if external_pretrained is None else external_pretrained,
        "public": "images of a generator that never saw the private data",
    }
    dataset = RawDataset(
        f"synthetic:{root.name}",
        tuple(classes),
        {"train": RawSplit(images, labels.astype(np.int64))},
        "dpmix_dist.testing.datagen",
    )
    return write_dataset(dataset, root, extra={"synthetic": record})
