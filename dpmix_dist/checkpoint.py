"""Stopping and resuming a run: the private checkpoint, what a resume must keep, and SIGINT/SIGTERM.

`checkpoint.pt` holds the secret seed, so it is a private artifact like the model: mode 0600, written atomically
(a temporary file, fsync, rename), deleted when the run finishes. It also records the guarantee its steps were taken
under; a resume whose plan differs (another N, σ, q, C, δ, accountant, precision) is refused, since the steps already
taken could not be accounted together with the new ones.

It carries the SHA-256 of its own content (`content_sha256`: every tensor's dtype, shape and bytes, every other
value, in order), checked before anything in it is used: torch.load reads a flipped bit in a tensor without
complaint, and a resume from a damaged file would go on with a model or a step count that no accounted run produced.
Inside the file rather than beside it, so that the one rename that publishes a checkpoint publishes its checksum too.

Under ZeRO (stages 1, 2) each rank writes its shard of the optimizer state to its own file
(`optimizer-shard-RANK-of-W-stepS.pt`, checksummed inside the same way) and `checkpoint.pt` names those files with
their coordinate bounds and SHA-256: the shards are written first, then `checkpoint.pt` is renamed into place, then
the shard files it no longer names are removed, so a crash at any point leaves a checkpoint whose files all exist.
A resume reads the shard files covering the coordinates its rank now owns (its own file at the same world size; at
another, the overlapping ones). All ranks read the run folder: on several nodes it must be a shared filesystem.

It records the noise stream too: a checkpoint of a version that drew the noise differently is refused (its steps
and the resumed ones would come from two streams, whose independence nothing guarantees).
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from dpmix_dist import summary as summary_json
from dpmix_dist.config import Config, config_to_dict
from dpmix_dist.data.shards import shards_digest
from dpmix_dist.distributed import Distributed
from dpmix_dist.privacy.guarantee import Guarantee
from dpmix_dist.privacy.noise import NOISE_STREAM_VERSION

CHECKPOINT = "checkpoint.pt"
SHARD_PREFIX = "optimizer-shard-"
_FIELDS = ("step", "secret_seed", "guarantee", "model", "optimizer", "scheduler", "history")


class CorruptCheckpoint(ValueError):
    """A checkpoint that cannot be read, or whose content does not match its recorded SHA-256."""


@dataclass
class State:
    step: int
    secret_seed: int
    settings: dict  # `mechanism_sections` of the config
    guarantee: dict  # the trainer's resume record
    model: dict
    optimizer: dict
    scheduler: dict
    history: list


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` beside `path`, then rename: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.partial")
    write(tmp)
    os.replace(tmp, path)


def mechanism_sections(config: Config) -> dict:
    """Everything but `run`, `performance`, `tracking` and `data.cache_dir`: what a resumed run must keep (those may
    change; the cache folder is node-local, so it differs between the nodes of one run)."""
    sections = {k: v for k, v in config_to_dict(config).items() if k not in ("run", "performance", "tracking")}
    sections["data"].pop("cache_dir")
    return sections


def resume_record(g: Guarantee, num_train: int, train_shards: dict[str, str], precision: str) -> dict:
    """What a resumed run must share with the steps already taken: the guarantee and the data it was planned on,
    and the numerics (bf16 vs fp32 changes the model beyond rounding; the two engines agree to rounding, so
    `performance.engine` may change), and the version of the noise stream (`privacy/noise.py`)."""
    return {
        "noise_stream": NOISE_STREAM_VERSION,
        "num_train_examples": num_train,
        "train_shards_sha256": shards_digest(train_shards),
        "sample_rate": g.sample_rate,
        "noise_multiplier": g.noise_multiplier,
        "max_grad_norm": g.max_grad_norm,
        "steps": g.steps,
        "accountant": g.accountant,
        "delta": g.delta,
        "expected_batch_size": g.expected_batch_size,
        "precision": precision,
    }


def content_sha256(content: dict) -> str:
    """SHA-256 of a checkpoint's content, independent of how torch lays it out in the file: containers with their
    lengths, tensors as dtype, shape and raw bytes, numbers, strings, booleans and None by their repr (exact for
    floats). Anything else is refused (its repr could name a memory address, which no reload reproduces)."""
    digest = hashlib.sha256()

    def feed(obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{t.dtype}{tuple(obj.shape)};".encode())
            digest.update(t.view(torch.uint8).numpy())
        elif isinstance(obj, dict):
            digest.update(f"{{{len(obj)};".encode())
            for key, value in obj.items():
                feed(key)
                feed(value)
        elif isinstance(obj, (list, tuple)):
            digest.update(f"[{len(obj)};".encode())
            for value in obj:
                feed(value)
        elif obj is None or isinstance(obj, (bool, int, float, str)):
            digest.update(f"{type(obj).__name__}:{obj!r};".encode())
        else:
            raise TypeError(f"a checkpoint cannot hold a {type(obj).__name__} (no stable checksum)")

    feed(content)
    return digest.hexdigest()


def _save_private(path: Path, content: dict) -> str:
    """`content` and its SHA-256 to `path`: mode 0600, atomic, on disk before the rename. Returns the SHA-256."""
    digest = content_sha256(content)

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            torch.save({**content, "sha256": digest}, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename publishes it: a crash leaves the old or the new one

    atomic_write(path, write)
    return digest


def save(output_dir: Path, state: State) -> None:
    _save_private(output_dir / CHECKPOINT, {**{k: getattr(state, k) for k in _FIELDS}, "config": state.settings})


def save_optimizer_shard(output_dir: Path, step: int, dist: Distributed, shard: dict) -> dict:
    """Every rank: write this rank's optimizer shard (`ShardedOptimizer.shard_state`) to its own file, and return
    the manifest of all ranks' files (bounds, SHA-256) that `checkpoint.pt` records as its optimizer state."""
    name = f"{SHARD_PREFIX}{{:04d}}-of-{dist.world_size:04d}-step{step:09d}.pt"
    digest = _save_private(output_dir / name.format(dist.rank), shard)
    row = torch.tensor([shard["start"], shard["stop"], *bytes.fromhex(digest)], dtype=torch.int64, device=dist.device)
    rows = dist.all_gather_rows(row).tolist()  # also the barrier: every shard is on disk before checkpoint.pt names it
    return {
        "zero_shards": [
            {"file": name.format(rank), "start": r[0], "stop": r[1], "sha256": bytes(r[2:]).hex()}
            for rank, r in enumerate(rows)
        ]
    }


