"""The offline generator: a small class-conditional diffusers UNet2DModel trained on PUBLIC images, and its sampler.

Training is plain DDPM (ε-prediction, MSE) with class dropout for classifier-free guidance; the model is saved
with `save_pretrained` (unet/ = EMA weights, scheduler/, and dpmix_generator.json: class names, image shape
and where the training data came from). Sampling uses DDIM with η = 0, so an image is a deterministic function
of its initial noise, and the initial noise of image i is drawn from a generator seeded with its own seed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from dpmix_dist.data.shards import load_split, read_metadata
from dpmix_dist.errors import DataError, ModelError
from dpmix_dist.synthetic.config import DiffusionTrainConfig, UNetConfig

GENERATOR_INFO = "dpmix_generator.json"


def build_unet(cfg: UNetConfig, image_size: int, channels: int, num_classes: int) -> UNet2DModel:
    levels = len(cfg.block_out_channels)
    if image_size % 2 ** (levels - 1):
        raise DataError(
            f"unet.block_out_channels: {levels} levels halve the image {levels - 1} times, but {image_size} px is "
            f"not divisible by {2 ** (levels - 1)}; use fewer levels"
        )
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if cfg.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=cfg.norm_num_groups,
        num_class_embeds=num_classes + 1,  # + the 'no class' id used for classifier-free guidance
    )


def check_public(root: str | Path, meta: dict) -> None:
    """The generator's data must be public: refuse a folder marked as the private part of a split."""
    partition = meta.get("partition", {})
    if partition.get("role") == "private":
        raise DataError(
            f"data.root: {root} is the PRIVATE part of a public/private split; the generator must never see private "
            f"data (its images would then not be public). Train it on the public part: {partition.get('partner')}"
        )


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, C) -> float (n, C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_diffusion(cfg: DiffusionTrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Train the class-conditional UNet on `cfg.data.root`'s train split; returns a summary (also saved)."""
    t = cfg.train
    out = Path(cfg.output_dir)
    meta = read_metadata(cfg.data.root)
    check_public(cfg.data.root, meta)
    ckpt_path = out / "checkpoint.pt"
    if resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: {out} holds no unfinished training (no checkpoint.pt)")
    if not resume and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output_dir {out} is not empty; choose a new folder, or pass --resume to continue")
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    split = load_split(cfg.data.root, "train", cfg.data.cache_dir)
    height, width, channels = split.images.shape[1:]
    if height != width:
        raise DataError(f"data.root: images are {height}×{width}; the generator needs square images")
    num_classes = meta["num_classes"]
    images = _to_unit(split.images)  # public and small (e.g. 10k × 28 × 28): kept in memory
    labels = torch.from_numpy(np.asarray(split.labels))

    torch.manual_seed(t.seed)
    unet = build_unet(cfg.unet, height, channels, num_classes)
    scheduler = DDPMScheduler(num_train_timesteps=t.num_train_timesteps)
    ema = EMAModel(unet.parameters(), decay=t.ema_decay)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=t.lr, weight_decay=0.0)
    lr_at = lambda step: min(1.0, (step + 1) / max(t.warmup_steps, 1)) * 0.5 * (1 + math.cos(math.pi * step / t.steps))  # noqa: E731
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    gen = torch.Generator().manual_seed(t.seed)
    step, elapsed, losses = 0, 0.0, []
    if resume:
        state = torch.load(ckpt_path, weights_only=False)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        gen.set_state(state["generator"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
    out.mkdir(parents=True, exist_ok=True)

    def save_checkpoint() -> None:
        tmp = ckpt_path.with_suffix(".partial")
        torch.save(
            {
                "unet": unet.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_schedule": lr_schedule.state_dict(),
                "generator": gen.get_state(),
                "step": step,
                "elapsed": elapsed,
                "losses": losses,
            },
            tmp,
        )
        os.replace(tmp, ckpt_path)

    unet.train()
    bar = tqdm(total=t.steps, initial=step, desc="diffusion", unit="step", disable=not progress, dynamic_ncols=True)
    started = time.time() - elapsed
    last_save = time.time()
    while step < t.steps:
        idx = torch.randint(0, len(labels), (t.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        if cfg.data.hflip:
            flip = torch.rand(t.batch_size, generator=gen) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        y[torch.rand(t.batch_size, generator=gen) < t.class_dropout] = num_classes  # 'no class'
        noise = torch.randn(x0.shape, generator=gen)
        timesteps = torch.randint(0, t.num_train_timesteps, (t.batch_size,), generator=gen)
        pred = unet(scheduler.add_noise(x0, noise, timesteps), timesteps, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(unet.parameters())
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        elapsed = time.time() - started
        if time.time() - last_save > 120 and step < t.steps:  # a killed job loses at most two minutes
            save_checkpoint()
            last_save = time.time()
    bar.close()

    ema.copy_to(unet.parameters())
    tmp = out / ".final.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet")
    scheduler.save_pretrained(tmp / "scheduler")
    info = {
        "kind": "class_conditional",
        "classes": meta["classes"],
        "num_classes": num_classes,
        "null_class": num_classes,
        "image_shape": [height, width, channels],
        "trained_on": {
            "root": str(cfg.data.root),
            "name": meta.get("name"),
            "partition": meta.get("partition"),
            "train_shards": meta["splits"]["train"]["shards"],
        },
        "steps": step,
        "batch_size": t.batch_size,
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "train_seconds": round(elapsed, 1),
        "config": _asdict(cfg),
    }
    (tmp / GENERATOR_INFO).write_text(json.dumps(info, indent=2))
    for name in ("unet", "scheduler", GENERATOR_INFO):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt_path.unlink(missing_ok=True)
    return info


def _asdict(cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def deterministic_scheduler(config: dict, name: str):
    """A sampler whose output is a function of the initial noise alone: DDIM (η = 0, trailing timesteps, so the
    first step starts from pure noise) or DPM-Solver++ (2nd order multistep, no SDE noise)."""
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    return DDIMScheduler.from_config(config, timestep_spacing="trailing")


class ClassConditionalSampler:
    """Samples a folder written by `train_diffusion` with classifier-free guidance and a deterministic sampler
    (`ddim` or `dpm`, see `deterministic_scheduler`)."""

    def __init__(
        self,
        folder: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        sampler: str = "ddim",
    ):
        folder = Path(folder)
        info_path = folder / GENERATOR_INFO
        if not folder.is_dir():
            raise ModelError(
                f"generator.model: folder {folder} does not exist; train it with `python launch/train_diffusion.py "
                "--config fmnist_ddpm` (or point generator.model at a folder it wrote)"
            )
        if not info_path.is_file() or not (folder / "unet").is_dir():
            raise ModelError(
                f"generator.model: {folder} is not a class-conditional generator written by "
                "launch/train_diffusion.py (no unet/ or dpmix_generator.json)"
            )
        self.info = json.loads(info_path.read_text())
        self.unet = UNet2DModel.from_pretrained(folder / "unet", torch_dtype=dtype).to(device).eval()
        self.scheduler = deterministic_scheduler(DDPMScheduler.load_config(folder / "scheduler"), sampler)
        self.device, self.dtype = torch.device(device), dtype
        self.image_size = self.info["image_shape"][0]
        self.channels = self.info["image_shape"][2]

    @torch.no_grad()
    def sample(self, class_ids: list[int], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
        """uint8 images (n, H, W, C): image i from seed i, class i. Same seed and class -> same image,
        whatever else is in the batch (up to the kernels' batch-size dependence)."""
        shape = (self.channels, self.image_size, self.image_size)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        x = torch.stack(noise).to(self.device, self.dtype)
        y = torch.tensor(class_ids, device=self.device)
        null = torch.full_like(y, self.info["null_class"])
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            if guidance == 1.0:
                eps = self.unet(x, t, class_labels=y).sample
            else:
                both = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([y, null])).sample
                cond, uncond = both.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            x = self.scheduler.step(eps, t, x).prev_sample
        images = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()
