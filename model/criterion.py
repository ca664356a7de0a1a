"""Training losses of Sparse DETR: Hungarian-matched focal / L1 / GIoU losses on every prediction
head (decoder layers, two-stage proposals, encoder auxiliary heads) plus the DAM loss of the
scoring network."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .dam import dam_target
from .matcher import HungarianMatcher

DETECTION_LOSSES = ("labels", "boxes")
KNOWN_LOSSES = DETECTION_LOSSES + ("mask_prediction",)


def sigmoid_focal_loss(logits, targets, num_boxes: float, alpha: float = 0.25, gamma: float = 2.0):
    """Focal loss (Lin et al. 2017) summed over queries and classes, divided by num_boxes.

    logits, targets: [B, Q, C] (targets one-hot float). Returns a scalar.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum() / num_boxes


def _average_num_boxes(targets, device) -> float:
    """Target boxes per rank, averaged over all ranks so every rank normalises alike (>= 1)."""
    num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        world_size = dist.get_world_size()
    return torch.clamp(num_boxes / world_size, min=1).item()


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

    @staticmethod
    def _matched_prediction_index(indices):
        batch_index = torch.cat([torch.full_like(pred, b) for b, (pred, _) in enumerate(indices)])
        pred_index = torch.cat([pred for pred, _ in indices])
        return batch_index, pred_index

    def loss_labels(self, outputs, targets, indices, num_boxes):
        """Sigmoid focal loss over all queries and classes; unmatched queries have all-zero targets."""
        logits = outputs["pred_logits"].float()  # losses in fp32 also under autocast
        batch_index, pred_index = self._matched_prediction_index(indices)
        matched_labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(logits.device)
        onehot = torch.zeros_like(logits)
        onehot[batch_index.to(logits.device), pred_index.to(logits.device), matched_labels] = 1
        return {"loss_ce": sigmoid_focal_loss(logits, onehot, num_boxes, alpha=self.focal_alpha, gamma=2.0)}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        """L1 and 1 - GIoU between matched predicted and target boxes (normalised cxcywh)."""
        batch_index, pred_index = self._matched_prediction_index(indices)
        pred_boxes = outputs["pred_boxes"][batch_index, pred_index].float()
        target_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(pred_boxes)
        loss_bbox = F.l1_loss(pred_boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes)))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_mask_prediction(self, outputs):
        """DAM loss: the scoring network's logits [B, S] against the binary top-k DAM target [B, S]."""
        if "backbone_mask_prediction" not in outputs:
            raise KeyError("SetCriterion: loss 'mask_prediction' needs 'backbone_mask_prediction' (model rho > 0)")
        prediction = outputs["backbone_mask_prediction"].float()
        return {"loss_mask_prediction": F.multilabel_soft_margin_loss(prediction, dam_target(outputs))}

    def detection_losses(self, head_outputs, targets, num_boxes, suffix=""):
        """Match one head's predictions to the targets and compute its 'labels' / 'boxes' losses."""
        indices = self.matcher(head_outputs, targets)
        losses = {}
        if "labels" in self.losses:
            losses.update(self.loss_labels(head_outputs, targets, indices, num_boxes))
        if "boxes" in self.losses:
            losses.update(self.loss_boxes(head_outputs, targets, indices, num_boxes))
        return {key + suffix: value for key, value in losses.items()}

    def _check_targets(self, outputs, targets):
        batch = outputs["pred_logits"].shape[0]
        if len(targets) != batch:
            raise ValueError(f"SetCriterion: {len(targets)} targets for a batch of {batch} images")
        labels = torch.cat([t["labels"].reshape(-1).cpu() for t in targets])
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"SetCriterion: target labels must lie in [0, {self.num_classes}), "
                             f"got {int(labels.min())}..{int(labels.max())}")

    def forward(self, outputs: dict, targets: list) -> dict:
        """outputs: the model's output dict (see SparseDETR.forward); targets: B dicts with 'labels', 'boxes'.

        Returns a dict of unweighted scalar losses (keys as in the class docstring).
        """
        self._check_targets(outputs, targets)
        num_boxes = _average_num_boxes(targets, outputs["pred_logits"].device)

        losses = self.detection_losses(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self.detection_losses(aux, targets, num_boxes, f"_{i}"))
        if "enc_outputs" in outputs:
            enc_targets = targets
            if not self.class_specific_enc:
                # the shared proposal head only tells object from background: every object is class 0
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self.detection_losses(outputs["enc_outputs"], enc_targets, num_boxes, "_enc"))
        for i, aux in enumerate(outputs.get("aux_outputs_enc", [])):
            losses.update(self.detection_losses(aux, targets, num_boxes, f"_enc_{i}"))
        if "mask_prediction" in self.losses and "backbone_mask_prediction" in outputs:
            losses.update(self.loss_mask_prediction(outputs))
        return losses


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
