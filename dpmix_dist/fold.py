"""A faster frozen prefix: eval-mode BatchNorm folded into the convolution that feeds it.

The frozen part of the backbone never trains and never runs under autograd: it computes cached features once per
image, or each view's features once per step under DP-Mix. Its BatchNorms use their running statistics, so each is
a per-channel affine map, which folds exactly (up to float rounding) into the weights and bias of the convolution
whose output it normalizes. Measured on EfficientNet-Lite0 at 64 px, batches of 64, on the 2-core machine: 374-423 ->
654-667 img/s in two runs (`benchmarks/bench_members.py`, figures in benchmarks/README.md).

The fold works on a copy of the model (the trained and saved model is untouched) and pairs a convolution with a
BatchNorm by dataflow, traced on random input: the BatchNorm's input must be the very tensor the convolution
returned. The folded prefix is then compared with the original on random input, and the original is kept, with a
warning, if they disagree beyond float rounding.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from timm.layers import BatchNormAct2d
from torch import nn

from dpmix_dist.models import DPModel, cut_model

log = logging.getLogger(__name__)

Prefix = Callable[[torch.Tensor], torch.Tensor]

# How far the folded prefix may drift from the original, relative to the largest output: float32 rounding of the
# folded weights is ~1e-6 per layer; a wrong fold is off by O(1).
_TOLERANCE = 1e-3


def folded_prefix(dp_model: DPModel, example: torch.Tensor) -> Prefix:
    """`dp_model.cut.prefix` with its BatchNorms folded into their convolutions, or the prefix itself when nothing
    folds (a ViT, GroupNorm, `trainable=all`) or the folded copy disagrees with it on `example`'s shape.

    `example`: a model input whose shape, dtype, device and memory format the prefix will see (its values are not
    used: the check runs on random input, so no private image is needed here).
    """
    original = dp_model.cut.prefix
    if dp_model.trainable == "all":  # no frozen prefix
        return original
    twin = copy.deepcopy(dp_model.model)
    prefix = cut_model(twin, dp_model.trainable, dp_model.num_trainable_blocks).prefix
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn((2, *example.shape[1:]), generator=generator, dtype=example.dtype)
    probe = probe.to(example.device).contiguous(memory_format=_memory_format(example))
    if not fold_batchnorm(twin, prefix, probe):
        return original
    with torch.no_grad():
        expected, got = original(probe), prefix(probe)
    error = (got - expected).abs().max().item()
    if not error <= _TOLERANCE * max(1.0, expected.abs().max().item()):
        log.warning("folding BatchNorm changed the frozen features by %.3g; keeping the unfolded prefix", error)
        return original
    return prefix


def fold_batchnorm(model: nn.Module, forward: Prefix, probe: torch.Tensor) -> int:
    """Fold every eval-mode BatchNorm of `model` that `forward(probe)` feeds straight from a convolution's output
    into that convolution, in place; returns how many were folded. The BatchNorm is replaced by what follows the
    normalization in it (timm's BatchNormAct2d: its dropout and activation, made in-place: the input is the fresh
    convolution output), or by Identity."""
    pairs = _conv_batchnorm_pairs(model, forward, probe)
    parents = {child: (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    for conv, bn in pairs:
        _fold_into(conv, bn)
        parent, name = parents[bn]
        setattr(parent, name, _after_normalization(bn))
    return len(pairs)


def _conv_batchnorm_pairs(model: nn.Module, forward: Prefix, probe: torch.Tensor) -> list[tuple[nn.Conv2d, nn.Module]]:
    """(conv, BatchNorm) pairs where, in one traced call, the BatchNorm ran once on the output of a convolution
    that ran once. Outputs are kept referenced during the trace, so no tensor id is reused."""
    outputs: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}
    calls: dict[nn.Module, int] = {}
    inputs: dict[nn.Module, int] = {}

    def after_conv(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        outputs[id(output)] = (module, output)

    def before_norm(module, args):
        calls[module] = calls.get(module, 0) + 1
        inputs[module] = id(args[0])

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv))
        elif _foldable(module):
            handles.append(module.register_forward_pre_hook(before_norm))
    try:
        with torch.no_grad():
            forward(probe)
    finally:
        for handle in handles:
            handle.remove()
    pairs = []
    for bn, tensor_id in inputs.items():
        conv = outputs.get(tensor_id, (None,))[0]
        if conv is not None and calls[bn] == 1 and calls[conv] == 1:
            pairs.append((conv, bn))
    return pairs


def _foldable(module: nn.Module) -> bool:
    """An eval-mode BatchNorm2d using running statistics whose forward is known: torch's own or timm's
    BatchNormAct2d (normalize, dropout, activation)."""
    return (
        type(module) in (nn.BatchNorm2d, BatchNormAct2d)
        and not module.training
        and module.running_mean is not None
        and module.running_var is not None
    )


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.weight is not None:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))).to(conv.weight.dtype))
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)


def _after_normalization(bn: nn.Module) -> nn.Module:
    if isinstance(bn, BatchNormAct2d):
        for module in (bn.drop, bn.act):
            if hasattr(module, "inplace"):
                module.inplace = True
        return nn.Sequential(bn.drop, bn.act)
    return nn.Identity()


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
