"""Backbones: ResNet-18/34/50 in plain torch (torchvision parameter names) and optional Swin-T.

The ResNet modules use torchvision's attribute names (conv1, bn1, layer1.0.conv1, ...,
layer2.0.downsample.0) so a torchvision ImageNet weight file loads unchanged, and so the state
dict of the detector matches the official one (`backbone.0.body.layer1.0.conv1.weight`).
Batch-norm statistics are frozen (FrozenBatchNorm2d), as in DETR: detection batches are small.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.position_encoding import PositionEmbeddingSine


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, never trained).

    eps is added before rsqrt; without it backbones other than torchvision's ResNets produce NaNs.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.eps = eps

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # torchvision files carry a BatchNorm counter that a frozen norm has no use for
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x):
        # eval-mode batch norm: one kernel forward and one backward (the elementwise form takes eight), in
        # the input's dtype under autocast (the elementwise form promoted bf16 activations to float32)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=self.eps)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convs."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        if dilation > 1:
            raise ValueError("model.backbone.dilation is only supported by resnet50 (Bottleneck blocks)")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50 block (v1.5: the stride sits on the 3x3 conv, as in torchvision)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = FrozenBatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


RESNET_SPECS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNetBody(nn.Module):
    """torchvision's ResNet without avgpool/fc; returns the outputs of layer2, layer3, layer4.

    forward(x [B, 3, H, W]) -> [C3 [B, c3, H/8, W/8], C4 [B, c4, H/16, W/16], C5 [B, c5, H/32, W/32]]
    (C5 at stride 16 when `dilation` replaces the last stride). ``width``: the stem's channels, doubled by each
    stage after the first (64: torchvision's, which ImageNet files need; less: a narrow net for CPU smoke runs).
    """

    def __init__(self, name: str, dilation: bool = False, width: int = 64):
        super().__init__()
        block, layers = RESNET_SPECS[name]
        self.inplanes, self.dilation = width, 1
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2, dilate=dilation)
        self.num_channels = [2 * width * block.expansion, 4 * width * block.expansion, 8 * width * block.expansion]

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       FrozenBatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


class SwinBody(nn.Module):
    """Swin-T from timm (optional dependency), stages 2-4 as channel-first maps at strides 8/16/32."""

    def __init__(self):
        super().__init__()
        try:
            import timm
        except ImportError as err:
            raise ValueError("model.backbone.name=swin_t needs timm: pip install timm") from err
        self.model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, features_only=True,
                                       out_indices=(1, 2, 3), strict_img_size=False, dynamic_img_pad=True)
        self.num_channels = list(self.model.feature_info.channels())

    def forward(self, x) -> list[torch.Tensor]:
        feats = self.model(x)
        # timm's Swin returns channel-last maps; the detector expects [B, C, H, W]
        return [f.permute(0, 3, 1, 2).contiguous() if f.shape[1] != c else f
                for f, c in zip(feats, self.num_channels)]


class Backbone(nn.Module):
    """Feature extractor + padding masks resized to every output.

    forward(images [B, 3, H, W], mask [B, H, W] bool, True = padding)
        -> list of (features [B, C_l, H_l, W_l], mask [B, H_l, W_l]) for C3, C4, C5
    """

    def __init__(self, name: str, train_backbone: bool = True, dilation: bool = False, width: int = 64):
        super().__init__()
        if name in RESNET_SPECS:
            self.body = ResNetBody(name, dilation, width)
            for param_name, param in self.body.named_parameters():
                # the stem and layer1 stay frozen as in DETR; everything when the backbone is not trained
                if not train_backbone or not param_name.startswith(("layer2", "layer3", "layer4")):
                    param.requires_grad_(False)
        elif name == "swin_t":
            if width != 64:
                raise ValueError("model.backbone.width applies to the ResNets only, not swin_t")
            if dilation:
                raise ValueError("model.backbone.dilation is not supported by swin_t")
            self.body = SwinBody()
            if not train_backbone:
                for param in self.body.parameters():
                    param.requires_grad_(False)
        else:
            raise ValueError(f"model.backbone.name: unknown backbone {name!r} "
                             f"(choose one of {sorted(RESNET_SPECS) + ['swin_t']})")
        self.num_channels = self.body.num_channels
        self.strides = [8, 16, 16 if dilation else 32]

    def forward(self, images, mask) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for feature in self.body(images):
            feature_mask = F.interpolate(mask[None].float(), size=feature.shape[-2:]).to(torch.bool)[0]
            out.append((feature, feature_mask))
        return out


class Joiner(nn.Sequential):
    """Backbone + positional encoding; an nn.Sequential so that keys read `backbone.0.body.*`.

    forward(images, mask) -> (features: list of (x [B, C_l, H_l, W_l], mask [B, H_l, W_l]),
                              pos: list of [B, hidden_dim, H_l, W_l])
    """

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, images, mask):
        features = self[0](images, mask)
        pos = [self[1](feature_mask).to(x.dtype) for x, feature_mask in features]
        return features, pos


def load_torchvision_weights(body: nn.Module, path) -> None:
    """Load a torchvision ResNet ImageNet file (e.g. resnet50-0676ba61.pth) into a ResNetBody.

    The classifier (fc.*) is dropped; every other key must match exactly.
    Raises FileNotFoundError for a missing file and ValueError for a file that does not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone.weights: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"model.backbone.weights: cannot read {path} as a torch file: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"model.backbone.weights: {path} does not hold a state dict")  # noqa: TRY004
    state = {k.removeprefix("module."): v for k, v in state.items()
             if not k.removeprefix("module.").startswith("fc.")}
    expected = body.state_dict()
    missing = sorted(set(expected) - {k for k in state if not k.endswith("num_batches_tracked")})
    unexpected = sorted(k for k in state if k not in expected and not k.endswith("num_batches_tracked"))
    wrong_shape = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        raise ValueError(f"model.backbone.weights: {path} does not fit the backbone: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)}), "
                         f"wrong shape {wrong_shape[:5]} ({len(wrong_shape)})")
    body.load_state_dict(state, strict=True)


def build_backbone(backbone_cfg, hidden_dim: int, position_scale: float) -> Joiner:
    """backbone_cfg has the fields of orchestrator.config.BackboneConfig (name, weights, train, dilation, width)."""
    width = getattr(backbone_cfg, "width", 64)
    backbone = Backbone(backbone_cfg.name, train_backbone=backbone_cfg.train, dilation=backbone_cfg.dilation,
                        width=width)
    if backbone_cfg.weights:
        if backbone_cfg.name not in RESNET_SPECS:
            raise ValueError(f"model.backbone.weights: only torchvision ResNet files are supported, "
                             f"not for {backbone_cfg.name!r}")
        load_torchvision_weights(backbone.body, backbone_cfg.weights)
    position_embedding = PositionEmbeddingSine(hidden_dim // 2, normalize=True, scale=position_scale)
    return Joiner(backbone, position_embedding)
