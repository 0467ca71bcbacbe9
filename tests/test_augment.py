"""DP-Mix groups (contract item 2): views, mixes and synthetic draws are what they claim, a group holds only its
own example's data (and public synthetic images), the grouped per-example gradient equals autograd on the group
alone, and neither the method, the world size nor the micro-batch size changes ε or the result."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from dpmix_dist.augment import GroupBuilder, draw, self_augment
from dpmix_dist.config import AugmentConfig, ConfigError, load_config
from dpmix_dist.data.shards import Split, write_dataset
from dpmix_dist.data.sources import RawDataset, RawSplit
from dpmix_dist.distributed import Distributed
from dpmix_dist.errors import DataError
from dpmix_dist.privacy.sampling import owned_indices, sample_local
from dpmix_dist.testing.datagen import class_images, make_synthetic_folder
from dpmix_dist.testing.reference import naive_clipped_sum, naive_group_grads
from dpmix_dist.train import Trainer, plan_guarantee

CLASSES = [f"c{i}" for i in range(10)]
SEED = 1234
METHODS = {
    "dpsgd": [],
    "self_aug": ["augment.num_views=3"],
    "dpmix_self": ["augment.num_views=3", "augment.num_mixes=4"],
    "dpmix_diff": ["augment.num_views=2", "augment.num_mixes=4", "augment.num_synthetic=2"],
}


def _write(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    test_labels = np.arange(20) % 10
    splits = {"train": RawSplit(images, labels), "test": RawSplit(class_images(test_labels, 28, 1, 5), test_labels)}
    return write_dataset(RawDataset("fashion_mnist", tuple(CLASSES), splits, "tests"), root)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("augment")
    labels = np.arange(64) % 10
    images = class_images(labels, 28, 1, seed=3)
    changed = images.copy()
    changed[5] = 255 - changed[5]  # example j = 5, replaced by another image (same label)
    return {
        "a": _write(root / "a", images, labels),
        "b": _write(root / "b", changed, labels),
        "syn": make_synthetic_folder(root / "syn", CLASSES, per_class=6),
        "root": root,
    }


def _trainer(data: dict, tmp_path: Path, method: str, *extra: str, root: str = "a", device: str = "cpu") -> Trainer:
    overrides = [
        f"data.root={data[root]}",
        f"data.cache_dir={data['root'] / 'cache'}",
        f"augment.method={method}",
        *METHODS[method],
        "run.progress_bar=false",
        *extra,
    ]
    if method == "dpmix_diff":
        overrides.append(f"augment.synthetic_root={data['syn']}")
    return Trainer(load_config("tiny_test", overrides), Distributed(cpu=device == "cpu"), tmp_path, SEED)


def _spec(**kw) -> AugmentConfig:
    base = dict(method="dpmix_diff", num_views=3, num_mixes=5, num_synthetic=2, synthetic_root="x")
    return AugmentConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- the draws


def test_draws_are_a_pure_function_of_seed_step_and_example():
    spec = _spec()
    alone = draw(spec, SEED, 3, torch.tensor([17]), 100, 2)
    batch = draw(spec, SEED, 3, torch.tensor([4, 17, 99]), 100, 2)
    for field in ("crops", "flips", "synthetic", "pairs", "lams"):
        assert np.array_equal(getattr(alone, field)[0], getattr(batch, field)[1]), field
    other_step = draw(spec, SEED, 4, torch.tensor([17]), 100, 2)
    other_seed = draw(spec, SEED + 1, 3, torch.tensor([17]), 100, 2)
    assert not np.array_equal(alone.lams, other_step.lams) and not np.array_equal(alone.lams, other_seed.lams)


def test_mix_pairs_cover_the_whole_pool_uniformly():
    spec = _spec(num_views=3, num_synthetic=2, num_mixes=8)  # pool of 5: views 0-2, synthetic 3-4
    pairs = draw(spec, SEED, 0, torch.arange(2000), 50, 2).pairs.reshape(-1, 2)
    assert (pairs[:, 0] != pairs[:, 1]).all()  # never an image mixed with itself
    for column in (0, 1):
        counts = np.bincount(pairs[:, column], minlength=5)
        assert counts.min() > 0 and len(counts) == 5  # the last member (index 4) is drawn too
        assert stats.chisquare(counts).pvalue > 1e-3, counts


def test_synthetic_draws_are_distinct_within_an_example_and_cover_the_set():
    d = draw(_spec(num_synthetic=3), SEED, 0, torch.arange(3000), 40, 2)
    assert all(len(set(row)) == 3 for row in d.synthetic.tolist())
    assert stats.chisquare(np.bincount(d.synthetic.ravel(), minlength=40)).pvalue > 1e-3


def test_lambda_follows_beta_alpha_alpha():
    lams = draw(_spec(mix_alpha=0.2), SEED, 0, torch.arange(2000), 50, 2).lams.ravel()
    assert stats.kstest(lams, stats.beta(0.2, 0.2).cdf).pvalue > 1e-3
    assert stats.kstest(lams, stats.beta(1.0, 1.0).cdf).pvalue < 1e-6  # the test can tell α apart
    lams = draw(_spec(mix_alpha=1.0), SEED, 1, torch.arange(2000), 50, 2).lams.ravel()
    assert stats.kstest(lams, stats.beta(1.0, 1.0).cdf).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------- the members


def _naive_views(x: torch.Tensor, crops, flips, spec: AugmentConfig, p: int) -> list[torch.Tensor]:
    """One example's views, one at a time: reflect-pad by p pixels, crop, mirror."""
    s = x.shape[-1]
    views = []
    for (top, left), flip in zip(crops, flips):
        v = (
            F.pad(x[None], (p, p, p, p), mode="reflect")[0, :, top : top + s, left : left + s]
            if "crop" in spec.transforms
            else x
        )
        views.append(torch.flip(v, dims=[-1]) if flip and "flip" in spec.transforms else v)
    return views


