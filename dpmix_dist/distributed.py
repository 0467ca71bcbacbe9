"""Everything that knows about processes, ranks and devices. The only module that imports accelerate.

`accelerate launch` (or torchrun) sets the environment; `PartialState` joins the process group (gloo on CPU,
NCCL on GPUs). The training code asks this module simple questions (`all_reduce_sum`, `any_rank`) and never
branches on ranks itself: what only the main process does (files, the tracker, messages, progress bars) goes
through `on_main`, `print` and `progress`.

ZeRO (stages 1 and 2) is implemented here and in `zero.py` with torch.distributed collectives, not by
`deepspeed.initialize`: DeepSpeed reduces `param.grad` itself (averaging, in backward hooks, into padded
partitions of its own flat layout), while the mechanism must reduce clipped sums with SUM and add the noise of
exactly the coordinates each rank owns, in its own flat order; doing that inside DeepSpeed means patching its
optimizer's internals. An accelerate DeepSpeed config (`configs/accelerate/deepspeed_zero{1,2}.yaml`) still
selects the stage: `accelerate launch` exports ACCELERATE_DEEPSPEED_ZERO_STAGE, read by `launcher_zero_stage`.
Why accelerate's DeepSpeed plugin sees world size 1 on CPU: `PartialState(cpu=False)` takes its DeepSpeed
branch, but finds a backend only on an accelerator, so with no GPU `backend` stays None and it sets
num_processes = 1 on every rank. We pass cpu=True without a GPU: accelerate then forms the gloo group (MULTI_CPU)
and ignores the DeepSpeed plugin, which we do not use.

Collectives run under a timeout (fine-tuning: `run.collective_timeout_s`; otherwise torch's 30 min), and a failed one
raises `RankLost` on the ranks that are left: a process that died (its sockets close, so gloo fails at once), hung or
became unreachable (the timeout) ends the run with a message and a non-zero exit status instead of a hang. The group
is then left as it is: no barrier, no teardown, since the peers it would wait for are gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as torch_dist
from accelerate import PartialState
from tqdm import tqdm

from dpmix_dist.errors import USER_ERRORS, RankLost

T = TypeVar("T")


def _short(exc: BaseException) -> str:
    """The gist of a torch.distributed error: gloo's "[file.cc:123] Read error [addr]:port: Connection reset by
    peer. This is typically ..." becomes "Read error [addr]:port: Connection reset by peer"."""
    text = re.sub(r"\[[^\]\s]*\.(?:cc|cpp|h):\d+\]\s*", "", str(exc).strip())  # gloo's source locations
    return text.split(". ")[0][:200] or type(exc).__name__


