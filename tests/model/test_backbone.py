"""Backbone: torchvision names, frozen stages, weight files, strides, masks, padding invariance."""
import importlib.util
import types

import pytest
import torch
from torch import nn

from model.backbone import (
    Backbone,
    FrozenBatchNorm2d,
    ResNetBody,
    build_backbone,
    load_torchvision_weights,
)
from model.position_encoding import PositionEmbeddingSine


def backbone_cfg(name="resnet18", weights=None, train=True, dilation=False):
    return types.SimpleNamespace(name=name, weights=weights, train=train, dilation=dilation)


def test_frozen_batchnorm_equals_eval_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8).eval()
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped, not an unexpected key
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(frozen(x), bn(x))
    assert not list(frozen.parameters())


@pytest.mark.parametrize("name, width, channels", [("resnet18", 64, [128, 256, 512]), ("resnet34", 64, [128, 256, 512]),
                                                   ("resnet50", 64, [512, 1024, 2048]), ("resnet18", 16, [32, 64, 128]),
                                                   ("resnet50", 8, [64, 128, 256])])
def test_resnet_levels_strides_and_masks(name, width, channels):
    backbone = Backbone(name, width=width)
    assert backbone.num_channels == channels
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:, :] = True
    mask[1, :, 64:] = True
    with torch.no_grad():
        out = backbone(images, mask)
    for (features, feature_mask), c, stride in zip(out, channels, (8, 16, 32)):
        assert features.shape == (2, c, 96 // stride, 128 // stride)
        assert feature_mask.shape == (2, 96 // stride, 128 // stride)
        assert not feature_mask[0].any()
        # the second image is 64x64: its valid region is exactly (64 / stride)^2 cells
        assert int((~feature_mask[1]).sum()) == (64 // stride) ** 2


def test_a_narrow_resnet_is_the_same_net_with_fewer_channels():
    wide, narrow = ResNetBody("resnet18"), ResNetBody("resnet18", width=16)
    assert [k for k in wide.state_dict()] == [k for k in narrow.state_dict()]  # the torchvision names
    for key, value in narrow.state_dict().items():
        assert value.shape[0] * 4 == wide.state_dict()[key].shape[0], key
    assert sum(p.numel() for p in narrow.parameters()) * 15 < sum(p.numel() for p in wide.parameters())
    with pytest.raises(ValueError, match="width applies to the ResNets only"):
        Backbone("swin_t", width=16)


def test_imagenet_weights_need_the_torchvision_width():
    from orchestrator.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model.backbone.width=16: ImageNet weights .* need the torchvision width"):
        load_config(None, ["model.backbone.width=16", "model.backbone.weights=resnet18.pth"])
    with pytest.raises(ConfigError, match="model.backbone.width=6: must be a multiple of 4"):
        load_config(None, ["model.backbone.width=6"])


def test_stem_and_layer1_frozen_rest_trains():
    backbone = Backbone("resnet18", train_backbone=True)
    for name, param in backbone.body.named_parameters():
        assert param.requires_grad == name.startswith(("layer2", "layer3", "layer4")), name
    frozen = Backbone("resnet18", train_backbone=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_dilation_halves_the_last_stride():
    backbone = Backbone("resnet50", dilation=True)
    assert backbone.strides == [8, 16, 16]
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert [f.shape[-1] for f, _ in out] == [8, 4, 4]
    with pytest.raises(ValueError, match="dilation"):
        Backbone("resnet18", dilation=True)


def test_unknown_backbone_is_a_value_error():
    with pytest.raises(ValueError, match="resnet101"):
        Backbone("resnet101")


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None,
                    reason="timm is installed: the missing-dependency error cannot occur")
def test_swin_without_timm_says_how_to_install():
    with pytest.raises(ValueError, match="pip install timm"):
        Backbone("swin_t")


def torchvision_style_file(body: ResNetBody, path, seed=1):
    """A file laid out like torchvision's resnet*.pth: classifier and BN counters included."""
    torch.manual_seed(seed)
    state = {k: torch.randn_like(v) if "running_var" not in k else torch.rand_like(v) + 0.5
             for k, v in body.state_dict().items()}
    for key in list(state):
        if key.endswith("running_var"):
            state[key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(100)
    state["fc.weight"] = torch.randn(1000, body.num_channels[-1])
    state["fc.bias"] = torch.randn(1000)
    torch.save(state, path)
    return state


def test_torchvision_weight_file_loads(tmp_path):
    path = tmp_path / "resnet18.pth"
    state = torchvision_style_file(ResNetBody("resnet18"), path)
    joiner = build_backbone(backbone_cfg(weights=str(path)), hidden_dim=32, position_scale=6.283185307179586)
    loaded = joiner[0].body.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.") and "num_batches_tracked" not in k}
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key])
    assert set(joiner.state_dict()) == {f"0.body.{k}" for k in loaded}


def test_weight_file_that_does_not_fit_is_rejected(tmp_path):
    path = tmp_path / "resnet50.pth"
    torchvision_style_file(ResNetBody("resnet50"), path)
    body = ResNetBody("resnet18")
    before = {k: v.clone() for k, v in body.state_dict().items()}
    with pytest.raises(ValueError, match="layer1.0.conv3.weight"):
        load_torchvision_weights(body, path)
    for key, value in body.state_dict().items():
        assert torch.equal(value, before[key])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_torchvision_weights(body, tmp_path / "nope.pth")


def test_position_encoding_counts_only_valid_pixels():
    encoding = PositionEmbeddingSine(16, normalize=True)
    mask = torch.zeros(2, 6, 9, dtype=torch.bool)
    mask[1, 4:, :] = True
    mask[1, :, 5:] = True
    pos = encoding(mask)
    assert pos.shape == (2, 32, 6, 9)
    alone = encoding(torch.zeros(1, 4, 5, dtype=torch.bool))
    torch.testing.assert_close(pos[1:, :, :4, :5], alone)
    # first feature of the y half is sin((y + 0.5) / H_valid * 2 pi)
    y = (torch.arange(4, dtype=torch.float32) + 0.5) / 4 * 2 * torch.pi
    torch.testing.assert_close(alone[0, 0, :, 0], torch.sin(y), atol=1e-5, rtol=0)