@pytest.mark.parametrize("transforms", [("crop", "flip"), ("flip",), ("crop",), ()])
def test_views_are_crops_and_flips_of_the_example(transforms):
    spec = _spec(transforms=transforms)
    x = torch.randn(8, 3, 12, 12)
    d = draw(spec, SEED, 0, torch.arange(8), 10, 2)
    views = self_augment(x, d.crops, d.flips, spec, d.padding)
    for r in range(8):
        for k, naive in enumerate(_naive_views(x[r], d.crops[r], d.flips[r], spec, d.padding)):
            assert torch.equal(views[r, k], naive)
    if transforms:
        assert not torch.equal(views[:, 0], views[:, 1])  # views differ from one another


def _builder(spec: AugmentConfig, syn_labels: np.ndarray | None = None):
    def to_input(images):
        return torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2) / 255.0

    synthetic = None
    if syn_labels is not None:
        synthetic = Split(class_images(syn_labels, 16, 3, seed=9), syn_labels.astype(np.int64))
    return GroupBuilder(spec, 10, to_input, 16, synthetic)


@pytest.mark.parametrize("method", ["dpmix_self", "dpmix_diff"])
def test_mixes_are_pixelwise_mixes_with_labels_mixed_by_the_same_lambda(method):
    syn_labels = np.arange(30) % 10
    spec = _spec(
        method=method,
        num_views=3,
        num_mixes=6,
        num_synthetic=2 if method == "dpmix_diff" else 0,
        synthetic_root="x" if method == "dpmix_diff" else "",
    )
    builder = _builder(spec, syn_labels if method == "dpmix_diff" else None)
    labels = torch.tensor([1, 7, 3, 3, 9, 0])
    images = class_images(labels.numpy(), 16, 3, seed=2)
    d = builder.draws(SEED, 0, torch.arange(6))
    members, targets = builder.build(d, images, labels)
    pool_size = spec.num_views + spec.num_synthetic
    assert members.shape[:2] == targets.shape[:2] == (6, builder.group_size) == (6, pool_size + spec.num_mixes)
    recovered = []
    for r in range(6):
        pool, pool_targets = members[r, :pool_size], targets[r, :pool_size]
        expected_pool_labels = [int(labels[r])] * spec.num_views + [int(syn_labels[j]) for j in d.synthetic[r]]
        assert pool_targets.argmax(1).tolist() == expected_pool_labels and torch.all(pool_targets.max(1).values == 1)
        for m in range(spec.num_mixes):
            a, b = d.pairs[r, m]
            lam = float(d.lams[r, m])
            mix = members[r, pool_size + m]
            torch.testing.assert_close(mix, lam * pool[a] + (1 - lam) * pool[b], rtol=0, atol=1e-6)
            torch.testing.assert_close(targets[r, pool_size + m], lam * pool_targets[a] + (1 - lam) * pool_targets[b])
            diff = pool[a] - pool[b]
            if diff.norm() > 1e-3:  # λ read back from the pixels alone is the λ of the labels
                recovered.append((float(((mix - pool[b]) * diff).sum() / diff.pow(2).sum()), lam))
    assert len(recovered) > 10
    for got, lam in recovered:
        assert got == pytest.approx(lam, abs=1e-4)


