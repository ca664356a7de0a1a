"""The detector as a one-input module, for serving and export (MLflow Model, ONNX, torch.export).

Inference takes whole, unpadded images, so the padding mask is all False and is made inside; the
outputs are the final decoder layer's, before post-processing (model.postprocess turns them into
boxes in pixels).
"""
from __future__ import annotations

import torch
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
