"""ZeRO stages 1 and 2 for the noised gradient: each rank updates only the shard of the parameters it owns.

The mechanism (`PrivateGradient` with `shard_index`) hands each rank the noised gradient of its contiguous shard
[start, stop) of the flat trainable-parameter vector (`shard_bounds`). `ShardedOptimizer` keeps an fp32-or-param-
dtype master copy of that shard and the optimizer (and its state: momentum, Adam moments) for it alone, so the
optimizer state per rank is 1/W of the replicated one; after each update the shards are all-gathered into the
parameters, which every rank holds whole (ZeRO-3 would shard those too; not implemented). The optimizers built by
`optim.build_optimizer` are elementwise, so updating a shard equals updating the whole and slicing.

Checkpoints: each rank writes its own shard of the optimizer state (`shard_state`, in the flat layout, with its
[start, stop) bounds) to its own file; nothing is gathered. A resume at the same world size reads only its own file;
at another world size or stage, each rank reads every shard file and takes the part it now owns (`load_shards`), so a
run checkpointed at one ZeRO stage or world size resumes at any other, holding the whole state briefly while it does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpmix_dist.config import ConfigError
from dpmix_dist.distributed import Distributed
from dpmix_dist.privacy.mechanism import shard_bounds

BuildOptimizer = Callable[[list[torch.Tensor]], tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]]


def resolve_stage(configured: int | None, dist: Distributed) -> int:
    """The run's ZeRO stage: `performance.zero_stage`, else the launcher's DeepSpeed config's, else 0."""
    launched = dist.launcher_zero_stage()
    if configured is not None and launched is not None and configured != launched:
        raise ConfigError(
            f"performance.zero_stage={configured} but the accelerate DeepSpeed config says zero_stage {launched}: "
            "set one of them"
        )
    return configured if configured is not None else (launched or 0)


def mechanism_reduction(stage: int, dist: Distributed) -> dict:
    """`PrivateGradient`'s reduction arguments for a stage: 0 all-reduce, whole vector; 1 all-reduce, this rank's
    shard; 2 reduce-scatter into this rank's shard."""
    if stage == 0:
        return {"all_reduce_sum": dist.all_reduce_sum}
    if stage == 1:
        return {"all_reduce_sum": dist.all_reduce_sum, "shard_index": dist.rank}
    return {"reduce_scatter_sum": dist.reduce_scatter_sum, "shard_index": dist.rank}


