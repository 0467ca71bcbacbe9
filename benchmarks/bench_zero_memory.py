"""Optimizer-state memory per rank, replicated vs ZeRO: one Adam step on a timm model's parameters, W ranks.

    accelerate launch --config_file configs/accelerate/cpu_1proc.yaml benchmarks/bench_zero_memory.py --stage 0
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml benchmarks/bench_zero_memory.py --stage 2

The step is the trainer's: the mechanism (here σ = 1, no example sampled) releases each rank's shard of the noised
gradient, `zero.ShardedOptimizer` updates it and gathers the parameters (stage 0: the whole gradient, a plain
optimizer). Each rank reports the bytes of its optimizer's state tensors (Adam: two moments and a step counter)
and its peak resident memory; the main process prints one JSON line with the per-rank maxima.
"""

from __future__ import annotations

import argparse
import json
import resource

import timm
import torch

from dpmix_dist.config import OptimConfig
from dpmix_dist.distributed import Distributed
from dpmix_dist.optim import build_optimizer, optimizer_state_bytes
from dpmix_dist.privacy.mechanism import PrivateGradient
from dpmix_dist.zero import ShardedOptimizer, mechanism_reduction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--stage", type=int, choices=(0, 1, 2), default=2)
    args = parser.parse_args()
    with Distributed(cpu=True) as dist:
        torch.manual_seed(0)
        params = dict(timm.create_model(args.model).named_parameters())
        config = OptimConfig(name="adam", lr=1e-3)  # momentum: unused by adam
        mech = PrivateGradient(
            {n: p.shape for n, p in params.items()},
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=256.0,
            secret_seed=1,
            world_size=dist.world_size,
            **mechanism_reduction(args.stage, dist),
        )
        if args.stage:
            zero = ShardedOptimizer(params, dist, lambda shard: build_optimizer(config, shard, 10))
            optimizer = zero.optimizer
        else:
            optimizer, _ = build_optimizer(config, list(params.values()), 10)
        mech.begin_step(0)
        flat = mech.finish_step()
        if args.stage:
            zero.step(flat)
        else:
            for name, grad in mech.unflatten(flat).items():
                params[name].grad = grad
            optimizer.step()
        held = torch.tensor(
            [optimizer_state_bytes(optimizer), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]
        )
        per_rank = dist.all_gather_rows(held)
        result = {
            "model": args.model,
            "trainable_parameters": mech.numel,
            "world_size": dist.world_size,
            "zero_stage": args.stage,
            "optimizer_state_MiB_per_rank": round(per_rank[:, 0].max().item() / 2**20, 1),
            "peak_rss_MiB_per_rank": round(per_rank[:, 1].max().item() / 2**20, 1),
        }
        dist.print(json.dumps(result))


if __name__ == "__main__":
    main()
