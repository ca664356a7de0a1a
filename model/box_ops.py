"""Box format conversions and (generalised) IoU between sets of boxes.

Pairwise functions take sets [..., N, 4] and [..., M, 4] with the same leading (batch) dimensions
and return [..., N, M]; `*_aligned` functions compare box i of one set with box i of the other.
"""
import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    centre, half = boxes[..., :2], 0.5 * boxes[..., 2:]
    return torch.cat([centre - half, centre + half], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [...]."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _check_ordered(boxes: Tensor, name: str) -> None:
    if not (boxes[..., 2:] >= boxes[..., :2]).all():
        raise ValueError(f"generalized_box_iou: {name} has boxes with x1 < x0 or y1 < y0")


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of [..., N, 4] and [..., M, 4] xyxy boxes -> (iou [..., N, M], union [..., N, M])."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, check: bool = True) -> Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of [..., N, 4] and [..., M, 4] xyxy boxes -> [..., N, M].

    Degenerate boxes (x1 < x0) would give inf / nan, so `check` rejects them early. The check reads
    the result on the host (a device sync on a GPU): callers whose boxes are ordered by construction
    (converted from cxcywh with non-negative sizes) pass check=False.
    """
    if check:
        _check_ordered(boxes1, "boxes1")
        _check_ordered(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.max(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def generalized_box_iou_aligned(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU of box i of boxes1 [..., 4] with box i of boxes2 [..., 4] (xyxy, ordered) -> [...].

    The diagonal of `generalized_box_iou`, with the same arithmetic, without the N x M matrix."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    wh = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    wh = (torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return inter / union - (enclosing - union) / enclosing
