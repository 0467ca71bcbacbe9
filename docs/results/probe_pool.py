"""What does a data set teach a linear head on the frozen 32-px EfficientNet-Lite0 features? (public data only)

    .venv/bin/python docs/results/probe_pool.py      # after `make data` and `make synthetic`; ~1 min

Fits a non-private logistic regression (scikit-learn) on the frozen features of the synthetic pool, of all 8k real
public training images and of the first 2k of them, and prints each one's accuracy on the public validation split:
the "what the synthetic pool teaches this head" rows of docs/results.md.
"""

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from dpmix_dist.data.shards import load_split
from dpmix_dist.data.transforms import to_model_input
from dpmix_dist.models import build_dp_model

torch.set_num_threads(1)
dp = build_dp_model("tf_efficientnet_lite0", "pypi:efficientnet_lite0", 10, trainable="head", image_size=32)
dp.model.to(memory_format=torch.channels_last)
cfg = dp.model.pretrained_cfg


def feats(split):
    out = []
    with torch.no_grad():
        for i in range(0, len(split.labels), 500):
            x = to_model_input(np.asarray(split.images[i : i + 500]), 32, cfg["mean"], cfg["std"]).contiguous(
                memory_format=torch.channels_last
            )
            out.append(dp.cut.prefix(x).flatten(1))
    return torch.cat(out).numpy(), np.asarray(split.labels)


syn = feats(load_split("data/fmnist_synthetic", "train", ".cache/dpmix"))
val = feats(load_split("data/fashion_mnist_public", "validation", ".cache/dpmix"))
pub = feats(load_split("data/fashion_mnist_public", "train", ".cache/dpmix"))
for name, (x, y) in (
    ("synthetic 5,000", syn),
    ("real public 8,000", pub),
    ("real public 2,000 (first)", (pub[0][:2000], pub[1][:2000])),
):
    clf = LogisticRegression(max_iter=300, C=1.0).fit(x, y)
    print(f"non-private linear probe on {name}: validation accuracy {100 * clf.score(*val):.2f}%", flush=True)