class Distributed:
    """The process group as the trainer sees it. One process works too (world size 1, no collectives)."""

    def __init__(self, cpu: bool = False, collective_timeout_s: float | None = None) -> None:
        """`collective_timeout_s`: how long a collective may wait for the other ranks (None: torch's default,
        30 min; fine-tuning passes `run.collective_timeout_s`; generation keeps the default, as a rank that has
        finished its shards may wait at the barrier for as long as the others render)."""
        # Without a GPU, accelerate only forms a multi-process (gloo) group when told cpu=True; otherwise each
        # launched process silently believes it is alone.
        timeout = {} if collective_timeout_s is None else {"timeout": timedelta(seconds=collective_timeout_s)}
        try:
            self._state = PartialState(cpu=cpu or not torch.cuda.is_available(), **timeout)
        except RuntimeError as exc:  # the rendezvous or gloo's full mesh failed: name what to check
            raise RankLost(
                f"could not form the process group ({_short(exc)}): check that every node reaches "
                "--main_process_ip:--main_process_port, and on hosts with several networks set GLOO_SOCKET_IFNAME "
                "(CPU) or NCCL_SOCKET_IFNAME (GPU) to the interface that joins the nodes"
            ) from exc
        self.collective_timeout_s = collective_timeout_s
        self._lost = False  # a collective failed: the group is unusable (close() must not wait on it)
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched != self._state.num_processes:
            raise RuntimeError(
                f"launched {launched} processes but the process group has {self._state.num_processes}: "
                "check the accelerate config (distributed_type) and that every rank can reach the main process"
            )
        self.rank = self._state.process_index
        self.local_rank = self._state.local_process_index
        self.world_size = self._state.num_processes
        self.device = self._state.device
        self.is_main = self._state.is_main_process
        self.is_local_main = self._state.is_local_main_process
        self.num_nodes = int(os.environ.get("NNODES", os.environ.get("GROUP_WORLD_SIZE", "1")) or 1)

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A user error is raised on every rank alike (same config, same data): leave the group together. After a
        # bug the other ranks may never reach the barrier; the launcher ends them when this process exits.
        if exc_type is None or issubclass(exc_type, USER_ERRORS):
            self.close()

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Turn a failed or timed-out collective into `RankLost` (gloo raises a bare RuntimeError for both)."""
        if self._lost:
            raise RankLost(f"rank {self.rank}: the process group was already lost; cannot run {what}")
        try:
            yield
        except RuntimeError as exc:
            self._lost = True
            where = f"rank {self.rank} of {self.world_size} lost the other processes during {what} ({_short(exc)})"
            limit = "torch's 30 min" if self.collective_timeout_s is None else f"{self.collective_timeout_s:g} s"
            raise RankLost(
                f"{where}: one died, hung for more than the collective timeout ({limit}, run.collective_timeout_s), "
                "or the network between them failed; the launcher's log of each node says which"
            ) from exc

    @property
    def active(self) -> bool:
        return self.world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized()

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """In-place SUM over all ranks."""
        if self.active:
            with self._collective("an all-reduce"):
                torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)

    def reduce_scatter_sum(self, rows: torch.Tensor) -> torch.Tensor:
        """Row `rank` of the SUM over ranks of `rows` ((world size, L), the same shape on every rank)."""
        if rows.dim() != 2 or rows.shape[0] != self.world_size:
            raise ValueError(f"reduce-scatter needs ({self.world_size}, L) rows, got {tuple(rows.shape)}")
        out = torch.empty(rows.shape[1], dtype=rows.dtype, device=rows.device)
        if self.active:
            with self._collective("a reduce-scatter"):  # flat: gloo checks len(input) == W x len(output)
                torch_dist.reduce_scatter_tensor(out, rows.contiguous().view(-1), op=torch_dist.ReduceOp.SUM)
        else:
            out.copy_(rows[0])
        return out

    def all_gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """(world size, L): row r is rank r's `row` (L the same on every rank)."""
        out = torch.empty(self.world_size * row.numel(), dtype=row.dtype, device=row.device)  # flat, as for gloo
        if self.active:
            with self._collective("an all-gather"):
                torch_dist.all_gather_into_tensor(out, row.contiguous().view(-1))
        else:
            out.copy_(row.view(-1))
        return out.view(self.world_size, row.numel())

    def broadcast_secret(self, value: int | None) -> int:
        """The main process's secret (e.g. the seed) to every rank, through the process group only."""
        tensor = torch.tensor([value if value is not None else -1], dtype=torch.int64, device=self.device)
        if self.active:
            with self._collective("a broadcast"):
                torch_dist.broadcast(tensor, src=0)
        result = int(tensor.item())
        if result < 0:
            raise RuntimeError("the main process had no secret to broadcast")
        return result

    def broadcast_object(self, obj: object) -> object:
        """A small picklable value from the main process to every rank (e.g. the output folder name)."""
        if not self.active:
            return obj
        box = [obj]
        with self._collective("a broadcast"):
            torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[..., T], *args, **kwargs) -> T | None:
        """`fn(*args, **kwargs)` on the main process only (its result there; None on the other ranks)."""
        return fn(*args, **kwargs) if self.is_main else None

    def print(self, *values, stderr: bool = False) -> None:
        """A message from the main process only (flushed; `stderr=True` for warnings and errors)."""
        if self.is_main:
            print(*values, file=sys.stderr if stderr else sys.stdout, flush=True)

    def progress(self, show: bool = True, **tqdm_kwargs) -> tqdm:
        """A tqdm bar drawn by the main process only (hidden everywhere when `show` is False)."""
        return tqdm(disable=not (show and self.is_main), **tqdm_kwargs)

    def barrier(self) -> None:
        if self.active:
            with self._collective("a barrier"):
                torch_dist.barrier()

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """The node's first process runs the block first (e.g. to build a cache), then the others."""
        if not self.is_local_main:
            self.barrier()
        yield
        if self.is_local_main:
            self.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank (e.g. 'a signal asked us to stop')."""
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self.all_reduce_sum(tensor)
        return bool(tensor.item() > 0)

    def check_identical(self, flat: torch.Tensor, what: str) -> None:
        """Fail loudly unless `flat` is bit-identical on all ranks (compared by two float64 fingerprints)."""
        if not self.active:
            return
        x = flat.detach().double()
        weights = torch.arange(x.numel(), device=x.device, dtype=torch.float64).remainder_(97).add_(1)
        fingerprint = torch.stack([x.sum(), (x * weights).sum()])
        low, high = fingerprint.clone(), fingerprint.clone()
        with self._collective("an all-reduce"):
            torch_dist.all_reduce(low, op=torch_dist.ReduceOp.MIN)
            torch_dist.all_reduce(high, op=torch_dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError(f"{what} differ across ranks; the ranks ran different updates (a bug: please report)")

    def launcher_zero_stage(self) -> int | None:
        """The ZeRO stage an accelerate DeepSpeed config asked for (None when not launched with one). Only the stage is
        honoured: offloading and ZeRO-3 are refused rather than silently ignored."""
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            return None
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
        offload = [
            key
            for key in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")
            if os.environ.get(key, "none").lower() not in ("none", "")
        ]
        if stage not in (0, 1, 2) or offload:
            raise RuntimeError(
                f"the accelerate DeepSpeed config asks for zero_stage {stage}"
                + (f" with {', '.join(offload)}" if offload else "")
                + ": only ZeRO stages 0-2 without offload are supported (configs/accelerate/deepspeed_zero2.yaml)"
            )
        return stage

    def close(self) -> None:
        if self.active and not self._lost:
            self.barrier()
            torch_dist.destroy_process_group()
