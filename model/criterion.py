"""Training losses of Sparse DETR: Hungarian-matched focal / L1 / GIoU losses on every prediction
head (decoder layers, two-stage proposals, encoder auxiliary heads) plus the DAM loss of the
scoring network.

All heads are matched together (one device -> host copy of their costs) and their losses are
computed together: the heads' queries are concatenated along the query axis, so a step costs a few
dozen kernels whatever the number of heads, and never waits for the device but for the matching.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou_aligned
from .dam import dam_target
from .matcher import HungarianMatcher, PaddedTargets, pad_targets

DETECTION_LOSSES = ("labels", "boxes")
KNOWN_LOSSES = DETECTION_LOSSES + ("mask_prediction",)


def focal_terms(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Elementwise focal loss (Lin et al. 2017): logits, targets [..., C] (targets one-hot float) -> [..., C]."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def sigmoid_focal_loss(logits, targets, num_boxes, alpha: float = 0.25, gamma: float = 2.0):
    """Focal loss summed over queries and classes, divided by num_boxes (a float or a 0-d tensor).

    logits, targets: [B, Q, C] (targets one-hot float). Returns a scalar.
    """
    return focal_terms(logits, targets, alpha, gamma).sum() / num_boxes


def _average_num_boxes(targets, device) -> torch.Tensor:
    """Target boxes per rank, averaged over all ranks so every rank normalises alike (>= 1): a 0-d float32
    tensor on `device`, never read on the host (that would wait for the device)."""
    num_boxes = torch.full((), float(sum(len(t["labels"]) for t in targets)), device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        world_size = dist.get_world_size()
    return torch.clamp(num_boxes / world_size, min=1)


class SetCriterion(nn.Module):
    """Computes the unweighted losses of one forward pass; `weight_dict` says how to sum them.

    losses: subset of ('labels', 'boxes', 'mask_prediction'). Keys returned:
    'loss_ce', 'loss_bbox', 'loss_giou' for the last decoder layer, the same with '_{i}' for decoder
    layer i < last ('aux_outputs'), '_enc' for the two-stage proposals ('enc_outputs', class-agnostic
    targets unless class_specific_enc), '_enc_{i}' for encoder layer i ('aux_outputs_enc'), and
    'loss_mask_prediction' (DAM loss, when 'backbone_mask_prediction' is in the outputs).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict, losses,
                 focal_alpha: float = 0.25, class_specific_enc: bool = False):
        super().__init__()
        unknown = [loss for loss in losses if loss not in KNOWN_LOSSES]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; known: {list(KNOWN_LOSSES)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = list(losses)
        self.focal_alpha = focal_alpha
        self.class_specific_enc = class_specific_enc

    def heads(self, outputs: dict) -> list[tuple[str, dict, bool]]:
        """(key suffix, head outputs, class-agnostic targets?) of every prediction head in `outputs`."""
        heads = [("", outputs, False)]
        heads += [(f"_{i}", aux, False) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:
            # the shared proposal head only tells object from background: every object is class 0
            heads.append(("_enc", outputs["enc_outputs"], not self.class_specific_enc))
        heads += [(f"_enc_{i}", aux, False) for i, aux in enumerate(outputs.get("aux_outputs_enc", []))]
        return heads

    def detection_losses(self, heads, targets: PaddedTargets, num_boxes) -> dict:
        """Match and score heads [(suffix, head outputs, agnostic)] -> {'loss_ce' + suffix, ...} (as requested).

        Heads with the same kind of targets form one group whose queries are concatenated: one cost
        tensor, one focal loss and one set of box losses per group. The matches of every group cross
        from the host to the device in one copy."""
        groups = [_HeadGroup([h for h in heads if h[2] == agnostic], targets.agnostic if agnostic else targets)
                  for agnostic in dict.fromkeys(h[2] for h in heads)]
        matches = self.matcher.match([(g.logits, g.boxes, g.targets, g.queries) for g in groups])
        host_index = [g.pair_index(m) for g, m in zip(groups, matches)]
        device_index = torch.from_numpy(np.concatenate([i.ravel() for i in host_index]))
        device_index = device_index.to(groups[0].logits.device, non_blocking=True).split([i.size for i in host_index])
        losses = {}
        for group, index in zip(groups, device_index):
            values = self._group_losses(group, index.view(4, -1), num_boxes)
            # one unbind for all: its backward gathers the gradients of every head's terms in one kernel
            scalars = iter(torch.stack(list(values.values()), 1).flatten().unbind())
            for suffix in group.suffixes:
                losses.update({name + suffix: next(scalars) for name in values})
        return {name + suffix: losses[name + suffix] for suffix, _, _ in heads
                for name in ("loss_ce", "loss_bbox", "loss_giou") if name + suffix in losses}

    def _group_losses(self, group: _HeadGroup, index, num_boxes) -> dict:
        """index [4, M] (see _HeadGroup.pair_index) -> {'loss_ce', 'loss_bbox', 'loss_giou'} (as requested),
        each [H]: one value per head of the group."""
        head, image, query, slot = index
        out = {}
        if "labels" in self.losses:
            onehot = torch.zeros_like(group.logits)
            onehot[image, query, group.targets.labels[image, slot]] = 1
            per_query = focal_terms(group.logits, onehot, alpha=self.focal_alpha, gamma=2.0).sum((0, 2))
            out["loss_ce"] = torch.stack([part.sum() for part in per_query.split(group.queries)]) / num_boxes
        if "boxes" in self.losses:
            pred, target = group.boxes[image, query], group.targets.boxes[image, slot]
            l1 = F.l1_loss(pred, target, reduction="none").sum(-1)
            giou = generalized_box_iou_aligned(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))
            per_head = torch.zeros(len(group.queries), 2, device=pred.device).index_add_(
                0, head, torch.stack([l1, 1 - giou], 1))
            out["loss_bbox"], out["loss_giou"] = (per_head / num_boxes).unbind(1)
        return out

    def loss_mask_prediction(self, outputs):
        """DAM loss: the scoring network's logits [B, S] against the binary top-k DAM target [B, S]."""
        if "backbone_mask_prediction" not in outputs:
            raise KeyError("SetCriterion: loss 'mask_prediction' needs 'backbone_mask_prediction' (model rho > 0)")
        prediction = outputs["backbone_mask_prediction"].float()
        return {"loss_mask_prediction": F.multilabel_soft_margin_loss(prediction, dam_target(outputs))}

    def _check_targets(self, outputs, targets):
        batch = outputs["pred_logits"].shape[0]
        if len(targets) != batch:
            raise ValueError(f"SetCriterion: {len(targets)} targets for a batch of {batch} images")
        # read on the host: free for the loader's (CPU) targets, one wait for targets already on a GPU
        labels = np.concatenate([t["labels"].reshape(-1).cpu().numpy() for t in targets])
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"SetCriterion: target labels must lie in [0, {self.num_classes}), "
                             f"got {labels.min()}..{labels.max()}")

    def forward(self, outputs: dict, targets: list) -> dict:
        """outputs: the model's output dict (see SparseDETR.forward); targets: B dicts with 'labels', 'boxes'
        (on the CPU, as the loader yields them, or on the model's device).

        Returns a dict of unweighted scalar losses (keys as in the class docstring).
        """
        self._check_targets(outputs, targets)
        device = outputs["pred_logits"].device
        num_boxes = _average_num_boxes(targets, device)
        losses = {}
        if any(loss in self.losses for loss in DETECTION_LOSSES):
            losses.update(self.detection_losses(self.heads(outputs), pad_targets(targets, device), num_boxes))
        if "mask_prediction" in self.losses and "backbone_mask_prediction" in outputs:
            losses.update(self.loss_mask_prediction(outputs))
        return losses