def load_optimizer_shards(output_dir: Path, manifest: dict, start: int, stop: int) -> list[dict]:
    """The shard states of a ZeRO checkpoint's `manifest` that overlap coordinates [start, stop), each checked
    against its own checksum and the one `checkpoint.pt` recorded for it."""
    shards = []
    for entry in manifest["zero_shards"]:
        if entry["stop"] <= start or entry["start"] >= stop:
            continue
        path = output_dir / entry["file"]
        if not path.is_file():
            raise CorruptCheckpoint(
                f"--resume: {output_dir / CHECKPOINT} names the optimizer shard {entry['file']}, which is missing: "
                f"copy every {SHARD_PREFIX}* file with the checkpoint (on several nodes the run folder must be shared)"
            )
        shards.append(_load_verified(path, expected=entry["sha256"]))
    return shards


def is_sharded(optimizer_state: dict) -> bool:
    return "zero_shards" in optimizer_state


def remove_stale_shards(output_dir: Path, keep: set[str]) -> None:
    """Delete the optimizer shard files (and unfinished ones) that the current checkpoint does not name."""
    for path in output_dir.glob(f"*{SHARD_PREFIX}*"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def _load_verified(path: Path, expected: str | None = None) -> dict:
    """A checkpoint file's content, after checking its SHA-256 (and that it is `expected`, the one the checkpoint
    recorded for it, when given); `CorruptCheckpoint` names the file and the fix."""
    fix = (
        "it was damaged after it was written (disk, copy, transfer). Restore it from a good copy, or start the run "
        "again in a new --output-dir"
    )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)  # optimizer.load_state_dict moves it
    except OSError:  # unreadable (permissions, I/O): not a statement about the content
        raise
    except Exception as exc:  # a truncated or overwritten file fails in the zip or pickle reader
        raise CorruptCheckpoint(f"--resume: {path} cannot be read ({str(exc)[:200]}): {fix}") from None
    recorded = raw.pop("sha256", None) if isinstance(raw, dict) else None
    if recorded is None:
        raise CorruptCheckpoint(
            f"--resume: {path} carries no checksum (not a checkpoint of this version, or damaged); start the run "
            "again in a new --output-dir"
        )
    if content_sha256(raw) != recorded:
        raise CorruptCheckpoint(f"--resume: {path} does not match the SHA-256 recorded in it: {fix}")
    if expected is not None and recorded != expected:
        raise CorruptCheckpoint(
            f"--resume: {path} is not the file {CHECKPOINT} recorded (another checkpoint's shard): {fix}"
        )
    return raw


