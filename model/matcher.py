"""Hungarian matching between predictions and ground-truth boxes (focal-style class cost).

The costs of every prediction head of a step are computed on the device in one batch and cross to
the host in one copy; only the assignment itself (scipy) runs there, image by image.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


@dataclass
class PaddedTargets:
    """The targets of a batch, padded to the most boxes of an image: labels [B, N] int64, boxes [B, N, 4]
    float32 cxcywh (padding: label 0, box (0.5, 0.5, 1, 1)), sizes: each image's box count (host ints)."""

    labels: torch.Tensor
    boxes: torch.Tensor
    sizes: list[int]

    @property
    def agnostic(self) -> PaddedTargets:
        """The same boxes, every one of class 0 (for a head that only tells object from background)."""
        return PaddedTargets(torch.zeros_like(self.labels), self.boxes, self.sizes)


def pad_targets(targets: list[dict], device: torch.device) -> PaddedTargets:
    """B dicts with 'labels' [N_b], 'boxes' [N_b, 4] -> PaddedTargets on `device`.

    Targets on the CPU (as the loader yields them) cross to the device in a single copy."""
    sizes = [len(t["labels"]) for t in targets]
    width = max(sizes, default=0)
    on_host = all(t["boxes"].device.type == "cpu" for t in targets)
    build_on = torch.device("cpu") if on_host else device
    packed = torch.zeros(len(targets), width, 5, device=build_on)
    packed[..., :2], packed[..., 2:4] = 0.5, 1.0  # padding: a valid box (label 0), never matched
    for b, t in enumerate(targets):  # host work when the targets are on the host: no device op per image
        packed[b, :sizes[b], :4] = t["boxes"].to(build_on, torch.float32)
        packed[b, :sizes[b], 4] = t["labels"].to(build_on, torch.float32)  # class ids are exact in float32
    packed = packed.to(device, non_blocking=True)
    return PaddedTargets(packed[..., 4].long(), packed[..., :4], sizes)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of targets to predictions minimising a weighted matching cost.

    The class cost is the focal loss of calling the query positive minus that of calling it
    negative (as Deformable DETR), so it is on the same scale as the focal loss the queries train with.
    Unmatched predictions are treated as background by the criterion.
    """

    def __init__(self, cost_class: float = 2, cost_bbox: float = 5, cost_giou: float = 2,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou cannot all be 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, pred_logits, pred_boxes, tgt_labels, tgt_boxes):
        """pred_logits [..., Q, C], pred_boxes [..., Q, 4] cxcywh, tgt_labels [..., N], tgt_boxes [..., N, 4]
        -> cost [..., Q, N] (the leading dimensions, e.g. the batch, are shared)."""
        num_queries = pred_logits.shape[-2]
        index = tgt_labels.unsqueeze(-2).expand(*tgt_labels.shape[:-1], num_queries, tgt_labels.shape[-1])
        prob = pred_logits.gather(-1, index).sigmoid()  # [..., Q, N]: each query's probability of each target's class
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
        pos_cost = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        cost_bbox = torch.cdist(pred_boxes, tgt_boxes, p=1)
        # boxes from cxcywh with non-negative sizes are ordered: no check (it would wait for the device)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(tgt_boxes), check=False)
        return self.cost_bbox * cost_bbox + self.cost_class * (pos_cost - neg_cost) + self.cost_giou * cost_giou

    @torch.no_grad()
    def match(self, groups: list[tuple]) -> list[list[list[tuple]]]:
        """Assign every head of a step at once.

        groups: (pred_logits [B, Q, C], pred_boxes [B, Q, 4], PaddedTargets, queries) where the group's heads
        are concatenated along Q, head h owning the next queries[h] queries. One cost tensor per group, and
        one device -> host copy for all groups (a copy per head would wait for the device every time).

        Returns per group, per head, B tuples (pred_idx [n_b], tgt_idx [n_b]) of int64 numpy arrays,
        n_b = min(queries[h], N_b), pred_idx ascending and within the head; tgt_idx indexes the image's targets.
        """
        costs = [self.cost_matrix(logits.float(), boxes.float(), t.labels, t.boxes) if max(t.sizes, default=0) else None
                 for logits, boxes, t, _ in groups]
        present = [c.flatten() for c in costs if c is not None]
        flat = torch.cat(present).cpu().numpy() if present else np.zeros(0, np.float32)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        matches, offset = [], 0
        for cost, (_, _, targets, queries) in zip(costs, groups):
            if cost is None:
                matches.append([[empty] * len(targets.sizes) for _ in queries])
                continue
            host = flat[offset:offset + cost.numel()].reshape(cost.shape)
            offset += cost.numel()
            bounds = np.cumsum([0, *queries])
            matches.append([[_assign(host[b, start:end, :n]) if n else empty for b, n in enumerate(targets.sizes)]
                             for start, end in itertools.pairwise(bounds)])
        return matches

    def forward(self, outputs: dict, targets: list) -> list:
        """outputs: 'pred_logits' [B, Q, C], 'pred_boxes' [B, Q, 4]; targets: B dicts with 'labels' [N_b], 'boxes' [N_b, 4].

        Returns B tuples (pred_idx [n_b], tgt_idx [n_b]) of int64, n_b = min(Q, N_b), pred_idx ascending.
        """
        batch = outputs["pred_logits"].shape[0]
        if len(targets) != batch:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {batch} predictions")
        padded = pad_targets(targets, outputs["pred_logits"].device)
        [[matches]] = self.match([(outputs["pred_logits"], outputs["pred_boxes"], padded, [outputs["pred_logits"].shape[1]])])
        return [(torch.from_numpy(pred), torch.from_numpy(tgt)) for pred, tgt in matches]


def _assign(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cost [Q, N] -> (pred_idx, tgt_idx) int64 of the minimum-cost one-to-one assignment, pred_idx ascending."""
    pred, tgt = linear_sum_assignment(cost)
    return pred.astype(np.int64), tgt.astype(np.int64)
