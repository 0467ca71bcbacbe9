"""What the tests share: the offline environment, the subprocess helpers and the tiny model of the gradient checks.

Tests run offline: hub lookups are disabled for every test and every subprocess. Test modules import the helpers
below (`from conftest import ...`); data in the real file formats and the naive per-group reference live in
`dpmix_dist.testing`, which the benchmarks use too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from dpmix_dist.models import DPModel, make_dp_model

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """The session runs on one torch thread, module fixtures included (the count is restored at the end). The models
    and batches here are tiny: more threads gain nothing, and on shared cores they lose much, as each op waits for
    its slowest thread (measured on 2 busy cores: a clipping check 11 s -> 0.6 s, an augmented train step
    20 s -> 6 s). Subprocesses keep their own settings (OMP_NUM_THREADS where a module sets it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------- subprocesses


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous or a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(num_processes: int, config: str = "cpu_2proc.yaml") -> list[str]:
    """`accelerate launch` of `num_processes` CPU processes (gloo; one process: cpu_1proc.yaml) on a free port; the
    script and its arguments follow."""
    config = "cpu_1proc.yaml" if num_processes == 1 else config
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"configs/accelerate/{config}",
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(free_port()),
    ]


def offline_env(**extra: str | None) -> dict[str, str]:
    """The environment for a subprocess a test runs: this process's, offline (HF_HUB_OFFLINE=1), unbuffered, with
    this checkout first on PYTHONPATH (a script run from another folder imports the code under test, not some
    installed copy) and without the caller's MLFLOW_TRACKING_URI (a run logs where its config says, never to the
    caller's server). `extra` sets more variables; a value of None removes one."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env.pop("MLFLOW_TRACKING_URI", None)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def prepare_data(*args: str) -> None:
    """`launch/prepare_data.py ARGS`, the real command, offline; the test fails if it does."""
    cmd = [sys.executable, "launch/prepare_data.py", *args]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=offline_env())


# ---------------------------------------------------------------------------------------------- the tiny model

NUM_CLASSES = 5

# kind -> (timm model, its kwargs, make_dp_model's kwargs): the layer types the clipping engines must get right
_TINY = {
    "vit": ("test_vit", dict(img_size=32, init_values=0.1), dict(trainable="all")),  # cls/pos, LayerScale
    "vit_last": (
        "test_vit",
        dict(img_size=32, init_values=0.1),  # LayerNorm, Linear (qkv, proj, mlp), LayerScale
        dict(trainable="last_blocks", num_trainable_blocks=2),
    ),
    "resnet_gn": ("test_resnet", {}, dict(norm="groupnorm", groupnorm_groups=4, trainable="all")),  # Conv2d, GroupNorm
    "efficientnet": ("test_efficientnet", {}, dict(norm="freeze", trainable="all")),  # depthwise Conv2d, frozen BN
    "efficientnet_last": (
        "test_efficientnet",
        {},
        dict(norm="freeze", trainable="last_blocks", num_trainable_blocks=2),
    ),
    # Conv2dSame (TF 'same' padding, stride 2), depthwise, frozen BN: the offline default's backbone
    "tf_effnet_lite0_tail": ("tf_efficientnet_lite0", {}, dict(trainable="last_blocks", num_trainable_blocks=5)),
    "convnext_head": ("test_convnext", {}, dict(trainable="head")),  # LayerNorm2d-free head: norm + Linear
    # LayerNorm2d stem/downsample norms, depthwise 7x7, LayerNorm, Linear mlp, raw gamma
    "convnext_all": ("test_convnext", dict(ls_init_value=0.5), dict(trainable="all")),
    # the conv-mlp variant: 1x1 Conv2d mlp, channels-first
    "convnext_conv_mlp": ("test_convnext", dict(ls_init_value=0.5, conv_mlp=True), dict(trainable="all")),
}


def tiny_dp_model(kind: str, **timm_kwargs) -> DPModel:
    """A tiny timm model of `kind` (random weights, seed 0, NUM_CLASSES classes), DP-ready, with a random classifier
    weight (a real run starts it at zero; random here so that every trainable layer gets a non-zero gradient).
    `timm_kwargs` add to or replace the kind's timm arguments (e.g. ViT's `reg_tokens`)."""
    name, model_kwargs, dp_kwargs = _TINY[kind]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=NUM_CLASSES, **{**model_kwargs, **timm_kwargs})
    dp = make_dp_model(model, **dp_kwargs)
    with torch.no_grad():
        dp.model.get_classifier().weight.normal_(0, 0.5)
    return dp