class _HeadGroup:
    """Prediction heads scored against the same targets, concatenated along the query axis:
    logits [B, Q, C], boxes [B, Q, 4] float32, head h owning the next queries[h] of the Q queries."""

    def __init__(self, heads: list[tuple[str, dict, bool]], targets: PaddedTargets):
        self.suffixes = [suffix for suffix, _, _ in heads]
        self.queries = [head["pred_logits"].shape[1] for _, head, _ in heads]
        self.logits = torch.cat([head["pred_logits"] for _, head, _ in heads], 1).float()
        self.boxes = torch.cat([head["pred_boxes"] for _, head, _ in heads], 1).float()
        self.targets = targets

    def pair_index(self, matches) -> np.ndarray:
        """Per head, per image (pred_idx, tgt_idx) -> [4, M] int64: the head, image, query (in the
        concatenation) and target slot of every matched pair."""
        rows = [np.stack([np.full_like(pred, h), np.full_like(pred, b), pred + start, tgt])
                for h, (start, head_matches) in enumerate(zip(np.cumsum([0, *self.queries]), matches))
                for b, (pred, tgt) in enumerate(head_matches)]
        return np.concatenate(rows, 1) if rows else np.zeros((4, 0), np.int64)


def build_criterion(model_cfg, loss_cfg) -> SetCriterion:
    """SetCriterion with its matcher and weight_dict from ModelConfig / LossConfig-like objects."""
    matcher = HungarianMatcher(cost_class=loss_cfg.set_cost_class, cost_bbox=loss_cfg.set_cost_bbox,
                               cost_giou=loss_cfg.set_cost_giou, focal_alpha=loss_cfg.focal_alpha)
    main = {"loss_ce": loss_cfg.cls_coef, "loss_bbox": loss_cfg.bbox_coef, "loss_giou": loss_cfg.giou_coef}
    weight_dict = dict(main)
    if model_cfg.aux_loss:
        for i in range(model_cfg.dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in main.items()})
    if model_cfg.two_stage:
        weight_dict.update({f"{k}_enc": v for k, v in main.items()})
    if model_cfg.use_enc_aux_loss:
        for i in range(model_cfg.enc_layers - 1):
            weight_dict.update({f"{k}_enc_{i}": v * loss_cfg.enc_aux_coef for k, v in main.items()})
    losses = list(DETECTION_LOSSES)
    if model_cfg.rho > 0:
        weight_dict["loss_mask_prediction"] = loss_cfg.mask_prediction_coef
        losses.append("mask_prediction")
    return SetCriterion(model_cfg.num_classes, matcher, weight_dict, losses,
                        focal_alpha=loss_cfg.focal_alpha, class_specific_enc=model_cfg.eff_specific_head)
