"""Provenance by allowlist: DP-Mix_Diff mixes in synthetic images only from a generator that provably never saw
the private set (trained here on the public part of the very split) or one declared an external pretrained model.

Folders are written by the real launch/prepare_data.py; synthetic folders in launch/generate.py's format.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, offline_env

from dpmix_dist.data.provenance import check_private_root, check_synthetic_root
from dpmix_dist.data.shards import read_metadata
from dpmix_dist.errors import DataError
from dpmix_dist.testing.datagen import make_fashion_mnist_idx, make_synthetic_folder


def _prepare(raw: Path, out: Path, *extra: str) -> Path:
    subprocess.run(
        [sys.executable, "launch/prepare_data.py", "fashion_mnist", "--source", str(raw), "--out", str(out), *extra],
        cwd=REPO,
        check=True,
        capture_output=True,
        env=offline_env(),
    )
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prov")
    raw = make_fashion_mnist_idx(root / "idx", num_train=120, num_test=20)
    return {
        "priv": _prepare(raw, root / "priv", "--public-out", str(root / "pub"), "--public-count", "40"),
        "pub": root / "pub",
        "full": _prepare(raw, root / "full"),  # an unsplit copy of the whole training set: holds every private example
        "priv2": _prepare(
            raw, root / "priv2", "--public-out", str(root / "pub2"), "--public-count", "40", "--split-seed", "1"
        ),  # another split of the same source
        "pub2": root / "pub2",
        "root": root,
    }


def _trained_on(folder: Path) -> dict:
    """The record launch/train_diffusion.py keeps of the folder it trained on (dpmix_generator.json)."""
    meta = read_metadata(folder)
    return {"root": str(folder), "name": meta.get("name"), "partition": meta.get("partition"), "train_shards": {}}


def _synthetic(folders: dict, name: str, **kw) -> Path:
    classes = read_metadata(folders["priv"])["classes"]
    return make_synthetic_folder(folders["root"] / name, classes, per_class=1, **kw)


def _check(folders: dict, synthetic: Path) -> None:
    check_synthetic_root(str(synthetic), read_metadata(folders["priv"]), str(folders["priv"]))


def test_generator_trained_on_the_public_part_of_this_split_is_accepted(folders):
    _check(folders, _synthetic(folders, "ok", trained_on=_trained_on(folders["pub"])))


def test_declared_external_pretrained_generator_is_accepted(folders):
    _check(folders, _synthetic(folders, "sd", external_pretrained=True))


@pytest.mark.parametrize(
    "case,match",
    [
        ("undeclared", "does not say what its generator .* was trained on.*external_pretrained=true"),
        ("unsplit_full_copy", "not recorded as the public part of a public/private split"),
        ("private", "trained on the private data"),
        ("other_split", "public part of another split.*split_seed"),
        ("other_split_private_part", "trained on the private data"),
    ],
)
def test_anything_else_is_refused_with_the_way_out(folders, case, match):
    """Each refusal names what would make the pool acceptable. `unsplit_full_copy` is the case a blocklist missed:
    a generator trained on a full copy of the training set, which contains every private example."""
    trained_on = {
        "undeclared": None,
        "unsplit_full_copy": _trained_on(folders["full"]),
        "private": _trained_on(folders["priv"]),
        "other_split": _trained_on(folders["pub2"]),
        "other_split_private_part": _trained_on(folders["priv2"]),
    }[case]
    synthetic = _synthetic(folders, f"bad-{case}", trained_on=trained_on, external_pretrained=False)
    with pytest.raises(DataError, match=match) as info:
        _check(folders, synthetic)
    assert "launch/train_diffusion.py" in str(info.value) or "external_pretrained=true" in str(info.value)


def test_overlapping_source_indices_are_refused_even_when_the_records_agree(folders, tmp_path):
    """The digests say 'same split'; the index files are checked too, so a public folder whose index file was
    replaced by private positions is caught."""
    import shutil

    import numpy as np

    pub = tmp_path / "pub"
    shutil.copytree(folders["pub"], pub)
    private_positions = np.load(folders["priv"] / read_metadata(folders["priv"])["partition"]["indices_file"])
    np.save(pub / read_metadata(pub)["partition"]["indices_file"], private_positions[:5])
    with pytest.raises(DataError, match="share source examples"):
        _check(folders, _synthetic(folders, "overlap", trained_on=_trained_on(pub)))


def test_fine_tuning_refuses_public_and_synthetic_folders(folders):
    with pytest.raises(DataError, match="public part"):
        check_private_root(str(folders["pub"]), read_metadata(folders["pub"]))
    synthetic = _synthetic(folders, "syn-as-private")
    with pytest.raises(DataError, match="synthetic images"):
        check_private_root(str(synthetic), read_metadata(synthetic))
    check_private_root(str(folders["priv"]), read_metadata(folders["priv"]))


def test_folders_and_generator_records_written_with_the_old_split_key_are_read_the_same(folders, tmp_path):
    """Before the rename the public/private record was called "split" (in metadata.json and in the generator's
    trained_on record); such folders are read under "partition" and get the same decisions."""
    import json
    import shutil

    def old_format(folder: Path, name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        meta = json.loads((copy / "metadata.json").read_text())
        if "partition" in meta:
            meta["split"] = meta.pop("partition")
        trained_on = ((meta.get("synthetic") or {}).get("generator_info") or {}).get("trained_on")
        if trained_on and "partition" in trained_on:
            trained_on["split"] = trained_on.pop("partition")
        (copy / "metadata.json").write_text(json.dumps(meta))
        assert '"partition"' not in (copy / "metadata.json").read_text()
        return copy

    private, public = old_format(folders["priv"], "old-priv"), old_format(folders["pub"], "old-pub")
    assert read_metadata(private)["partition"]["role"] == "private"
    with pytest.raises(DataError, match="public part"):
        check_private_root(str(public), read_metadata(public))
    good = old_format(_synthetic(folders, "old-ok", trained_on=_trained_on(folders["pub"])), "old-ok-copy")
    check_synthetic_root(str(good), read_metadata(private), str(private))
    bad = old_format(_synthetic(folders, "old-bad", trained_on=_trained_on(folders["priv"])), "old-bad-copy")
    with pytest.raises(DataError, match="trained on the private data"):
        check_synthetic_root(str(bad), read_metadata(private), str(private))
