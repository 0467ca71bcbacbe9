"""The trainer: build (data, model, mechanism), then `train()` (resume, steps, eval, checkpoints, outputs).

`train_step()` is one logical DP-SGD step: Poisson-sample this rank's examples, per-example gradients over
micro-batches, clip and sum locally, then `PrivateGradient.finish_step` (sum over ranks, noise once, / q·N) and
the optimizer (under ZeRO, `zero.ShardedOptimizer`: each rank updates its shard, then the shards are gathered).
Everything random is derived from (secret seed, step), so the run does not depend on the number of processes,
the ZeRO stage or the micro-batch size, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch.func import functional_call

from dpmix_dist import checkpoint
from dpmix_dist.config import Config, ConfigError, check_against_dataset
from dpmix_dist.data.inputs import RunInputs
from dpmix_dist.data.provenance import check_private_root
from dpmix_dist.data.shards import read_metadata
from dpmix_dist.data.store import ExampleStore
from dpmix_dist.distributed import Distributed
from dpmix_dist.errors import DataError
from dpmix_dist.fold import folded_prefix
from dpmix_dist.models import build_dp_model, check_model_name
from dpmix_dist.optim import build_optimizer, optimizer_state_bytes
from dpmix_dist.privacy.clipping import per_example_grads
from dpmix_dist.privacy.guarantee import Guarantee, plan
from dpmix_dist.privacy.layerwise import LayerwiseClipper, UnsupportedLayer
from dpmix_dist.privacy.mechanism import PrivateGradient
from dpmix_dist.privacy.sampling import sample_local
from dpmix_dist.zero import ReplicatedOptimizer, ShardedOptimizer, mechanism_reduction, resolve_stage

NOT_PRIVATE_LOSS = "train_loss_not_private"  # the one unprotected value, only with tracking.log_train_loss=true


def plan_guarantee(config: Config, num_train: int) -> Guarantee:
    """The run's guarantee from its privacy section and the number of private examples (privacy/guarantee.py)."""
    p = config.privacy
    return plan(
        num_train,
        expected_batch_size=p.expected_batch_size,
        epochs=p.epochs,
        target_epsilon=p.target_epsilon,
        delta=p.target_delta,
        max_grad_norm=p.max_grad_norm,
        accountant=p.accountant,
        noise_multiplier=p.noise_multiplier,
        private=p.enabled,
    )


