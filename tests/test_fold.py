"""The BatchNorm-folded frozen prefix (fold.py): same features to float rounding, the trained model untouched, and a
fold that would be wrong is refused."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from torch import nn

from dpmix_dist.fold import fold_batchnorm, folded_prefix
from dpmix_dist.models import cut_model, make_dp_model


def _random_statistics(model: nn.Module) -> nn.Module:
    """Give every BatchNorm running statistics and an affine map far from identity, so a fold has work to do."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator))
            module.running_var.copy_(torch.rand(c, generator=generator) * 3 + 0.1)
            module.weight.data.copy_(torch.randn(c, generator=generator))
            module.bias.data.copy_(torch.randn(c, generator=generator))
    return model


def _batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


@pytest.mark.parametrize(
    "name,trainable,channels_last",
    [
        ("test_efficientnet", "head", False),  # timm BatchNormAct2d, Conv2dSame-free depthwise blocks
        ("test_efficientnet", "last_blocks", True),
        ("test_resnet", "last_blocks", False),  # plain BatchNorm2d, the downsample Sequential(conv, bn)
        ("tf_efficientnet_lite0", "head", True),  # the demo's backbone: Conv2dSame, ReLU6
    ],
)
def test_folded_prefix_gives_the_same_features_and_leaves_the_model_alone(name, trainable, channels_last):
    torch.manual_seed(0)
    model = _random_statistics(timm.create_model(name, num_classes=4)).eval()
    dp = make_dp_model(model, trainable=trainable, num_trainable_blocks=2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        dp.model.to(memory_format=fmt)
    before = {k: v.clone() for k, v in dp.model.state_dict().items()}
    prefix = folded_prefix(dp, torch.zeros(1, 3, 32, 32).contiguous(memory_format=fmt))
    assert prefix is not dp.cut.prefix, "nothing was folded"
    x = torch.randn(5, 3, 32, 32).contiguous(memory_format=fmt)
    with torch.no_grad():
        expected, got = dp.cut.prefix(x), prefix(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    after = dp.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert _batchnorms(dp.model) > 0  # the model that trains and is saved keeps its BatchNorms


def test_every_batchnorm_the_prefix_runs_is_folded():
    model = _random_statistics(timm.create_model("test_resnet", num_classes=4)).eval()
    prefix = cut_model(model, "head", 1).prefix
    folded = fold_batchnorm(model, prefix, torch.randn(2, 3, 32, 32))
    assert folded > 0 and _batchnorms(model) == 0  # test_resnet's classifier has no BatchNorm: all ran in the prefix


def test_nothing_to_fold_keeps_the_prefix():
    dp = make_dp_model(timm.create_model("test_vit", img_size=32, num_classes=4), trainable="head")
    assert folded_prefix(dp, torch.zeros(1, 3, 32, 32)) is dp.cut.prefix
    dp = make_dp_model(timm.create_model("test_efficientnet", num_classes=4), trainable="all")
    assert folded_prefix(dp, torch.zeros(1, 3, 32, 32)) is dp.cut.prefix


class _PreNormShortcut(nn.Module):
    """conv -> y; bn(y) + y: the BatchNorm reads the convolution's output, which is also used elsewhere, so folding
    the BatchNorm into the convolution would change the shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward_features(self, x):
        y = self.conv(x)
        return self.bn(y) + y

    def forward_head(self, x):
        return self.fc(x.mean((2, 3)))

    def get_classifier(self):
        return self.fc


def test_a_fold_that_changes_the_features_is_refused(caplog):
    dp = make_dp_model(_random_statistics(_PreNormShortcut()), trainable="head")
    with caplog.at_level(logging.WARNING, logger="dpmix_dist.fold"):
        prefix = folded_prefix(dp, torch.zeros(1, 3, 8, 8))
    assert prefix is dp.cut.prefix
    assert "keeping the unfolded prefix" in caplog.text