def test_group_without_unmixed_members_is_the_mixes_only():
    spec = _spec(include_unmixed=False)
    builder = _builder(spec, np.arange(10))
    labels = torch.tensor([2, 4])
    members, targets = builder.build(
        builder.draws(SEED, 0, torch.arange(2)), class_images(labels.numpy(), 16, 3, 1), labels
    )
    assert builder.group_size == spec.num_mixes and members.shape[1] == targets.shape[1] == spec.num_mixes
    full = _builder(replace(spec, include_unmixed=True), np.arange(10))
    members_all, _ = full.build(full.draws(SEED, 0, torch.arange(2)), class_images(labels.numpy(), 16, 3, 1), labels)
    assert torch.equal(members_all[:, -spec.num_mixes :], members)


# ---------------------------------------------------------------------------------------------- the trainer


def _sampled(trainer: Trainer) -> torch.Tensor:
    return owned_indices(trainer.num_train, 0, 1)  # every example: the group of each is what matters here


def _contributions(trainer: Trainer, chunk: torch.Tensor) -> list[torch.Tensor]:
    """Each example's clipped gradient, flattened, as the trainer computes it (its groups, its engine)."""
    inputs, targets = trainer._groups(trainer.train_store, chunk)
    out = []
    for r in range(len(chunk)):
        summed, _ = trainer.engine.clipped_sum(inputs[r : r + 1], targets[r : r + 1], trainer.guarantee.max_grad_norm)
        out.append(torch.cat([summed[n].flatten() for n in trainer.params]))
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_replacing_one_example_changes_no_other_examples_clipped_gradient(data, tmp_path, method):
    a, b = _trainer(data, tmp_path, method), _trainer(data, tmp_path, method, root="b")
    chunk = _sampled(a)[:16]
    ga, gb = _contributions(a, chunk), _contributions(b, chunk)
    for r, i in enumerate(chunk.tolist()):
        if i == 5:
            assert not torch.equal(ga[r], gb[r])  # the replaced example's own contribution does change
            assert gb[r].norm() <= a.guarantee.max_grad_norm * (1 + 1e-5)
        else:
            assert torch.equal(ga[r], gb[r]), f"example {i} changed when example 5 was replaced"


def _naive_clipped_sum(trainer: Trainer, chunk: torch.Tensor) -> torch.Tensor:
    """The reference: each group built one member at a time from the draws, then the naive per-group loop (autograd
    on each group alone, clip, sum). Flat, in the order of the trainer's parameters."""
    spec, store = trainer.config.augment, trainer.train_store
    device = next(iter(trainer.params.values())).device
    draws = trainer.groups.draws(SEED, trainer.step, chunk) if trainer.groups else None
    groups, group_targets = [], []
    for r, i in enumerate(chunk.tolist()):
        x = trainer._to_input(store.split.images[[i]])[0]
        label = F.one_hot(torch.tensor(int(store.split.labels[i])), 10).float().to(device)
        if draws is None:
            members, targets = [x], [label]
        else:
            members = _naive_views(x, draws.crops[r], draws.flips[r], spec, draws.padding)
            targets = [label] * len(members)
            syn = trainer.groups.synthetic
            for j in draws.synthetic[r]:
                members.append(trainer._to_input(syn.images[[j]])[0])
                targets.append(F.one_hot(torch.tensor(int(syn.labels[j])), 10).float().to(device))
            mixes = [
                (
                    float(lam) * members[a] + (1 - float(lam)) * members[b],
                    float(lam) * targets[a] + (1 - float(lam)) * targets[b],
                )
                for (a, b), lam in zip(draws.pairs[r], draws.lams[r])
            ]
            if not spec.include_unmixed:
                members, targets = [], []
            members += [m for m, _ in mixes]
            targets += [t for _, t in mixes]
        groups.append(torch.stack(members))
        group_targets.append(torch.stack(targets))
    grads, norms = naive_group_grads(trainer.dp_model.logits, trainer.params, groups, group_targets)
    summed = naive_clipped_sum(grads, norms, trainer.guarantee.max_grad_norm)
    return torch.cat([summed[n].flatten() for n in trainer.params])