class Trainer:
    """One private fine-tuning run. Build with everything checked, then `train()`.

    The privacy audit (dpmix_dist/audit.py) trains this same trainer with canaries through three attributes that
    may be replaced between construction and `train()`: `mechanism` (wrapped to add gradient canaries),
    `train_store` (the private examples, extended with input canaries) and `num_train` (the sampler's index space,
    grown with them; q and the guarantee are unchanged). Nothing else is meant to be swapped.
    """

    def __init__(
        self, config: Config, dist: Distributed, output_dir: Path, secret_seed: int, load_data: bool = True
    ) -> None:
        """`load_data=False` (`--plan`): everything is built and checked as for a run except the private examples,
        which are never read (`inputs.check()` instead of `inputs.load()`; the stores stay None)."""
        self.config, self.dist, self.output_dir = config, dist, output_dir
        self._secret_seed = secret_seed  # never logged; lives only in memory and in the private checkpoint
        torch.manual_seed(0)  # model construction is seed-independent: the head is zero-init, the rest pretrained
        if config.performance.num_threads:
            torch.set_num_threads(config.performance.num_threads)

        # --- data: metadata first, so bad settings fail before any work
        self.metadata = read_metadata(config.data.root)
        check_private_root(config.data.root, self.metadata)
        self.num_train = self.metadata["splits"]["train"]["num_examples"]
        eval_split = config.data.eval_split
        if eval_split not in self.metadata["splits"]:
            raise DataError(
                f"data.eval_split={eval_split}: {config.data.root} has no {eval_split} split; write one with "
                "launch/prepare_data.py --validation-count N (carved from the public part), or use test"
            )
        self.accuracy_key = f"{eval_split}_accuracy"
        check_against_dataset(config, self.num_train)
        check_model_name(config.model.name)  # before σ calibration, which takes seconds
        self.guarantee = plan_guarantee(config, self.num_train)

        # --- model
        m = config.model
        self.dp_model = build_dp_model(
            m.name,
            m.weights,
            self.metadata["num_classes"],
            norm=m.norm,
            groupnorm_groups=m.groupnorm_groups,
            trainable=m.trainable,
            num_trainable_blocks=m.num_trainable_blocks,
            image_size=config.data.image_size,
        )
        self.dp_model.model.to(dist.device)
        if config.performance.channels_last:
            self.dp_model.model.to(memory_format=torch.channels_last)
        self.params = self.dp_model.trainable_params()
        self.inputs = RunInputs(config, self.metadata, self.dp_model, dist)
        if config.performance.fold_frozen_norm:  # the frozen prefix from a BatchNorm-folded copy (fold.py)
            faster = folded_prefix(self.dp_model, self.inputs.mid_grey())
            self.dp_model.cut = dataclasses.replace(self.dp_model.cut, prefix=faster)
        self._to_input = self.inputs.to_input
        self.zero_stage = resolve_stage(config.performance.zero_stage, dist)
        build = lambda tensors: build_optimizer(config.optim, tensors, self.guarantee.steps)  # noqa: E731
        unflatten = lambda flat: self.mechanism.unflatten(flat)  # noqa: E731 (the mechanism is built below)
        zero = ShardedOptimizer(self.params, dist, build) if self.zero_stage else None
        self.update = zero or ReplicatedOptimizer(self.params, unflatten, build)  # optimizer + schedule, maybe sharded
        self.optimizer, self.scheduler = self.update.optimizer, self.update.scheduler

        self.mechanism = PrivateGradient(
            {name: p.shape for name, p in self.params.items()},
            noise_multiplier=self.guarantee.noise_multiplier,
            max_grad_norm=self.guarantee.max_grad_norm,
            expected_batch_size=self.guarantee.expected_batch_size,
            secret_seed=secret_seed,
            world_size=dist.world_size,
            device=dist.device,
            secure_noise=config.privacy.secure_noise,
            **mechanism_reduction(self.zero_stage, dist),
        )
        self.engine = self._choose_engine(config.performance.engine)
        self._autocast = torch.bfloat16 if config.performance.precision == "bf16" else None
        if self._autocast is not None and self.engine is None:
            raise ConfigError(
                "performance.precision=bf16 needs the layer-wise engine (performance.engine=auto/layerwise)"
            )
        self.step = 0
        self.history: list[dict] = []
        self.on_eval = None  # main process: called with each history record (e.g. the MLflow tracker)
        # tracking.log_train_loss only: this rank's group-loss sum and count since the last evaluation. A loss on
        # sampled private data, without noise: never computed, shown or stored unless asked for (contract item 9).
        self._loss_acc = [0.0, 0] if config.tracking.log_train_loss else None
        # Decoding shards and caching features happen here, so a corrupt shard fails before any output is written.
        if load_data:
            self.inputs.load()
        else:
            self.inputs.check()
        self.groups, self.train_store, self.eval_store = self.inputs.groups, self.inputs.train, self.inputs.eval
        self.synthetic_store = self.inputs.synthetic

    # ------------------------------------------------------------------------------------------ steps

    def _choose_engine(self, name: str) -> LayerwiseClipper | None:
        """The layer-wise engine where it applies (None = the generic torch.func engine)."""
        if name == "functorch":
            return None
        # One mid-grey image (not private data) through the engine now: what only shows when the model runs (a layer
        # run twice, an output overwritten in place) is refused here, where `auto` can still fall back.
        with torch.no_grad():
            example = self.dp_model.cut.prefix(self.inputs.mid_grey())
        try:
            return LayerwiseClipper(self.dp_model.tail_module, self.params, example=example)
        except UnsupportedLayer as exc:
            if name == "layerwise":
                raise ConfigError(f"performance.engine=layerwise: {exc}; use auto or functorch") from None
            return None

    def _groups(self, store: ExampleStore, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs to the trainable tail and targets for these examples at this step (`RunInputs.tail_inputs`)."""
        return self.inputs.tail_inputs(store, chunk, self._secret_seed, self.step)

    def _forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.dp_model.tail_module, params, (x,))

    def train_step(self, store: ExampleStore) -> None:
        """One logical step. Returns nothing: every value it sees is private until `finish_step` noises it."""
        g = self.guarantee
        if self.step >= g.steps:
            raise RuntimeError(f"step {self.step} would exceed the planned {g.steps} steps (and the target ε)")
        sampled = sample_local(
            self._secret_seed, self.step, store.owned, self.num_train, g.sample_rate, self.config.privacy.secure_noise
        )
        self.mechanism.begin_step(self.step)
        loss_sum = 0.0  # tracking.log_train_loss only
        for chunk in sampled.split(self.config.performance.micro_batch_size):
            if not len(chunk):  # nothing sampled on this rank (split yields one empty chunk): it still reduces below
                continue
            losses = self.accumulate(store, chunk)
            if self._loss_acc is not None:
                loss_sum += float(losses.sum())
        if self._loss_acc is not None:
            self._loss_acc[0] += loss_sum
            self._loss_acc[1] += len(sampled)
        flat = self.mechanism.finish_step()  # this rank's shard of the noised gradient (all of it unless ZeRO)
        self.update.step(flat)
        self.scheduler.step()
        self.step += 1

    def accumulate(self, store: ExampleStore, chunk: torch.Tensor) -> torch.Tensor:
        """One micro-batch inside a step: the examples' groups, their clipped gradients summed into the mechanism.
        Returns the per-group losses (private: `train_step` keeps them only for tracking.log_train_loss)."""
        inputs, targets = self._groups(store, chunk)
        if self.engine is not None:
            summed, losses = self.engine.clipped_sum(inputs, targets, self.mechanism.max_grad_norm, self._autocast)
            self.mechanism.accumulate_clipped_sum(summed, num_groups=len(chunk))
        else:
            detached = {name: p.detach() for name, p in self.params.items()}
            grads, losses = per_example_grads(self._forward, detached, inputs, targets)
            self.mechanism.accumulate(grads)
        return losses

    @torch.no_grad()
    def evaluate(self, store: ExampleStore) -> float:
        """Accuracy on the evaluation split (each rank scores its part; counts are summed)."""
        counts = torch.zeros(2, device=self.dist.device, dtype=torch.float64)
        for chunk in store.owned.split(self.config.performance.eval_batch_size):
            logits = self.dp_model.cut.tail(store.features(chunk))
            counts[0] += (logits.argmax(1).cpu() == store.labels(chunk)).sum()
            counts[1] += len(chunk)
        self.dist.all_reduce_sum(counts)
        return float(counts[0] / counts[1])

    # ------------------------------------------------------------------------------------------ the run

    def train(self) -> dict:
        """Run the remaining steps (all of them, unless `resume()` loaded a checkpoint)."""
        g, run = self.guarantee, self.config.run
        train_store, eval_store = self.train_store, self.eval_store
        steps_per_epoch = 1.0 / g.sample_rate
        eval_every = max(1, round(run.eval_every_epochs * steps_per_epoch))
        ckpt_every = max(1, round(run.checkpoint_every_epochs * steps_per_epoch))
        stop = checkpoint.StopRequest()
        bar = self.dist.progress(run.progress_bar, total=g.steps, initial=self.step, desc="DP training", unit="step")
        start, accuracy = time.time(), float("nan")
        with stop:
            while self.step < g.steps:
                self.train_step(train_store)
                if self.step % eval_every == 0 or self.step == g.steps:
                    self.dist.check_identical(
                        torch.cat([p.detach().flatten() for p in self.params.values()]), "parameters"
                    )
                    epsilon, accuracy = g.epsilon(self.step), self.evaluate(eval_store)
                    record = {"step": self.step, "epsilon": epsilon, self.accuracy_key: accuracy}
                    if self._loss_acc is not None:
                        record[NOT_PRIVATE_LOSS] = self._train_loss()
                    self.history.append(record)
                    if self.on_eval is not None:
                        self.dist.on_main(self.on_eval, record)
                    bar.write(
                        f"step {self.step}/{g.steps}  ε={epsilon:.3f}  "
                        f"{self.config.data.eval_split} accuracy {accuracy:.4f}"
                    )
                if self._checkpoint_due(ckpt_every) and self.step < g.steps:
                    self._save_checkpoint()
                if g.private and not bar.disable:  # the guarantee only: nothing computed from the private batch
                    bar.set_postfix_str(
                        f"ε ≤ {g.epsilon_bound(self.step):.2f} of {self.config.privacy.target_epsilon:g}"
                    )
                bar.update(1)
                if self.dist.any_rank(stop.requested) and self.step < g.steps:  # every rank stops at the same step
                    self._save_checkpoint()
                    bar.close()
                    raise checkpoint.Interrupted(self.step, g.steps)
            bar.close()
            return self._finish(accuracy, time.time() - start)  # a stop signal now waits for the outputs

    def _checkpoint_due(self, every_epochs_in_steps: int) -> bool:
        """After this step: by the epoch cadence, or by `run.checkpoint_every_steps` when set."""
        every_steps = self.config.run.checkpoint_every_steps
        return self.step % every_epochs_in_steps == 0 or bool(every_steps and self.step % every_steps == 0)

    def _train_loss(self) -> float:
        """Mean group loss over every example sampled (all ranks) since the last evaluation. It is computed on
        private data without noise: a diagnostic NOT covered by the (ε, δ) guarantee, recorded under a name that
        says so, and only when tracking.log_train_loss asks for it."""
        acc = torch.tensor(self._loss_acc, dtype=torch.float64, device=self.dist.device)
        self.dist.all_reduce_sum(acc)
        self._loss_acc = [0.0, 0]
        return float(acc[0] / acc[1]) if acc[1] > 0 else float("nan")

    def _finish(self, accuracy: float, seconds: float) -> dict:
        g, a = self.guarantee, self.config.augment
        final_epsilon = g.epsilon(self.step)
        if (
            g.private and final_epsilon > self.config.privacy.target_epsilon
        ):  # cannot happen by construction; never publish it
            raise RuntimeError(f"spent ε={final_epsilon} > target {self.config.privacy.target_epsilon}")
        summary = {
            self.accuracy_key: accuracy,
            "eval_split": self.config.data.eval_split,
            "epsilon": final_epsilon,
            "delta": g.delta,
            "accountant": g.accountant,
            "noise_multiplier": g.noise_multiplier,
            "sample_rate": g.sample_rate,
            "steps": self.step,
            "expected_batch_size": g.expected_batch_size,
            "max_grad_norm": g.max_grad_norm,
            "world_size": self.dist.world_size,
            "zero_stage": self.zero_stage,
            "optimizer_state_bytes_per_rank": self._optimizer_state_bytes_per_rank(),
            "device": self.dist.device.type,
            "method": a.method,
            "private": g.private,
            "num_views": a.num_views,
            "num_mixes": a.num_mixes,
            "num_synthetic": a.num_synthetic,
            "group_size": self.groups.group_size if self.groups is not None else 1,
            "model": self.config.model.name,
            "dataset": self.metadata["name"],
            "classes": self.metadata["classes"],  # public metadata: what predict prints
            "image_shape": self.metadata["splits"]["train"]["image_shape"],  # as stored (H, W, C), before resizing
            "num_train_examples": self.num_train,
            "trainable_parameters": sum(p.numel() for p in self.params.values()),
            "train_seconds": round(seconds, 1),
            **self._peak_device_memory(),
            "history": self.history,
        }
        self.dist.on_main(checkpoint.write_outputs, self.output_dir, self.dp_model.model, summary)
        self.dist.barrier()
        return summary

    # ------------------------------------------------------------------------------------------ resume

    def _peak_device_memory(self) -> dict:
        """On a GPU, the largest peak of allocated memory any rank reached (a size, not data: public)."""
        if self.dist.device.type != "cuda":
            return {}
        peak = torch.tensor([torch.cuda.max_memory_allocated(self.dist.device)], device=self.dist.device)
        return {"peak_device_memory_bytes": int(self.dist.all_gather_rows(peak).max().item())}

    def _optimizer_state_bytes_per_rank(self) -> int:
        """The largest optimizer state any rank holds (a size, not data: public)."""
        held = torch.tensor([optimizer_state_bytes(self.optimizer)], dtype=torch.int64, device=self.dist.device)
        return int(self.dist.all_gather_rows(held).max().item())

    def _save_checkpoint(self) -> None:
        """A private artifact (it holds the secret seed), written by the main process (checkpoint.py); under ZeRO
        each rank first writes its optimizer shard, and the shard files the new checkpoint replaces go after it."""
        if self.zero_stage:
            shard = self.update.shard_state()
            optimizer_state = checkpoint.save_optimizer_shard(self.output_dir, self.step, self.dist, shard)
        else:
            optimizer_state = self.update.full_state_dict()
        self.dist.on_main(
            lambda: checkpoint.save(
                self.output_dir,
                checkpoint.State(
                    step=self.step,
                    secret_seed=self._secret_seed,
                    settings=checkpoint.mechanism_sections(self.config),
                    guarantee=self._resume_record(),
                    model={name: p.detach().cpu() for name, p in self.params.items()},
                    optimizer=optimizer_state,
                    scheduler=self.scheduler.state_dict(),
                    history=self.history,
                ),
            )
        )
        self.dist.barrier()  # checkpoint.pt is in place: the files it no longer names can go
        keep = {entry["file"] for entry in optimizer_state.get("zero_shards", [])}
        self.dist.on_main(checkpoint.remove_stale_shards, self.output_dir, keep)

    def _resume_record(self) -> dict:
        train_shards = self.metadata["splits"]["train"]["shards"]
        return checkpoint.resume_record(self.guarantee, self.num_train, train_shards, self.config.performance.precision)

    def resume(self) -> None:
        """Continue from the checkpoint in the output folder (same guarantee and training settings required)."""
        state = checkpoint.load_for_resume(
            self.output_dir, checkpoint.mechanism_sections(self.config), self._resume_record(), self._secret_seed
        )
        with torch.no_grad():
            for name, value in state.model.items():
                self.params[name].copy_(value)
        self.update.sync_from_params()
        if checkpoint.is_sharded(state.optimizer):  # the shard files covering what this rank now updates
            bounds = (self.update.start, self.update.stop)
            self.update.load_shards(checkpoint.load_optimizer_shards(self.output_dir, state.optimizer, *bounds))
        else:
            self.update.load_full_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.step, self.history = state.step, state.history
        self.mechanism.resume_after(self.step - 1)
