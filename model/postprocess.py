"""Model outputs -> per-image detections in absolute pixel coordinates (the COCO evaluation format)."""
import torch
from torch import nn

from .box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Keeps the `max_dets` highest (query, class) sigmoid scores of each image, as Deformable DETR:
    one query may yield several detections with different classes."""

    def __init__(self, max_dets: int = 100):
        super().__init__()
        if max_dets < 1:
            raise ValueError(f"PostProcess: max_dets must be >= 1, got {max_dets}")
        self.max_dets = max_dets

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list:
        """outputs: 'pred_logits' [B, Q, C], 'pred_boxes' [B, Q, 4] normalised cxcywh;
        target_sizes [B, 2] (h, w) of each image (the original size for COCO evaluation).

        Returns B dicts: 'scores' [K], 'labels' [K] int64, 'boxes' [K, 4] absolute xyxy, K = min(max_dets, Q * C).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(f"PostProcess: target_sizes must be [{logits.shape[0]}, 2] (h, w), "
                             f"got {list(target_sizes.shape)}")
        num_classes = logits.shape[-1]
        prob = logits.float().sigmoid().flatten(1)  # [B, Q * C]
        scores, flat_index = prob.topk(min(self.max_dets, prob.shape[1]), dim=1)
        query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
        labels = flat_index % num_classes
        boxes = box_cxcywh_to_xyxy(boxes.float()).gather(1, query_index.unsqueeze(-1).expand(-1, -1, 4))
        img_h, img_w = target_sizes.to(boxes).unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        boxes = boxes * scale[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]