@pytest.mark.parametrize("engine", ["layerwise", "functorch"])
@pytest.mark.parametrize(
    "method,extra", [(m, ()) for m in METHODS] + [("dpmix_diff", ("augment.include_unmixed=false",))]
)
def test_grouped_clipped_sum_equals_autograd_on_each_group_alone(data, tmp_path, method, extra, engine, device="cpu"):
    trainer = _trainer(
        data, tmp_path, method, f"performance.engine={engine}", "privacy.max_grad_norm=0.05", *extra, device=device
    )
    trainer.step = 3
    chunk = _sampled(trainer)[:12]
    inputs, targets = trainer._groups(trainer.train_store, chunk)
    if engine == "layerwise":
        summed, _ = trainer.engine.clipped_sum(inputs, targets, trainer.guarantee.max_grad_norm)
    else:
        from dpmix_dist.privacy.clipping import clipped_sum, per_example_grads

        grads, _ = per_example_grads(
            trainer._forward, {n: p.detach() for n, p in trainer.params.items()}, inputs, targets
        )
        summed = clipped_sum(grads, trainer.guarantee.max_grad_norm)
    fast = torch.cat([summed[n].flatten() for n in trainer.params])
    naive = _naive_clipped_sum(trainer, chunk)
    assert naive.norm() > 0 and fast.device.type == device
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["self_aug", "dpmix_self", "dpmix_diff"])
def test_groups_on_cuda(data, tmp_path, method):
    """On CUDA: the grouped clipped sum equals autograd on each group alone, and the groups equal the CPU's."""
    test_grouped_clipped_sum_equals_autograd_on_each_group_alone(data, tmp_path, method, (), "layerwise", device="cuda")
    # the process's accelerate state is now CUDA, so the CPU side is built here from the same parts
    from dpmix_dist.data.transforms import to_model_input

    cuda = _trainer(data, tmp_path, method, device="cuda")
    assert cuda.dist.device.type == "cuda"
    size, (mean, std) = cuda.config.data.image_size, (cuda._mean, cuda._std)
    cpu = GroupBuilder(
        cuda.config.augment, 10, lambda im: to_model_input(im, size, mean, std, "cpu"), size, cuda.groups.synthetic
    )
    chunk = _sampled(cuda)[:12]
    draws = cuda.groups.draws(SEED, 0, chunk)
    images, labels = cuda.train_store.split.images[chunk.numpy()], cuda.train_store.labels(chunk)
    (a, ta), (b, tb) = cpu.build(draws, images, labels), cuda.groups.build(draws, images, labels)
    assert b.device.type == "cuda" and a.device.type == "cpu"
    torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tb.cpu().float(), ta.float())


