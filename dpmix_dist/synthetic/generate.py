"""Render synthetic images per class into WebDataset shards: distributed, resumable, reproducible per image.

The work is a fixed list of items (class c, index j), c-major, cut into shards of `images_per_shard`. Rank r of
W renders the shards s ≡ r (mod W) that are not finished yet, each in the same batches whatever W is, so the union
equals a one-process run. Image (c, j) is rendered from `image_seed(base, c, j)`: any image can be regenerated.

A shard is written to a hidden `.partial-*` file, synced, then renamed into place: a shard under its final name is
complete, and a killed job loses at most the shards it was writing. `generation.json` (written first) pins the
settings: a restart with other settings is refused instead of mixing two generations. `metadata.json` (written
last, by the main process) lists every shard with its SHA-256, in the format `dpmix_dist.data.shards` reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from dpmix_dist.data.shards import FORMAT_VERSION, METADATA, _all_shards, _png, _sha256, read_metadata
from dpmix_dist.errors import ConfigError, DataError, ModelError
from dpmix_dist.synthetic.config import GenerateConfig, GeneratorConfig

SETTINGS = "generation.json"
SHARD = "train-{:06d}.tar"
Renderer = Callable[[list[int], list[int], list[int]], np.ndarray]  # (class ids, indices in class, seeds) -> uint8


def image_seed(base: int, class_id: int, index: int) -> int:
    """The seed of image `index` of class `class_id`: SHA-256 of 'dpmix-synthetic/base/class/index', 63 bits."""
    digest = hashlib.sha256(f"dpmix-synthetic/{base}/{class_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def resolve_classes(cfg: GenerateConfig) -> tuple[str, ...]:
    names = tuple(cfg.classes.names)
    if cfg.classes.from_data:
        data_names = tuple(read_metadata(cfg.classes.from_data)["classes"])
        if names and names != data_names:
            raise ConfigError(
                f"classes.names differ from the classes of {cfg.classes.from_data} ({list(data_names)}); "
                "give one of the two, or the same names in the same order"
            )
        names = data_names
    if not names:
        raise ConfigError("classes: the class list is empty; give classes.names or a data folder in classes.from_data")
    return names


def plan_shards(num_classes: int, per_class: int, per_shard: int) -> list[list[tuple[int, int]]]:
    """Items (class, index in class), class-major, cut into shards."""
    items = [(c, j) for c in range(num_classes) for j in range(per_class)]
    return [items[i : i + per_shard] for i in range(0, len(items), per_shard)]


def _settings(cfg: GenerateConfig, classes: tuple[str, ...]) -> dict:
    """What determines the images (and so must not change between a run and its restart)."""
    gen = dataclasses.asdict(cfg.generator)
    gen.pop("num_threads")
    out = dataclasses.asdict(cfg.output)
    out.pop("dir")
    return json.loads(json.dumps({"generator": gen, "classes": list(classes), "output": out}))  # as stored (lists)


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = []
    for image in images:
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        resized = np.asarray(pil.resize((size, size), Image.LANCZOS), dtype=np.uint8)
        out.append(resized[..., None] if resized.ndim == 2 else resized)
    return np.stack(out)


# ------------------------------------------------------------------------------------------------ renderers


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("generator.precision: fp16 needs a GPU; use fp32 (or bf16) on the CPU")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def class_conditional_renderer(gen: GeneratorConfig, classes: tuple[str, ...], device: torch.device) -> Renderer:
    from dpmix_dist.synthetic.diffusion import ClassConditionalSampler

    sampler = ClassConditionalSampler(
        gen.model, device, _dtype(gen.precision, device), sampler="dpm" if gen.scheduler == "dpm" else "ddim"
    )
    if tuple(sampler.info["classes"]) != classes:
        raise ConfigError(
            f"generator.model {gen.model} was trained on classes {sampler.info['classes']}, not {list(classes)}; "
            "the synthetic labels would be wrong. Use the data folder it was trained on for classes.from_data"
        )
    if gen.resolution != sampler.image_size:
        raise ConfigError(
            f"generator.resolution: {gen.model} renders {sampler.image_size} px images; "
            f"set generator.resolution={sampler.image_size} (output_size resizes)"
        )

    def render(class_ids: list[int], indices: list[int], seeds: list[int]) -> np.ndarray:
        images = sampler.sample(class_ids, seeds, gen.num_inference_steps, gen.guidance_scale)
        return resize_uint8(images, gen.output_size)

    return render


def prompt_for(gen: GeneratorConfig, class_name: str, index: int) -> str:
    return gen.prompt_templates[index % len(gen.prompt_templates)].format(class_name=class_name)


def text2image_renderer(gen: GeneratorConfig, classes: tuple[str, ...], device: torch.device) -> Renderer:
    from diffusers import AutoPipelineForText2Image

    from dpmix_dist.synthetic.diffusion import deterministic_scheduler

    dtype = _dtype(gen.precision, device)
    local = Path(gen.model)
    looks_local = local.is_absolute() or gen.model.startswith(".") or local.exists() or gen.model.count("/") != 1
    if looks_local and not local.is_dir():
        raise ModelError(
            f"generator.model: folder {gen.model} does not exist; give a diffusers pipeline folder "
            "(save_pretrained layout) or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(gen.model, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        where = "a local folder" if local.is_dir() else "a hub id (needs internet once, then the HF cache)"
        raise ModelError(f"generator.model: cannot load {gen.model} as {where}: {str(exc).splitlines()[0]}") from None
    if gen.scheduler != "default":
        pipe.scheduler = deterministic_scheduler(pipe.scheduler.config, gen.scheduler)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def render(class_ids: list[int], indices: list[int], seeds: list[int]) -> np.ndarray:
        prompts = [prompt_for(gen, classes[c], j) for c, j in zip(class_ids, indices)]
        result = pipe(
            prompt=prompts,
            negative_prompt=[gen.negative_prompt] * len(prompts) if gen.negative_prompt else None,
            num_inference_steps=gen.num_inference_steps,
            guidance_scale=gen.guidance_scale,
            height=gen.resolution,
            width=gen.resolution,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],  # per image, device-independent
            output_type="np",
        )
        images = (np.clip(result.images, 0, 1) * 255).round().astype(np.uint8)
        return resize_uint8(images, gen.output_size)

    return render


def make_renderer(cfg: GenerateConfig, classes: tuple[str, ...], device: torch.device) -> Renderer:
    if cfg.generator.kind == "class_conditional":
        return class_conditional_renderer(cfg.generator, classes, device)
    return text2image_renderer(cfg.generator, classes, device)


# ------------------------------------------------------------------------------------------------ the job


def _write_shard(
    path: Path,
    items: list[tuple[int, int]],
    per_class: int,
    render: Renderer,
    cfg: GenerateConfig,
    classes: tuple[str, ...],
    on_images: Callable[[int], None],
) -> None:
    partial = path.with_name(f".partial-{path.name}")
    gen, base = cfg.generator, cfg.output.seed
    with open(partial, "wb") as stream:
        writer = wds.TarWriter(stream)
        for start in range(0, len(items), gen.batch_size):
            batch = items[start : start + gen.batch_size]
            class_ids, indices = [c for c, _ in batch], [j for _, j in batch]
            seeds = [image_seed(base, c, j) for c, j in batch]
            images = render(class_ids, indices, seeds)
            for (c, j), seed, image in zip(batch, seeds, images):
                record = {"class_id": c, "class_name": classes[c], "index_in_class": j, "seed": seed}
                if gen.kind == "text2image":
                    record["prompt"] = prompt_for(gen, classes[c], j)
                writer.write({"__key__": f"{c * per_class + j:08d}", "png": _png(image), "cls": c, "json": record})
            on_images(len(batch))
        writer.close()
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, path)  # atomic: only a complete shard carries a final name


def generate(cfg: GenerateConfig, dist, *, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Render every unfinished shard of this rank; the main process then writes metadata.json. Returns it."""
    out = Path(cfg.output.dir)
    classes = resolve_classes(cfg)
    settings = _settings(cfg, classes)
    per_class = cfg.output.images_per_class
    shards = plan_shards(len(classes), per_class, cfg.output.images_per_shard)

    # --- settings pinned before any work; a restart must match them
    error = dist.broadcast_object(dist.on_main(_pin_settings, out, settings))
    if error:
        raise DataError(error)
    if (out / METADATA).is_file():
        dist.on_main(log, f"{out}: already complete ({sum(len(s) for s in shards)} images); nothing to do")

    # --- the renderer only once the settings are known good (loading a pipeline takes a while)
    mine = [s for s in range(len(shards)) if s % dist.world_size == dist.rank]
    todo = [s for s in mine if not (out / SHARD.format(s)).is_file()]
    if len(todo) < len(mine):
        dist.on_main(log, f"resuming: skipping {len(mine) - len(todo)} finished shard(s) of this process")
    if todo:
        if cfg.generator.num_threads:
            torch.set_num_threads(cfg.generator.num_threads)
        render = make_renderer(cfg, classes, dist.device)
        total = sum(len(shards[s]) for s in todo)
        bar = dist.progress(
            progress, total=total, unit="img", desc=f"generate (rank {dist.rank})", dynamic_ncols=True, smoothing=0.1
        )
        started = time.time()
        for s in todo:
            _write_shard(out / SHARD.format(s), shards[s], per_class, render, cfg, classes, bar.update)
        bar.close()
        rate = total / max(time.time() - started, 1e-9)
        dist.on_main(
            log, f"rank 0 rendered {total} images in {time.time() - started:.1f} s ({rate:.2f} img/s per process)"
        )
    dist.barrier()

    # --- the main process checks the union and writes metadata.json last
    meta = dist.on_main(_write_metadata, out, cfg, classes, len(shards))
    dist.barrier()
    return meta


