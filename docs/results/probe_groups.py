"""Per-group gradients of the DP-Mix comparison's head, measured on PUBLIC images only (docs/results.md, "Why").

    .venv/bin/python docs/results/probe_groups.py      # after `make data` and `make synthetic`; ~30 s

The comparison trains a linear head (zero-init) on frozen 32-px EfficientNet-Lite0 features with C = 1 and
σ = 4.531 at ε = 1 (expected batch 500). For one batch of 500 real PUBLIC training images, each method's groups are
built by the toolkit's own `GroupBuilder` (the table's sizes; flip only, as chosen), and at two heads (zero, the
one the public data fits without privacy) this prints, per method: the per-group gradient norms (quartiles), the
share that clipping at C scales down, and the step's signal: ‖Σ_i clip(g_i)‖ against the noise's norm σ·C·√d, and
the cosine of Σ_i clip(g_i) with the plain (dpsgd, unclipped) batch gradient. Nothing private is read.
"""

import numpy as np
import torch
import torch.nn.functional as F

from dpmix_dist.augment import GroupBuilder
from dpmix_dist.config import AugmentConfig
from dpmix_dist.data.shards import load_split
from dpmix_dist.data.transforms import to_model_input
from dpmix_dist.models import build_dp_model
from dpmix_dist.privacy.clipping import clip_factors

BATCH, SEED, C, SIGMA = 500, 0, 1.0, 4.531
SIZES = {  # the table's groups (docs/results/dpmix_small.sh), crop padding 0 (flip only)
    "dpsgd": None,  # the image itself, a group of one
    "self_aug": dict(method="self_aug", num_views=4),
    "dpmix_self": dict(method="dpmix_self", num_views=4, num_mixes=4),
    "dpmix_diff": dict(
        method="dpmix_diff", num_views=4, num_synthetic=4, num_mixes=4, synthetic_root="data/fmnist_synthetic"
    ),
}

torch.set_num_threads(2)
dp = build_dp_model("tf_efficientnet_lite0", "pypi:efficientnet_lite0", 10, trainable="head", image_size=32)
dp.model.to(memory_format=torch.channels_last)
mean, std = dp.model.pretrained_cfg["mean"], dp.model.pretrained_cfg["std"]


def to_input(images) -> torch.Tensor:
    return to_model_input(np.asarray(images), 32, mean, std).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def features(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([dp.cut.prefix(x[i : i + 500]).flatten(1) for i in range(0, len(x), 500)])


public = load_split("data/fashion_mnist_public", "train", ".cache/dpmix")
synthetic = load_split("data/fmnist_synthetic", "train", ".cache/dpmix")
rng = np.random.default_rng(SEED)
rows = np.sort(rng.choice(len(public.labels), size=BATCH, replace=False))
images, labels = np.asarray(public.images[rows]), torch.from_numpy(np.asarray(public.labels[rows])).long()

# the head the public data fits without privacy: full-batch gradient descent on all 8k public features
all_f = features(to_input(public.images[:]))
all_y = torch.from_numpy(np.asarray(public.labels[:])).long()
fitted = torch.nn.Linear(all_f.shape[1], 10)
torch.nn.init.zeros_(fitted.weight)
torch.nn.init.zeros_(fitted.bias)
opt = torch.optim.LBFGS(fitted.parameters(), max_iter=200, line_search_fn="strong_wolfe")


def closure():
    opt.zero_grad()
    loss = F.cross_entropy(fitted(all_f), all_y) + 1e-4 * fitted.weight.square().sum()
    loss.backward()
    return loss


opt.step(closure)
heads = {"zero head": (torch.zeros(10, all_f.shape[1]), torch.zeros(10)), "fitted head": (fitted.weight, fitted.bias)}
d = all_f.shape[1] * 10 + 10
print(
    f"batch {BATCH} public images, d = {d} head parameters, C = {C}, σ = {SIGMA}: noise norm σ·C·√d = "
    f"{SIGMA * C * d**0.5:.1f}",
    flush=True,
)

groups = {}
for name, size in SIZES.items():
    if size is None:
        members, targets = to_input(images)[:, None], labels[:, None]
    else:
        spec = AugmentConfig(**size, crop_padding_fraction=0)  # crop padding 0: the crop is the identity, flips remain
        builder = GroupBuilder(spec, 10, to_input, 32, synthetic if spec.method == "dpmix_diff" else None)
        members, targets = builder.build(builder.draws(SEED, 0, torch.from_numpy(rows)), images, labels)
    b, g = members.shape[:2]
    f = features(members.reshape(b * g, *members.shape[2:])).view(b, g, -1)
    soft = targets if targets.dim() == 3 else F.one_hot(targets, 10).float()
    groups[name] = (f, soft)

for head_name, (w, bias) in heads.items():
    w, bias = w.detach(), bias.detach()
    print(f"\n{head_name}:")
    print(
        f"{'method':<11} {'group':>5} {'norm q25':>9} {'median':>8} {'q75':>8} {'clipped':>8} "
        f"{'‖Σ clip g‖':>11} {'/ noise':>8} {'cos(plain)':>10}"
    )
    plain = None
    for name, (f, soft) in groups.items():
        p = torch.softmax(f @ w.T + bias, dim=-1)
        err = (p - soft) / f.shape[1]  # ∂(mean loss over the group)/∂logits of each member
        gw = torch.einsum("bgk,bgd->bkd", err, f)  # per-group weight gradient (b, 10, D)
        gb = err.sum(1)
        per_group = torch.cat([gw.flatten(1), gb], dim=1)
        norms = per_group.norm(dim=1)
        factors = clip_factors(norms, C)  # the trainer's own min(1, C / norm)
        summed = (factors[:, None] * per_group).sum(0)
        if plain is None:  # dpsgd comes first: its unclipped batch gradient is the reference direction
            plain = per_group.sum(0)
        q = torch.quantile(norms, torch.tensor([0.25, 0.5, 0.75]))
        print(
            f"{name:<11} {f.shape[1]:>5} {q[0]:>9.3f} {q[1]:>8.3f} {q[2]:>8.3f} {(norms > C).float().mean():>8.1%} "
            f"{summed.norm():>11.1f} {summed.norm() / (SIGMA * C * d**0.5):>8.3f} "
            f"{F.cosine_similarity(summed, plain, dim=0):>10.3f}",
            flush=True,
        )
