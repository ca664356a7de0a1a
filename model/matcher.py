"""Hungarian matching between predictions and ground-truth boxes (focal-style class cost)."""
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


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
        """pred_logits [Q, C], pred_boxes [Q, 4] cxcywh, tgt_labels [N], tgt_boxes [N, 4] -> cost [Q, N]."""
        prob = pred_logits.sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
        pos_cost = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        cost_class = pos_cost[:, tgt_labels] - neg_cost[:, tgt_labels]
        cost_bbox = torch.cdist(pred_boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list) -> list:
        """outputs: 'pred_logits' [B, Q, C], 'pred_boxes' [B, Q, 4]; targets: B dicts with 'labels' [N_b], 'boxes' [N_b, 4].

        Returns B tuples (pred_idx [n_b], tgt_idx [n_b]) of int64, n_b = min(Q, N_b), pred_idx ascending.
        """
        batch, num_queries = outputs["pred_logits"].shape[:2]
        if len(targets) != batch:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {batch} predictions")
        device = outputs["pred_logits"].device
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            return [(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)) for _ in targets]
        # one cost matrix for the whole batch (few large kernels), cut per image for the assignment
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device).float()
        cost = self.cost_matrix(outputs["pred_logits"].flatten(0, 1).float(), outputs["pred_boxes"].flatten(0, 1).float(),
                                tgt_labels, tgt_boxes)
        cost = cost.view(batch, num_queries, -1).cpu()
        indices = []
        for b, image_cost in enumerate(cost.split(sizes, dim=-1)):
            pred_idx, tgt_idx = linear_sum_assignment(image_cost[b].numpy())
            indices.append((torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64)))
        return indices
