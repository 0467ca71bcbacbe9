"""The model card of a registered version: what the model is, what its (ε, δ) guarantee covers and what it does not.

`render` is a pure function of public values: the run's summary (the guarantee and aggregate accuracy), its
config (which holds no seed), the data set's public metadata (name, classes, sizes) and the input the served
model expects. Nothing per example, no seed, no path to the data. The tracker logs the card as the run's
`model_card.md` and links it from the registered version's description (`tracking.Tracker.finish`).
"""

from __future__ import annotations

import math
from typing import Any

from dpmix_dist.config import Config

FILE_NAME = "model_card.md"

_GROUPS = {
    "dpsgd": "the image alone, unaugmented",
    "self_aug": "K self-augmented views of the image",
    "dpmix_self": "K self-augmented views + M mixes of two distinct views",
    "dpmix_diff": "K self-augmented views + S public synthetic images + M mixes of two distinct pool members",
}


def _row(name: str, value: Any) -> str:
    return f"| {name} | {value} |"


def render(
    summary: dict,
    config: Config,
    data_metadata: dict,
    serving_input: dict,
    *,
    model_uri: str,
    run_id: str,
    code: dict[str, str],
) -> str:
    """The card as Markdown.

    Args:
        summary: the run's summary.json (the final guarantee, accuracy, sizes; its history is not used).
        config: the run's resolved config.
        data_metadata: the private data folder's metadata.json (class names, split sizes, the partition record).
        serving_input: `tracking.serving_input(...)`: the pyfunc input the model expects.
        model_uri: `models:/NAME/VERSION`.
        run_id: the MLflow run that logged the model.
        code: name -> version of the code that trained it (`code_version`, packages).
    """
    g, a, m, p = summary, config.augment, config.model, config.privacy
    split = g["eval_split"]
    n = g["num_train_examples"]
    classes = data_metadata.get("classes", [])
    partition = data_metadata.get("partition") or data_metadata.get("split") or {}
    public_count = partition.get("public_count")
    num_eval = data_metadata.get("splits", {}).get(split, {}).get("num_examples")
    private = bool(g.get("private", math.isfinite(g["epsilon"])))
    lines = [
        f"# Model card: `{model_uri}`",
        "",
        f"{m.name} fine-tuned on {g['dataset']} with {'DP-SGD' if private else 'NON-PRIVATE SGD'} "
        f"(method `{g['method']}`) by dpmix-dist; logged by MLflow run `{run_id}`.",
        "",
        "## Privacy guarantee",
        "",
    ]
    if private:
        lines += [
            f"**({g['epsilon']:.3f}, {g['delta']:g})-differential privacy for each example of the private training "
            f"set** ({n:,} examples), by DP-SGD with Poisson sampling, flat per-example clipping and Gaussian noise "
            f"added once per step, accounted by the {g['accountant'].upper()} accountant.",
        ]
    else:
        lines += ["**None: this model was trained without privacy (ε = ∞). Do not publish it as private.**"]
    lines += [
        "",
        "| | |",
        "|---|---|",
        _row("ε spent (target)", f"{g['epsilon']:.4f} ({p.target_epsilon:g})"),
        _row("δ", f"{g['delta']:g}"),
        _row("noise multiplier σ", f"{g['noise_multiplier']:.4f}"),
        _row("clipping norm C", f"{g['max_grad_norm']:g}"),
        _row("sampling rate q = expected batch / N", f"{g['sample_rate']:.6g} = {g['expected_batch_size']:,} / {n:,}"),
        _row("steps", f"{g['steps']:,}"),
        _row("accountant", g["accountant"]),
        "",
        "### What the guarantee covers",
        "",
        "- One example of the private training set: an image and its label, together with everything derived from "
        "it in training (its group: views, mixes, the synthetic images mixed into it). Adding or removing one such "
        "example changes the distribution of this model, and of anything computed from the model alone, by at most "
        "(ε, δ).",
        "- The number of private examples N is treated as public (q = expected batch / N, the divisor is q·N).",
        "",
        "### What it does not cover",
        "",
        f"- The pretrained weights (`model.weights: {m.weights}`) are assumed public: the data they were trained on "
        "is not protected by this guarantee."
        if m.weights != "none"
        else "- No pretrained weights: the model started from a random initialisation (`model.weights: none`).",
        f"- Public data is not protected: the public part of the split ({public_count:,} images, disjoint from the "
        "private set; the model signature's input example is one of them)"
        if public_count is not None
        else "- Public data is not protected (the model signature's input example is public or a grey image)",
    ]
    if a.method == "dpmix_diff":
        lines[-1] += ", the synthetic images mixed into groups and the data their generator was trained on"
    lines[-1] += "."
    lines += [
        "- Hyperparameters (learning rate, C, batch size, epochs, augmentation) are assumed to have been chosen on "
        "public data (the validation part of the public split); a choice made by looking at the private set or at "
        "the test set is not accounted for.",
        f"- The accuracy below is measured on the {split} split, without noise; that split is not part of the "
        "private training set and is not protected.",
        "- It is per example, not per person: someone with k images in the private set is protected only by group "
        "privacy (about kε, with a δ that grows with k).",
        "- It holds while the run's noise seed stays secret (drawn from the OS CSPRNG and never logged, unless the "
        "run was started with `--seed`).",
    ]
    if config.tracking.log_train_loss:
        lines.append(
            "- `tracking.log_train_loss` was on: the run's records hold a loss on sampled private batches without "
            "noise (`train_loss_not_private`), which this guarantee does NOT cover."
        )
    group = _GROUPS.get(a.method, a.method)
    lines += [
        "",
        "## Data, method and model",
        "",
        "| | |",
        "|---|---|",
        _row("data set", f"{g['dataset']} ({len(classes)} classes)" if classes else g["dataset"]),
        _row("private training examples N", f"{n:,}"),
        _row("method", f"`{g['method']}`"),
        _row(
            "group of each private example",
            f"{group}: K = {g['num_views']}, M = {g['num_mixes']}, S = {g['num_synthetic']}, "
            f"{g['group_size']} member(s), one clipped gradient",
        ),
        _row("model", f"timm `{m.name}`, weights `{m.weights}`, norm `{m.norm}`, trains `{m.trainable}`"),
        _row("trainable parameters", f"{g['trainable_parameters']:,}"),
        _row(
            "optimizer",
            f"{config.optim.name}, lr {config.optim.lr:g}, {config.optim.schedule} schedule, {p.epochs:g} epochs",
        ),
        _row("processes", g["world_size"]),
        "",
        "## Accuracy",
        "",
        f"{split.capitalize()} accuracy of the final model: **{100 * g[f'{split}_accuracy']:.2f}%**"
        + (f" on {num_eval:,} {split} images." if num_eval else "."),
        "",
        "## Input and output of the served model",
        "",
        f"`mlflow models serve -m {model_uri} --env-manager local -h 127.0.0.1 -p 5000`, then POST "
        '`{"inputs": X}` as JSON to `/invocations`, where X is a nested list of shape '
        f"(n, {serving_input['channels']}, {serving_input['image_size']}, {serving_input['image_size']}), "
        f"{serving_input['dtype']}, channels first: {serving_input['preprocessing']}. "
        f'The answer is `{{"predictions": logits}}`, shape (n, {len(classes) or "classes"}), one column per class in '
        "this order: " + (", ".join(f"{i} {c}" for i, c in enumerate(classes)) if classes else "(unknown)") + ".",
        "",
        "## Code",
        "",
        ", ".join(f"{k} `{v}`" for k, v in code.items()) + ".",
        "",
    ]
    return "\n".join(lines)
