"""What the trainable tail sees: the run's examples as model inputs, frozen features and DP-Mix groups.

`RunInputs` is built in two phases so that bad settings fail before any work: the constructor only reads the
model's normalization (cheap); `load()` decodes the shards, checks and decodes the synthetic pool (dpmix_diff) and
caches frozen features. Nothing here is random except through `GroupBuilder`, whose draws depend on
(secret seed, step, example) alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dpmix_dist.augment import GroupBuilder
from dpmix_dist.config import Config, ConfigError
from dpmix_dist.data.provenance import check_synthetic_root
from dpmix_dist.data.shards import load_split, read_metadata
from dpmix_dist.data.store import ExampleStore, feature_cache_key, weights_digest
from dpmix_dist.data.transforms import to_model_input
from dpmix_dist.distributed import Distributed
from dpmix_dist.errors import DataError
from dpmix_dist.models import DPModel
from dpmix_dist.privacy.sampling import owned_indices


class RunInputs:
    """The examples of one run on this rank, served to the trainable tail.

    Attributes (after `load()`): `groups` (the DP-Mix group builder, None for dpsgd), `train` and `eval` (this
    rank's private training examples and its share of the evaluation split), `synthetic` (dpmix_diff's unmixed
    synthetic members with cached features, or None).
    """

    def __init__(self, config: Config, metadata: dict, dp_model: DPModel, dist: Distributed) -> None:
        self.config, self.metadata, self.dp_model, self.dist = config, metadata, dp_model, dist
        cfg = dp_model.model.pretrained_cfg
        self._mean, self._std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
        self._weights_digest: str | None = None  # of the model as built, for the on-disk feature cache
        self.groups: GroupBuilder | None = None
        self.train: ExampleStore | None = None
        self.eval: ExampleStore | None = None
        self.synthetic: ExampleStore | None = None

    # ------------------------------------------------------------------------------------------ transforms

    def pixels(self, images) -> torch.Tensor:
        """uint8 images (n, H, W, C) -> normalized model input (n, 3, S, S) on the run's device."""
        return to_model_input(images, self.config.data.image_size, self._mean, self._std, self.dist.device)

    def to_input(self, images) -> torch.Tensor:
        """Model input in the model's memory layout (`pixels` for inputs that are regrouped before the model)."""
        x = self.pixels(images)
        return x.contiguous(memory_format=torch.channels_last) if self.config.performance.channels_last else x

    def mid_grey(self) -> torch.Tensor:
        """One mid-grey model input: an example for checks that must not touch private data."""
        shape = self.metadata["splits"]["train"]["image_shape"]
        return self.to_input(np.full((1, *shape), 128, dtype=np.uint8))

    def public_example(self) -> torch.Tensor:
        """One model input (1, 3, S, S) on the CPU from PUBLIC data, for the logged model's signature: an image of
        the public part of the split when there is one, else a synthetic mid-grey image. Never a private one."""
        partition = self.metadata.get("partition", {})
        partner = Path(partition.get("partner", ""))
        if partition.get("role") == "private" and (partner / "metadata.json").is_file():
            try:
                public = load_split(partner, "train", self.config.data.cache_dir)
                return self.to_input(np.asarray(public.images[:1])).cpu()
            except DataError:
                pass
        return self.mid_grey().cpu()

    # ------------------------------------------------------------------------------------------ loading

    def check(self) -> None:
        """What `load()` refuses without reading a private image: the synthetic pool (dpmix_diff; it is public, and
        is decoded here) and a feature cache over `performance.feature_cache_max_gb`. Sets `groups`."""
        self.groups = self._group_builder()
        for split in ("train", self.config.data.eval_split):
            if self.caches(split):
                num_examples = self.metadata["splits"][split]["num_examples"]
                self._check_cache_size(split, len(owned_indices(num_examples, self.dist.rank, self.dist.world_size)))
        if self.caches("synthetic"):
            self._check_cache_size("synthetic", len(self.groups.synthetic))

    def load(self) -> None:
        """Decode the shards and cache features: a corrupt shard or a refused pool fails here, before any step."""
        self.check()
        self.train = self._store("train", "caching train features")
        eval_split = self.config.data.eval_split
        self.eval = self._store(eval_split, f"caching {eval_split} features")
        self.synthetic = self._synthetic_store()

    def _group_builder(self) -> GroupBuilder | None:
        """The DP-Mix group builder (None for dpsgd), with the synthetic set checked and decoded for dpmix_diff."""
        a = self.config.augment
        if a.method == "dpsgd":
            return None
        synthetic = None
        if a.method == "dpmix_diff":
            check_synthetic_root(a.synthetic_root, self.metadata, self.config.data.root)
            with self.dist.local_main_first():
                synthetic = load_split(a.synthetic_root, "train", self.config.data.cache_dir)
            if len(synthetic) < a.num_synthetic:
                raise DataError(
                    f"augment.num_synthetic={a.num_synthetic} is more than the {len(synthetic)} images "
                    f"in {a.synthetic_root}; lower it or generate more"
                )
        # `pixels`: the builder gathers views into new tensors, which `tail_inputs` puts in the model's layout once
        return GroupBuilder(a, self.metadata["num_classes"], self.pixels, self.config.data.image_size, synthetic)

    def _store(self, split: str, desc: str) -> ExampleStore:
        with self.dist.local_main_first():  # the node's first process decodes the shards; the others reuse it
            data = load_split(self.config.data.root, split, self.config.data.cache_dir)
        owned = owned_indices(len(data), self.dist.rank, self.dist.world_size)
        shards = self.metadata["splits"][split]["shards"]
        return self._example_store(data, owned, split, desc, self.caches(split), shards)

    def caches(self, split: str) -> bool:
        """Whether the run keeps the frozen features of `split` ("train", the evaluation split or "synthetic")."""
        if not self.config.performance.cache_frozen_features:
            return False
        if split == "train":  # training images are augmented, except under dpsgd; evaluation images never are
            return self.config.augment.method == "dpsgd"
        if split == "synthetic":  # dpmix_diff's unmixed synthetic members enter the group unaugmented
            groups = self.groups
            return groups is not None and groups.synthetic is not None and self.config.augment.include_unmixed
        return True

    def _check_cache_size(self, split: str, num_owned: int) -> None:
        if not num_owned:
            return
        with torch.no_grad():  # the size of one example's features, from a mid-grey image (never a private one)
            per_example = self.dp_model.cut.prefix(self.mid_grey()).numel() * 4
        perf = self.config.performance
        if per_example * num_owned > perf.feature_cache_max_gb * 2**30:
            raise ConfigError(
                f"performance.cache_frozen_features: the {split} features need "
                f"{per_example * num_owned / 2**30:.1f} GiB per process (> feature_cache_max_gb="
                f"{perf.feature_cache_max_gb:g}); set performance.cache_frozen_features=false or train fewer blocks"
            )

    def _synthetic_store(self) -> ExampleStore | None:
        """dpmix_diff's unmixed synthetic members enter the group unaugmented, so their frozen features are computed
        once per run (every rank holds all of them: any example may draw any image). None when nothing is cached."""
        if not self.caches("synthetic"):
            return None
        a = self.config.augment
        synthetic, shards = self.groups.synthetic, read_metadata(a.synthetic_root)["splits"]["train"]["shards"]
        return self._example_store(
            synthetic, torch.arange(len(synthetic)), "synthetic", "caching synthetic features", True, shards
        )

    def _example_store(
        self, data, owned: torch.Tensor, split: str, desc: str, caching: bool, shards: dict
    ) -> ExampleStore:
        perf, prefix = self.config.performance, self.dp_model.cut.prefix
        cache_file = None
        if caching and perf.feature_cache_on_disk:  # reused by the next run on the same data and model (a sweep)
            m = self.config.model
            if self._weights_digest is None:  # once per run, for every store (hashing the weights takes a while)
                self._weights_digest = weights_digest(self.dp_model.model)
            key = feature_cache_key(
                self._weights_digest,
                shards,
                owned,
                image_size=self.config.data.image_size,
                model_name=m.name,
                norm=m.norm,
                cut=[m.trainable, m.num_trainable_blocks],
                channels_last=perf.channels_last,
                fold_frozen_norm=perf.fold_frozen_norm,
                batch_size=perf.eval_batch_size,
                threads=torch.get_num_threads(),
                device=self.dist.device.type,
            )
            cache_file = Path(self.config.data.cache_dir) / "features" / f"{key}.pt"
        with self.dist.progress(
            caching and self.config.run.progress_bar, total=len(owned), desc=desc, unit="img"
        ) as bar:
            return ExampleStore(
                data,
                owned,
                self.to_input,
                prefix,
                cache_features=caching,
                batch_size=perf.eval_batch_size,
                progress=bar.update,
                cache_file=cache_file,
            )

    # ------------------------------------------------------------------------------------------ groups

    def tail_inputs(
        self, store: ExampleStore, chunk: torch.Tensor, secret_seed: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs to the trainable tail (b, G, ...) and targets (b, G) or (b, G, classes) for these examples."""
        if self.groups is None:  # dpsgd: one unaugmented view per example (features maybe cached)
            return store.features(chunk).unsqueeze(1), store.labels(chunk).to(self.dist.device).unsqueeze(1)
        draws = self.groups.draws(secret_seed, step, chunk)
        members, targets = self.groups.build(draws, store.split.images[chunk.numpy()], store.labels(chunk))
        b, cached = len(chunk), None
        if self.synthetic is not None:  # the S unmixed synthetic members (after the K views): cached per run
            k, s = self.config.augment.num_views, self.config.augment.num_synthetic
            cached = self.synthetic.features(torch.from_numpy(draws.synthetic.reshape(-1))).unflatten(0, (b, s))
            members = torch.cat([members[:, :k], members[:, k + s :]], dim=1)
        flat = members.flatten(0, 1)
        if self.config.performance.channels_last:
            flat = flat.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            features = self.dp_model.cut.prefix(flat).unflatten(0, (b, members.shape[1]))
        if cached is not None:
            features = torch.cat([features[:, :k], cached.to(features.dtype), features[:, k:]], dim=1)
        return features, targets