def _pin_settings(out: Path, settings: dict) -> str | None:
    """Record the settings in `out` (or check them against a restarted run's). An error message, or None."""
    error = None
    settings_path = out / SETTINGS
    if settings_path.is_file():
        old = json.loads(settings_path.read_text())
        if old != settings:
            changed = sorted(
                f"{s}.{k}"
                for s in settings
                for k in set(settings[s]) | set(old.get(s, {}))
                if not isinstance(settings[s], list) and old.get(s, {}).get(k) != settings[s].get(k)
            )
            changed += ["classes"] if old.get("classes") != settings["classes"] else []
            error = (
                f"output.dir {out} holds images generated with other settings ({', '.join(changed)}); "
                "use a new output.dir, or delete the folder to start over"
            )
    elif out.exists() and any(p.name != SETTINGS for p in out.iterdir()):
        error = f"output.dir {out} is not empty and was not written by launch/generate.py; choose a new folder"
    if error is None:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".partial-*"):  # shards a killed run was writing: never finished, never used
            stale.unlink()
        tmp = out / f".{SETTINGS}.tmp"
        tmp.write_text(json.dumps(settings, indent=2))
        os.replace(tmp, settings_path)
    return error


def _write_metadata(out: Path, cfg: GenerateConfig, classes: list[str], num_shards: int) -> dict:
    """The main process, once every shard is written: check the union, then write metadata.json last."""
    per_class = cfg.output.images_per_class
    names = [SHARD.format(s) for s in range(num_shards)]
    missing = [n for n in names if not (out / n).is_file()]
    if missing:
        raise DataError(f"{out}: shards {missing[:3]} missing after every process finished; re-run to render them")
    reader = wds.WebDataset(str(out / names[0]), shardshuffle=False, empty_check=False, nodesplitter=_all_shards)
    first = np.asarray(Image.open(io.BytesIO(next(iter(reader))["png"])))
    shape = list(first.shape) if first.ndim == 3 else [*first.shape, 1]
    meta = {
        "format_version": FORMAT_VERSION,
        "name": f"synthetic:{Path(cfg.generator.model).name}",
        "source": cfg.generator.model,
        "classes": list(classes),
        "num_classes": len(classes),
        "splits": {
            "train": {
                "num_examples": len(classes) * per_class,
                "image_shape": shape,
                "class_counts": [per_class] * len(classes),
                "shards": {n: _sha256(out / n) for n in names},
            }
        },
        "synthetic": {
            "generator": cfg.generator.model,
            "kind": cfg.generator.kind,
            "prompt_templates": list(cfg.generator.prompt_templates) if cfg.generator.kind == "text2image" else None,
            "num_inference_steps": cfg.generator.num_inference_steps,
            "guidance_scale": cfg.generator.guidance_scale,
            "resolution": cfg.generator.resolution,
            "output_size": cfg.generator.output_size,
            "precision": cfg.generator.precision,
            "base_seed": cfg.output.seed,
            "seed_rule": "image j of class c: "
            "int.from_bytes(sha256(f'dpmix-synthetic/{base_seed}/{c}/{j}')[:8]) & (2**63-1)",
            "per_class_counts": {name: per_class for name in classes},
            "generator_info": _generator_info(cfg),
            "external_pretrained": cfg.generator.external_pretrained,  # a declaration: see GeneratorConfig
            "public": "images of a generator that never saw the private data",
        },
    }
    tmp = out / f".{METADATA}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / METADATA)
    return meta


def _generator_info(cfg: GenerateConfig) -> dict | None:
    """What the class-conditional generator was trained on (its public split record), when it says."""
    path = Path(cfg.generator.model) / "dpmix_generator.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    return {k: info.get(k) for k in ("trained_on", "steps", "train_seconds")}
