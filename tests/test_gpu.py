"""GPU tier (marker `gpu`, skipped without CUDA): the same contract checks on a CUDA device."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import NUM_CLASSES, REPO, offline_env, tiny_dp_model
from torch.func import functional_call

from dpmix_dist.privacy.clipping import clipped_sum, per_example_grads
from dpmix_dist.privacy.layerwise import LayerwiseClipper
from dpmix_dist.privacy.mechanism import PrivateGradient
from dpmix_dist.testing.datagen import make_fashion_mnist_idx
from dpmix_dist.testing.reference import naive_clipped_sum, naive_group_grads

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["vit", "efficientnet"])
def test_per_group_grads_on_cuda_match_naive_loop(kind):
    dp = tiny_dp_model(kind)
    dp.model.cuda()
    x = torch.randn(4, 2, 3, 32, 32, device="cuda")
    y = torch.randint(0, NUM_CLASSES, (4, 2), device="cuda")
    params = {n: p.detach() for n, p in dp.trainable_params().items()}
    fast, _ = per_example_grads(lambda p, v: functional_call(dp.tail_module, p, (v,)), params, x, y)
    naive, _ = naive_group_grads(dp.cut.tail, dp.trainable_params(), x, y)
    assert list(fast) == list(naive)
    for n in naive:
        assert torch.allclose(fast[n], naive[n], atol=1e-4, rtol=1e-3), n
    assert all(v.is_cuda for v in clipped_sum(fast, 1.0).values())


def test_noise_std_on_cuda():
    shapes = {"w": torch.Size([1000, 100])}
    mech = PrivateGradient(
        shapes,
        noise_multiplier=1.5,
        max_grad_norm=2.0,
        expected_batch_size=30.0,
        secret_seed=3,
        world_size=1,
        all_reduce_sum=lambda t: None,
        device="cuda",
    )
    mech.begin_step(0)
    noise = mech.finish_step()
    assert noise.is_cuda
    expected = 1.5 * 2.0 / 30.0
    assert abs(noise.std().item() / expected - 1) < 5 / math.sqrt(2 * noise.numel())


def test_end_to_end_run_on_cuda(tmp_path):
    raw = make_fashion_mnist_idx(tmp_path / "idx", num_train=240, num_test=60)
    shards = tmp_path / "shards"
    subprocess.run(
        [sys.executable, "launch/prepare_data.py", "fashion_mnist", "--source", str(raw), "--out", str(shards)],
        cwd=REPO,
        check=True,
        env=offline_env(),
    )
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "launch/finetune.py",
            "--config",
            "tiny_test",
            "--seed",
            "5",
            "--output-dir",
            str(out),
            f"data.root={shards}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=offline_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"] <= 8.0 and summary["steps"] > 0
    assert summary["device"] == "cuda"


def _layerwise_vs_naive(kind: str, num_views: int, device: str) -> None:
    dp = tiny_dp_model(kind)
    dp.model.to(device)
    with torch.no_grad():
        feats = dp.cut.prefix(torch.randn(5 * num_views, 3, 32, 32, device=device))
    inputs = feats.view(5, num_views, *feats.shape[1:])
    targets = torch.randint(0, NUM_CLASSES, (5, num_views), device=device)
    grads, norms = naive_group_grads(dp.cut.tail, dp.trainable_params(), inputs, targets)
    max_norm = float(norms.median())
    expected = naive_clipped_sum(grads, norms, max_norm)
    engine = LayerwiseClipper(dp.tail_module, dp.trainable_params())
    got, _ = engine.clipped_sum(inputs, targets, max_norm)
    for name in expected:
        assert got[name].device.type == device and got[name].dtype == torch.float32
        assert torch.allclose(got[name], expected[name], atol=1e-4, rtol=1e-3), name
    # bf16: the engine may lose no more than bf16 itself loses in the naive loop (both against the fp32 reference)
    half, _ = engine.clipped_sum(inputs, targets, max_norm, autocast_dtype=torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        naive_half = naive_clipped_sum(
            *naive_group_grads(dp.cut.tail, dp.trainable_params(), inputs, targets), max_norm
        )
    flat = lambda d: torch.cat([g.float().flatten() for g in d.values()])  # noqa: E731
    ref = flat(expected)
    assert all(g.dtype == torch.float32 for g in half.values())  # sums stay fp32 under bf16 autocast
    assert not torch.equal(flat(half), ref)  # bf16 really ran
    err_engine = ((flat(half) - ref).norm() / ref.norm()).item()
    err_naive = ((flat(naive_half) - ref).norm() / ref.norm()).item()
    assert err_engine <= 2 * err_naive + 0.01, (err_engine, err_naive)


@pytest.mark.parametrize("kind", ["vit_last", "resnet_gn", "efficientnet", "convnext_all"])
@pytest.mark.parametrize("num_views", [1, 4])
def test_layerwise_engine_on_cuda_matches_naive_loop(kind, num_views):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare in true fp32
    _layerwise_vs_naive(kind, num_views, "cuda")


def test_synthetic_generation_on_cuda(tmp_path):
    """Text-to-image (fp16 under precision=auto) and class-conditional sampling on the GPU."""
    import numpy as np
    import yaml

    from dpmix_dist.data.shards import load_split, read_metadata
    from dpmix_dist.synthetic.diffusion import ClassConditionalSampler
    from dpmix_dist.testing.datagen import make_tiny_class_conditional_generator, make_tiny_text2image_pipeline

    pipe = make_tiny_text2image_pipeline(tmp_path / "pipe")
    cfg = {
        "generator": {
            "kind": "text2image",
            "model": str(pipe),
            "num_inference_steps": 4,
            "resolution": 32,
            "output_size": 16,
            "batch_size": 8,
            "precision": "auto",
        },
        "classes": {"names": ["cat", "dog"]},
        "output": {"dir": str(tmp_path / "out"), "images_per_class": 6, "images_per_shard": 5},
    }
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "launch/generate.py", "--config", str(tmp_path / "gen.yaml"), "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=offline_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = read_metadata(tmp_path / "out")
    assert meta["splits"]["train"]["class_counts"] == [6, 6]
    images = load_split(tmp_path / "out", "train", tmp_path / "cache").images
    assert images.shape == (12, 16, 16, 3) and images.std() > 0

    # class-conditional: the same seeds give (nearly) the same images on the GPU as on the CPU
    raw = make_fashion_mnist_idx(tmp_path / "idx", num_train=40, num_test=10)
    subprocess.run(
        [
            sys.executable,
            "launch/prepare_data.py",
            "fashion_mnist",
            "--source",
            str(raw),
            "--out",
            str(tmp_path / "priv"),
            "--public-out",
            str(tmp_path / "pub"),
            "--public-count",
            "20",
        ],
        cwd=REPO,
        check=True,
        env=offline_env(),
    )
    gen = make_tiny_class_conditional_generator(tmp_path / "gen", tmp_path / "pub")
    on_cpu = ClassConditionalSampler(gen).sample([0, 1, 2], [5, 6, 7], steps=5, guidance=2.0)
    on_gpu = ClassConditionalSampler(gen, device="cuda").sample([0, 1, 2], [5, 6, 7], steps=5, guidance=2.0)
    assert np.abs(on_cpu.astype(int) - on_gpu.astype(int)).mean() < 2.0