@pytest.mark.parametrize("method", list(METHODS))
def test_micro_batch_size_and_channels_last_do_not_change_a_step(data, tmp_path, method):
    def one_step(*extra):
        trainer = _trainer(data, tmp_path, method, *extra)
        trainer.train_step(trainer.train_store)
        return torch.cat([p.detach().flatten() for p in trainer.params.values()])

    reference = one_step("performance.micro_batch_size=64")
    assert reference.abs().sum() > 0
    torch.testing.assert_close(one_step("performance.micro_batch_size=3"), reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(one_step("performance.channels_last=true"), reference, rtol=1e-4, atol=1e-5)


def test_epsilon_is_the_same_for_every_method(data):
    guarantees = set()
    for method, extra in METHODS.items():
        syn = [f"augment.synthetic_root={data['syn']}"] if method == "dpmix_diff" else []
        config = load_config(
            "fmnist_effnet_lite0", [f"augment.method={method}", *extra, *syn, "privacy.accountant=rdp"]
        )
        g = plan_guarantee(config, 50_000)
        guarantees.add((g.noise_multiplier, g.sample_rate, g.steps, g.epsilon()))
    assert len(guarantees) == 1


def test_non_private_ceiling_has_no_clipping_no_noise_and_infinite_epsilon(data, tmp_path):
    trainer = _trainer(data, tmp_path, "dpsgd", "privacy.enabled=false")
    assert not trainer.guarantee.private and trainer.guarantee.epsilon() == float("inf")
    chunk = _sampled(trainer)
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    # the expected update: plain gradient of Σ_i loss_i / (q·N) over the step's Poisson sample, then SGD
    sampled = sample_local(SEED, 0, chunk, trainer.num_train, trainer.guarantee.sample_rate)
    x = trainer._to_input(trainer.train_store.split.images[sampled.numpy()])
    y = torch.from_numpy(trainer.train_store.split.labels[sampled.numpy()])
    loss = F.cross_entropy(trainer.dp_model.logits(x), y, reduction="sum") / trainer.guarantee.expected_batch_size
    grads = torch.autograd.grad(loss, list(trainer.params.values()))
    trainer.train_step(trainer.train_store)
    lr = trainer.config.optim.lr
    for (name, p), g in zip(trainer.params.items(), grads):
        torch.testing.assert_close(p.detach(), before[name] - lr * g, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="register_as"):
        load_config("tiny_test", ["privacy.enabled=false", "tracking.register_as=m"])


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["augment.method=dpmix_self", "augment.num_views=1", "augment.num_mixes=2"], "num_views >= 2"),
        (["augment.method=dpmix_self", "augment.num_views=2"], "needs mixes"),
        (["augment.method=self_aug", "augment.num_views=2", "augment.num_mixes=2"], "num_mixes=0"),
        (["augment.method=dpmix_diff", "augment.num_views=2", "augment.num_mixes=2"], "synthetic_root"),
        (
            ["augment.method=self_aug", "augment.num_views=2", "augment.transforms=[crop, rotate]"],
            "choose distinct names",
        ),
        (
            ["augment.method=self_aug", "augment.num_views=2", "augment.crop_padding_fraction=0.6"],
            "crop_padding_fraction",
        ),
        (["augment.method=self_aug", "augment.num_views=2", "augment.crop_padding=4"], "crop_padding_fraction"),
        (["augment.method=dpsgd", "augment.num_views=4"], "method=self_aug"),
    ],
)
def test_bad_augment_settings_are_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny_test", overrides)


def test_synthetic_root_must_be_public_synthetic_images(data, tmp_path):
    base = [
        "augment.method=dpmix_diff",
        *METHODS["dpmix_diff"],
        f"data.root={data['a']}",
        f"data.cache_dir={data['root'] / 'cache'}",
    ]

    def build(root):
        return Trainer(
            load_config("tiny_test", [*base, f"augment.synthetic_root={root}"]), Distributed(cpu=True), tmp_path, SEED
        )

    with pytest.raises(DataError, match="augment.synthetic_root: .*make synthetic"):
        build(tmp_path / "missing")
    with pytest.raises(DataError, match="not a synthetic set"):
        build(data["b"])  # private-format data (here: the other data set) is never mixed in
    other = make_synthetic_folder(tmp_path / "other", [f"x{i}" for i in range(10)], per_class=2)
    with pytest.raises(DataError, match="classes"):
        build(other)
    leaked = make_synthetic_folder(tmp_path / "leaked", CLASSES, per_class=2, trained_on={"root": str(data["a"])})
    with pytest.raises(DataError, match="trained on the private data"):
        build(leaked)
    accepted = build(data["syn"])  # the refusals are specific: a public synthetic set with these classes is taken
    assert len(accepted.groups.synthetic) == 60


def test_non_private_run_writes_strict_json(data, tmp_path):
    from dpmix_dist import summary

    trainer = _trainer(data, tmp_path, "dpsgd", "privacy.enabled=false", "privacy.epochs=0.5")
    trainer.train()
    text = (tmp_path / "summary.json").read_text()
    assert '"epsilon": null' in text and "Infinity" not in text and '"private": false' in text
    assert summary.read(tmp_path / "summary.json")["epsilon"] == float("inf")


@pytest.mark.parametrize("engine", ["layerwise", "functorch"])
def test_a_step_that_samples_nothing_still_releases_noise(data, tmp_path, engine):
    """Contract item 1: a rank whose Poisson sample is empty takes part in the step (before: the layer-wise engine
    crashed on the one empty micro-batch that `split` yields)."""
    from dpmix_dist.privacy.sampling import poisson_mask

    trainer = _trainer(data, tmp_path, "dpsgd", "privacy.expected_batch_size=1", f"performance.engine={engine}")
    assert (trainer.engine is not None) == (engine == "layerwise")
    q = trainer.guarantee.sample_rate
    trainer.step = next(s for s in range(200) if not poisson_mask(SEED, s, trainer.num_train, q).any())
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    trainer.train_step(trainer.train_store)
    assert any(not torch.equal(before[n], p) for n, p in trainer.params.items())  # the noise, alone