def load_for_resume(output_dir: Path, settings: dict, guarantee: dict, secret_seed: int) -> State:
    """The checkpoint in `output_dir`, after checking its checksum and that it was written under these settings and
    this guarantee."""
    path = output_dir / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {output_dir}; nothing to resume")
    raw = _load_verified(path)
    if raw["config"] != settings:
        changed = sorted(k for k, v in settings.items() if raw["config"].get(k) != v)
        raise ValueError(
            f"--resume: {path} was written with different {', '.join(changed)} settings; resume with the "
            "same ones (only run.* and performance.* may change)"
        )
    # The checkpoint's own record of what the steps taken so far were planned under: the same config can plan
    # a different guarantee (the data folder was rewritten with another N, or the accountant library changed).
    recorded = raw.get("guarantee")
    if recorded is None:
        raise ValueError(
            f"--resume: {path} carries no guarantee record (written by an older version); start the "
            "run again in a new --output-dir"
        )
    if recorded.get("noise_stream") != guarantee.get("noise_stream"):
        raise ValueError(
            f"--resume: {path} was written by a version that draws the noise differently (noise stream "
            f"{recorded.get('noise_stream', 1)}, this version {guarantee.get('noise_stream')}); resuming would mix two "
            "noise streams. Finish it with the version that wrote it, or start again in a new --output-dir"
        )
    if recorded != guarantee:
        changed = ", ".join(f"{k} {recorded.get(k)!r} -> {v!r}" for k, v in guarantee.items() if recorded.get(k) != v)
        raise ValueError(
            f"--resume: {path} was planned under a different guarantee ({changed}); the steps "
            "already taken cannot be accounted together with these. Resume with the data and "
            "settings it was written with, or start again in a new --output-dir"
        )
    if raw["secret_seed"] != secret_seed:
        raise ValueError("--resume: internal error, the secret seed was not restored from the checkpoint")
    return State(**{k: raw[k] for k in _FIELDS}, settings=raw["config"])


def read_seed(output_dir: Path) -> int | None:
    """The secret seed stored in a run's checkpoint (for --resume), or None if there is none. The checksum is
    verified here already: this is the first read of a resume, on the main process."""
    path = output_dir / CHECKPOINT
    if not path.is_file():
        return None
    return int(_load_verified(path)["secret_seed"])


def write_outputs(output_dir: Path, model: torch.nn.Module, summary: dict) -> None:
    """The finished run's model.safetensors and summary.json (each atomically); its private resume state goes."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(output_dir / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write(output_dir / "summary.json", lambda p: p.write_text(summary_json.dumps(summary)))
    (output_dir / CHECKPOINT).unlink(missing_ok=True)
    remove_stale_shards(output_dir, keep=set())


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: the step in flight finished, a checkpoint was written, --resume continues."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"stopped after step {step}/{total}")
        self.step = step


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps (a step is never cut in half)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
