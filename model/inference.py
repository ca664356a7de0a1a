"""The detector as a one-input module, for serving and export (MLflow Model, ONNX, torch.export).

Inference takes whole, unpadded images, so the padding mask is all False and is made inside; the
outputs are the final decoder layer's, before post-processing (model.postprocess turns them into
boxes in pixels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Detector(nn.Module):
    """forward(images [B, 3, H, W] ImageNet-normalised, unpadded)
        -> (pred_logits [B, Q, num_classes], pred_boxes [B, Q, 4] sigmoid cxcywh relative to the image)"""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor):
        mask = torch.zeros_like(images[:, 0], dtype=torch.bool)
        outputs = self.detector(images, mask)
        return outputs["pred_logits"], outputs["pred_boxes"]


class PackedDetector(Detector):
    """forward(images [B, 3, H, W]) -> [B, Q, 4 + num_classes]: pred_boxes, then pred_logits.

    One output tensor, because MLflow's PyTorch pyfunc serves a single tensor; `unpack` splits it.
    """

    def forward(self, images: torch.Tensor):
        logits, boxes = super().forward(images)
        return torch.cat([boxes, logits], dim=-1)

    @staticmethod
    def unpack(packed: torch.Tensor):
        """[B, Q, 4 + C] -> (pred_logits [B, Q, C], pred_boxes [B, Q, 4])"""
        return packed[..., 4:], packed[..., :4]


class FastDetector(nn.Module):
    """The detector as a GPU runs it fastest: bf16 autocast, and every batch padded to multiples of `multiple`
    pixels (the padding marked in the mask), so that a few input shapes cover all image sizes and a
    compiled model with CUDA graphs records each shape once.

    forward(images [B, 3, H, W], mask [B, H, W] bool, True = padding) -> the detector's outputs dict. Boxes are
    relative to each image's valid region, so the extra padding changes no coordinate frame; like any batch
    padding it is seen by the backbone (whose receptive fields cross the image border), so outputs move
    slightly, as they do with bf16.
    """

    def __init__(self, detector: nn.Module, multiple: int = 32, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if multiple < 1:
            raise ValueError(f"FastDetector: multiple must be >= 1, got {multiple}")
        self.detector = detector
        self.multiple = multiple
        self.dtype = dtype

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        pad_h, pad_w = -images.shape[-2] % self.multiple, -images.shape[-1] % self.multiple
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=True)
        with torch.autocast(images.device.type, dtype=self.dtype):
            return self.detector(images, mask)