class ReplicatedOptimizer:
    """Stage 0, the same interface as `ShardedOptimizer`: every rank updates the whole vector."""

    def __init__(self, params: dict[str, torch.Tensor], unflatten: Callable, build: BuildOptimizer) -> None:
        self.params, self._unflatten = params, unflatten
        self.optimizer, self.scheduler = build(list(params.values()))
        self.start, self.stop = 0, sum(p.numel() for p in params.values())  # the coordinates it updates: all

    def step(self, grad: torch.Tensor) -> None:
        for name, g in self._unflatten(grad).items():
            self.params[name].grad = g.to(self.params[name].dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def sync_from_params(self) -> None:
        pass  # the optimizer updates the parameters themselves

    def full_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_full_state_dict(self, full: dict) -> None:
        self.optimizer.load_state_dict(full)

    def load_shards(self, shards: list[dict]) -> None:
        """Load the shard states of a ZeRO checkpoint (all of them: this rank updates every coordinate)."""
        self.load_full_state_dict(replicated_from_shards(shards, [p.shape for p in self.params.values()]))


class ShardedOptimizer:
    """The optimizer of this rank's shard of `params` (name -> parameter, in the mechanism's flat order).

    Args:
        params: the trainable parameters, whole on every rank.
        dist: the process group; this rank owns shard `dist.rank` of `dist.world_size`.
        build: makes the optimizer and schedule over a list of tensors (`optim.build_optimizer`, partially applied).
    """

    def __init__(self, params: dict[str, torch.Tensor], dist: Distributed, build: BuildOptimizer) -> None:
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) != 1:
            raise ValueError(f"ZeRO needs one dtype for all trainable parameters, got {sorted(map(str, dtypes))}")
        self.params, self.dist = params, dist
        self.numel = sum(p.numel() for p in params.values())
        self.start, self.stop = shard_bounds(self.numel, dist.world_size, dist.rank)
        self.width = -(-self.numel // dist.world_size)  # the common (padded) shard length of the collectives
        self.master = torch.zeros(self.stop - self.start, dtype=dtypes.pop(), device=dist.device, requires_grad=True)
        self.sync_from_params()
        self.optimizer, self.scheduler = build([self.master])

    @torch.no_grad()
    def sync_from_params(self) -> None:
        """Copy this rank's shard of the parameters into the master (after the parameters were loaded)."""
        flat = torch.cat([p.detach().reshape(-1) for p in self.params.values()])
        self.master.copy_(flat[self.start : self.stop])

    @torch.no_grad()
    def step(self, owned_grad: torch.Tensor) -> None:
        """Update the owned shard with its noised gradient, then all-gather the shards into the parameters."""
        if owned_grad.shape != self.master.shape:
            raise ValueError(f"gradient of shape {tuple(owned_grad.shape)} for a shard of {tuple(self.master.shape)}")
        self.master.grad = owned_grad.to(self.master.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        flat = self._gather(self.master.detach())
        offset = 0
        for p in self.params.values():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def _gather(self, shard: torch.Tensor) -> torch.Tensor:
        """The whole flat vector from every rank's shard (each padded to the common width for the collective)."""
        padded = torch.zeros(self.width, dtype=shard.dtype, device=shard.device)
        padded[: shard.numel()] = shard
        return self.dist.all_gather_rows(padded).reshape(-1)[: self.numel]

    # ------------------------------------------------------------------------------------- checkpoints

    def shard_state(self) -> dict:
        """This rank's part of the optimizer state, flat, with its bounds: what its checkpoint shard file holds."""
        sd = self.optimizer.state_dict()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        state = sd["state"].get(0, {})
        return {"numel": self.numel, "start": self.start, "stop": self.stop, "state": state, "param_groups": groups}

    def load_shards(self, shards: list[dict]) -> None:
        """Load this rank's bounds from shard states (`shard_state` of a run at any world size) that cover them."""
        flat_state, groups = _cover(shards, self.numel, self.start, self.stop)
        groups = [{**g, "params": [0]} for g in groups]
        self.optimizer.load_state_dict({"state": {0: flat_state} if flat_state else {}, "param_groups": groups})

    def load_full_state_dict(self, full: dict) -> None:
        """Load a replicated-layout state (a stage-0 optimizer's) for this rank's shard."""
        shapes = [p.shape for p in self.params.values()]
        flat_state = {}
        if full["state"]:
            if sorted(full["state"]) != list(range(len(shapes))):
                raise ValueError("the checkpoint's optimizer state does not cover the trainable parameters")
            for key, first in full["state"][0].items():
                per_param = [full["state"][i][key] for i in range(len(shapes))]
                if key != "step" and all(_is_t(v) and v.shape == s for v, s in zip(per_param, shapes)):
                    flat = torch.cat([v.reshape(-1) for v in per_param])
                    flat_state[key] = flat[self.start : self.stop].clone()
                else:
                    flat_state[key] = first
        groups = [{**g, "params": [0]} for g in full["param_groups"]]
        self.optimizer.load_state_dict({"state": {0: flat_state} if flat_state else {}, "param_groups": groups})


def replicated_from_shards(shards: list[dict], shapes: list[torch.Size]) -> dict:
    """A replicated (per-parameter) optimizer state dict from the shard states of a ZeRO run that cover every
    coordinate: how a stage-0 run resumes a ZeRO checkpoint."""
    numel = sum(s.numel() for s in shapes)
    flat_state, groups = _cover(shards, numel, 0, numel)
    state, offset = {}, 0
    for i, shape in enumerate(shapes):
        n = shape.numel()
        state[i] = {  # each parameter its own step tensor: Adam increments it in place, once per parameter
            k: (v[offset : offset + n].view(shape) if v.dim() == 1 and k != "step" else v).clone() if _is_t(v) else v
            for k, v in flat_state.items()
        }
        offset += n
    groups = [{**g, "params": list(range(len(shapes)))} for g in groups]
    return {"state": state if flat_state else {}, "param_groups": groups}


def _cover(shards: list[dict], numel: int, start: int, stop: int) -> tuple[dict, list]:
    """The flat optimizer state of coordinates [start, stop) cut from shard states, and their param groups.
    Refuses shards of another parameter vector or that leave a gap (a missing or foreign shard file)."""
    if any(sh["numel"] != numel for sh in shards):
        raise ValueError(f"the checkpoint's optimizer shards are of {shards[0]['numel']} coordinates, not {numel}")
    shards = sorted(shards, key=lambda sh: sh["start"])
    pieces, at = [], start
    for sh in shards:
        if sh["stop"] <= at or sh["start"] >= stop:
            continue
        if sh["start"] > at:
            break
        pieces.append((sh, at - sh["start"], min(sh["stop"], stop) - sh["start"]))
        at = min(sh["stop"], stop)
    if at < stop or not pieces:
        raise ValueError(f"the checkpoint's optimizer shards do not cover coordinates [{at}, {stop})")
    flat_state = {}
    for key, first in pieces[0][0]["state"].items():
        if key != "step" and _is_t(first) and first.dim() == 1:
            flat_state[key] = torch.cat([sh["state"][key][lo:hi] for sh, lo, hi in pieces]).clone()
        else:
            flat_state[key] = first  # the step count (the same on every shard)
    return flat_state, pieces[0][0]["param_groups"]


def _is_t(value: object) -> bool:
    return isinstance(value, torch.Tensor)
