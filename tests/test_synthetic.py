"""Synthetic images (DP-Mix_Diff's public pool): public/private split, generator training, distributed and
resumable generation into shards, the label check, and clear errors."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml
from conftest import REPO, free_port, offline_env
from PIL import Image

from dpmix_dist.data.shards import load_split, read_metadata, write_dataset
from dpmix_dist.data.sources import RawDataset, RawSplit
from dpmix_dist.synthetic.diffusion import ClassConditionalSampler
from dpmix_dist.synthetic.generate import image_seed
from dpmix_dist.testing.datagen import (
    class_images,
    make_fashion_mnist_idx,
    make_tiny_class_conditional_generator,
    make_tiny_text2image_pipeline,
)

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return offline_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=None)


def _run(
    args: list[str], num_processes: int = 1, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    if num_processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            "configs/accelerate/cpu_2proc.yaml",
            "--num_processes",
            str(num_processes),
            "--main_process_port",
            str(free_port()),
            *args,
        ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def split_data(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("split")
    raw = make_fashion_mnist_idx(root / "idx", num_train=300, num_test=60)
    private, public = root / "private", root / "public"
    _run(
        [
            "launch/prepare_data.py",
            "fashion_mnist",
            "--source",
            str(raw),
            "--out",
            str(private),
            "--public-out",
            str(public),
            "--public-count",
            "120",
            "--split-seed",
            "3",
        ]
    )
    return private, public, root


@pytest.fixture(scope="module")
def generator(split_data) -> Path:
    _, public, root = split_data
    return make_tiny_class_conditional_generator(root / "generator", public)


def _gen_config(path: Path, model: Path, classes_from: Path, out: Path, **sections) -> Path:
    cfg = {
        "generator": {
            "kind": "class_conditional",
            "model": str(model),
            "num_inference_steps": 3,
            "guidance_scale": 2.0,
            "resolution": 28,
            "output_size": 28,
            "batch_size": 4,
            "num_threads": 1,
        },
        "classes": {"from_data": str(classes_from)},
        "output": {"dir": str(out), "images_per_class": 3, "images_per_shard": 7, "seed": 11},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _decoded(folder: Path) -> dict[str, tuple[np.ndarray, int, dict]]:
    """key -> (image, label, record) over every shard listed in metadata.json."""
    meta = read_metadata(folder)
    out = {}
    for name in meta["splits"]["train"]["shards"]:
        for sample in wds.WebDataset(str(folder / name), shardshuffle=False, empty_check=False):
            out[sample["__key__"]] = (
                np.asarray(Image.open(io.BytesIO(sample["png"]))),
                int(sample["cls"]),
                json.loads(sample["json"]),
            )
    return out


# ------------------------------------------------------------------------------------------- the split


def test_public_private_split_is_disjoint_complete_and_recorded(split_data):
    private, public, _ = split_data
    mp, mq = read_metadata(private), read_metadata(public)
    assert mp["partition"]["role"] == "private" and mq["partition"]["role"] == "public"
    assert mp["partition"]["partner"] == str(public) and mq["partition"]["partner"] == str(private)
    ip, iq = np.load(private / "source_indices.npy"), np.load(public / "source_indices.npy")
    assert len(iq) == 120 and len(ip) == 180
    assert not set(ip.tolist()) & set(iq.tolist())
    assert sorted([*ip.tolist(), *iq.tolist()]) == list(range(300))
    assert mp["splits"]["train"]["num_examples"] == 180 and mq["splits"]["train"]["num_examples"] == 120
    assert mp["splits"]["test"]["num_examples"] == mq["splits"]["test"]["num_examples"] == 60
    # the recorded digests are those of the index files, in both folders
    import hashlib

    for meta in (mp, mq):
        assert meta["partition"]["private_indices_sha256"] == hashlib.sha256(ip.astype(np.int64).tobytes()).hexdigest()
        assert meta["partition"]["public_indices_sha256"] == hashlib.sha256(iq.astype(np.int64).tobytes()).hexdigest()
    # the images really are the source images at those indices
    from dpmix_dist.data.sources import read_fashion_mnist

    source = read_fashion_mnist(split_data[2] / "idx").splits["train"]
    for folder, idx in ((private, ip), (public, iq)):
        split = load_split(folder, "train", folder.parent / "cache")
        assert np.array_equal(split.images, source.images[idx]) and np.array_equal(split.labels, source.labels[idx])


def test_finetune_refuses_the_public_part(split_data, tmp_path):
    _, public, _ = split_data
    proc = _run(
        [
            "launch/finetune.py",
            "--config",
            "tiny_test",
            "--output-dir",
            str(tmp_path / "run"),
            f"data.root={public}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "public part" in proc.stderr and str(public).replace("public", "private") in proc.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- train_diffusion


def test_train_diffusion_saves_a_loadable_generator_and_resumes(split_data, tmp_path):
    _, public, _ = split_data
    out = tmp_path / "gen"
    args = [
        "launch/train_diffusion.py",
        "--config",
        "fmnist_ddpm",
        "--no-progress",
        f"data.root={public}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"output_dir={out}",
        "unet.block_out_channels=[8,16]",
        "unet.norm_num_groups=4",
        "train.batch_size=8",
        "train.num_train_timesteps=50",
    ]
    proc = _run([*args, "train.steps=3"])
    summary = json.loads(proc.stdout.strip().splitlines()[-2])
    assert summary["steps"] == 3
    info = json.loads((out / "dpmix_generator.json").read_text())
    assert info["trained_on"]["partition"]["role"] == "public" and info["classes"] == read_metadata(public)["classes"]
    sampler = ClassConditionalSampler(out)
    images = sampler.sample([0, 3], [1, 2], steps=2, guidance=2.0)
    assert images.shape == (2, 28, 28, 1) and images.dtype == np.uint8
    # a finished folder is not overwritten; --resume without a checkpoint says so
    again = _run([*args, "train.steps=3"], check=False)
    assert again.returncode == 2 and "not empty" in again.stderr
    resumed = _run([*args, "train.steps=3", "--resume"], check=False)
    assert resumed.returncode == 2 and "no checkpoint.pt" in resumed.stderr


def test_train_diffusion_refuses_private_data(split_data, tmp_path):
    private, _, _ = split_data
    proc = _run(
        [
            "launch/train_diffusion.py",
            "--config",
            "fmnist_ddpm",
            f"data.root={private}",
            f"output_dir={tmp_path / 'gen'}",
            "train.steps=1",
        ],
        check=False,
    )
    assert proc.returncode == 2
    assert "PRIVATE part" in proc.stderr and "never see private" in proc.stderr
    assert not (tmp_path / "gen").exists()


# ------------------------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def reference(split_data, generator, tmp_path_factory) -> Path:
    """A complete one-process generation: 10 classes × 3 images in shards of 7."""
    _, public, _ = split_data
    root = tmp_path_factory.mktemp("ref")
    cfg = _gen_config(root / "gen.yaml", generator, public, root / "out")
    proc = _run(["launch/generate.py", "--config", str(cfg), "--no-progress"])
    assert "30 images of 10 classes in 5 shard(s), world size 1" in proc.stdout
    return root / "out"


def test_counts_seeds_and_readable_shards(reference, split_data, generator):
    _, public, _ = split_data
    meta = read_metadata(reference)
    assert meta["splits"]["train"]["class_counts"] == [3] * 10
    assert meta["synthetic"]["per_class_counts"] == {c: 3 for c in meta["classes"]}
    assert meta["classes"] == read_metadata(public)["classes"]
    assert meta["synthetic"]["base_seed"] == 11 and meta["synthetic"]["generator"] == str(generator)
    assert meta["synthetic"]["generator_info"]["trained_on"]["root"] == str(public)
    split = load_split(reference, "train", reference.parent / "cache")  # the training side's reader takes it
    assert np.bincount(split.labels, minlength=10).tolist() == [3] * 10
    samples = _decoded(reference)
    assert len(samples) == 30
    for key, (_image, label, record) in samples.items():
        assert int(key) == label * 3 + record["index_in_class"] and record["class_id"] == label
        assert record["seed"] == image_seed(11, label, record["index_in_class"])
    # any image can be regenerated from its seed alone (DDIM η = 0), outside any batch
    image, label, record = samples["00000017"]
    again = ClassConditionalSampler(generator).sample([label], [record["seed"]], steps=3, guidance=2.0)[0]
    assert np.abs(again[..., 0].astype(int) - image.astype(int)).max() <= 1
    assert len({s[0].tobytes() for s in samples.values()}) == 30  # distinct seeds, distinct images


def test_two_processes_render_the_same_set(reference, split_data, generator, tmp_path):
    _, public, _ = split_data
    cfg = _gen_config(tmp_path / "gen.yaml", generator, public, tmp_path / "out")
    proc = _run(["launch/generate.py", "--config", str(cfg), "--no-progress"], num_processes=2)
    assert "world size 2" in proc.stdout
    one, two = _decoded(reference), _decoded(tmp_path / "out")
    assert one.keys() == two.keys()
    for key in one:
        assert np.array_equal(one[key][0], two[key][0]), key
        assert one[key][1:] == two[key][1:]


def test_killed_run_resumes_without_losing_or_mixing_shards(reference, split_data, generator, tmp_path):
    _, public, _ = split_data
    out = tmp_path / "out"
    # one image per batch and more steps: slow enough to be killed between shards
    cfg = _gen_config(tmp_path / "gen.yaml", generator, public, out)
    cmd = [sys.executable, "launch/generate.py", "--config", str(cfg), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "train-000000.tar").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in out.glob("train-*.tar"))
    assert finished and not (out / "metadata.json").exists(), "the run ended before it could be killed"
    # a half-written shard, as a crash mid-write leaves it: never taken for a finished one
    (out / ".partial-train-000004.tar").write_bytes(b"half a tar")
    again = _run(["launch/generate.py", "--config", str(cfg), "--no-progress"])
    assert f"skipping {len(finished)} finished shard(s)" in again.stdout
    assert not list(out.glob(".partial-*"))
    one, two = _decoded(reference), _decoded(out)
    assert one.keys() == two.keys()
    for key in one:
        assert np.array_equal(one[key][0], two[key][0]) and one[key][1:] == two[key][1:], key
    # a restart with settings that change the images is refused, and the finished set is untouched
    before = (out / "metadata.json").read_bytes()
    changed = _run(["launch/generate.py", "--config", str(cfg), "output.seed=12"], check=False)
    assert changed.returncode == 2 and "other settings (output.seed)" in changed.stderr
    assert (out / "metadata.json").read_bytes() == before


def test_text_to_image_pipeline_with_templates(tmp_path):
    pipe = make_tiny_text2image_pipeline(tmp_path / "pipe")
    cfg = {
        "generator": {
            "kind": "text2image",
            "model": str(pipe),
            "num_inference_steps": 2,
            "guidance_scale": 3.0,
            "resolution": 32,
            "output_size": 16,
            "batch_size": 3,
            "precision": "fp32",
            "scheduler": "dpm",
            "prompt_templates": ["a photo of a {class_name}", "a drawing of a {class_name}"],
        },
        "classes": {"names": ["cat", "dog", "ship"]},
        "output": {"dir": str(tmp_path / "out"), "images_per_class": 4, "images_per_shard": 5, "seed": 1},
    }
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(cfg))
    _run(["launch/generate.py", "--config", str(tmp_path / "gen.yaml"), "--no-progress"])
    meta = read_metadata(tmp_path / "out")
    assert meta["classes"] == ["cat", "dog", "ship"] and meta["splits"]["train"]["class_counts"] == [4, 4, 4]
    assert meta["splits"]["train"]["image_shape"] == [16, 16, 3]
    assert meta["synthetic"]["prompt_templates"] == cfg["generator"]["prompt_templates"]
    samples = _decoded(tmp_path / "out")
    assert len(samples) == 12
    for _, (image, label, record) in samples.items():
        template = cfg["generator"]["prompt_templates"][record["index_in_class"] % 2]
        assert record["prompt"] == template.format(class_name=cfg["classes"]["names"][label])
        assert image.shape == (16, 16, 3)


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["generator.model=/nonexistent/generator"], "folder /nonexistent/generator does not exist"),
        (["generator.kind=text2image", "generator.model=/nonexistent/pipe"], "folder /nonexistent/pipe does not exist"),
        (["classes.from_data=", "classes.names=[]"], "classes"),
        (["generator.kind=text2image", "generator.prompt_templates=['a photo of a {cls}']"], "{class_name}"),
        (
            ["generator.kind=text2image", "generator.prompt_templates=['a photo of a {class_name']"],
            "not a valid template",
        ),
        (["generator.kind=text2image", "generator.prompt_templates=[]"], "at least one template"),
        (["generator.resolution=32"], "renders 28 px"),
    ],
)
def test_clear_errors_before_any_work(overrides, message, split_data, generator, tmp_path):
    _, public, _ = split_data
    cfg = _gen_config(tmp_path / "gen.yaml", generator, public, tmp_path / "out")
    proc = _run(["launch/generate.py", "--config", str(cfg), *overrides], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not list((tmp_path / "out").glob("*.tar")) if (tmp_path / "out").exists() else True


def test_wrong_class_list_for_a_class_conditional_generator(split_data, generator, tmp_path):
    _, public, _ = split_data
    cfg = _gen_config(
        tmp_path / "gen.yaml", generator, public, tmp_path / "out", classes={"from_data": "", "names": ["a", "b"]}
    )
    proc = _run(["launch/generate.py", "--config", str(cfg)], check=False)
    assert proc.returncode == 2 and "was trained on classes" in proc.stderr


# ------------------------------------------------------------------------------------------- --check


def test_check_tells_labelled_images_from_noise(reference, split_data, tmp_path):
    """The check's classifier (trained on real public images) recognises images that carry their labels and
    does not recognise the random generator's noise: the check can fail."""
    _, public, _ = split_data
    labels = np.repeat(np.arange(10), 8)
    good = RawDataset(
        "labelled",
        tuple(read_metadata(public)["classes"]),
        {"train": RawSplit(class_images(labels, 28, 1, seed=99), labels)},
        "test",
    )
    write_dataset(good, tmp_path / "good", extra={"synthetic": {"generator": "class-pattern images"}})
    results = {}
    for name, folder in (("good", tmp_path / "good"), ("noise", reference)):
        cfg = _gen_config(
            tmp_path / f"{name}.yaml",
            Path("unused"),
            public,
            folder,
            check={"real_data": str(public), "epochs": 20, "batch_size": 16, "hflip": name == "good"},
        )
        proc = _run(["launch/generate.py", "--config", str(cfg), "--check", "--cache-dir", str(tmp_path / "cache")])
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert "per_class_synthetic_accuracy" in json.loads((folder / "check.json").read_text())
        assert results[name]["classifier_hflip"] == (name == "good")  # the flip-trained classifier, recorded
    assert results["good"]["real_test_accuracy"] > 0.9
    assert results["good"]["real_test_accuracy_mirrored"] > 0.9  # the classes here are bands: mirror-invariant
    assert results["good"]["synthetic_accuracy"] > 0.9
    assert results["noise"]["synthetic_accuracy"] < 0.5
