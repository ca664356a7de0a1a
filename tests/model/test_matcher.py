import itertools

import pytest
import torch

from model.box_ops import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
)
from model.matcher import HungarianMatcher


def random_boxes(n, generator):
    centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], dim=1)


def test_box_conversions_round_trip():
    boxes = random_boxes(7, torch.Generator().manual_seed(0))
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes, atol=1e-6)


def test_iou_and_giou_on_known_boxes():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    iou, _ = box_iou(a, b)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 0.0, 1.0]]))
    giou = generalized_box_iou(a, b)
    # enclosing boxes: 3x3 = 9 (union 7); 5x2 = 10 (union 5); identical boxes
    assert torch.allclose(giou, torch.tensor([[1 / 7 - 2 / 9, 0.0 - 5 / 10, 1.0]]))


def test_giou_rejects_degenerate_boxes():
    with pytest.raises(ValueError, match="boxes1"):
        generalized_box_iou(torch.tensor([[1.0, 1.0, 0.0, 2.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


def direct_cost(logits, boxes, labels, tgt_boxes, alpha=0.25, gamma=2.0):
    """Matching cost written element by element."""
    cost = torch.zeros(len(logits), len(labels))
    for q in range(len(logits)):
        for t in range(len(labels)):
            p = torch.sigmoid(logits[q, labels[t]])
            pos = alpha * (1 - p) ** gamma * -torch.log(p + 1e-8)
            neg = (1 - alpha) * p ** gamma * -torch.log(1 - p + 1e-8)
            l1 = (boxes[q] - tgt_boxes[t]).abs().sum()
            giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes[q:q + 1]), box_cxcywh_to_xyxy(tgt_boxes[t:t + 1]))[0, 0]
            cost[q, t] = 2 * (pos - neg) + 5 * l1 - 2 * giou
    return cost


@pytest.mark.parametrize("seed,num_queries,num_targets", [(0, 4, 3), (1, 5, 5), (2, 6, 2), (3, 3, 1)])
def test_matcher_equals_brute_force(seed, num_queries, num_targets):
    g = torch.Generator().manual_seed(seed)
    num_classes = 4
    logits = torch.randn(2, num_queries, num_classes, generator=g) * 2
    boxes = torch.stack([random_boxes(num_queries, g), random_boxes(num_queries, g)])
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": random_boxes(n, g)}
               for n in (num_targets, max(1, num_targets - 1))]
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    indices = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)

    for b, (pred_idx, tgt_idx) in enumerate(indices):
        cost = direct_cost(logits[b], boxes[b], targets[b]["labels"], targets[b]["boxes"])
        assert torch.allclose(matcher.cost_matrix(logits[b], boxes[b], targets[b]["labels"], targets[b]["boxes"]),
                              cost, atol=1e-5)
        n = len(targets[b]["labels"])
        best = min(sum(cost[q, t] for t, q in enumerate(perm))
                   for perm in itertools.permutations(range(num_queries), n))
        assert len(pred_idx) == len(tgt_idx) == n
        assert sorted(tgt_idx.tolist()) == list(range(n))
        assert float(cost[pred_idx, tgt_idx].sum()) == pytest.approx(float(best), abs=1e-5)


def test_matcher_handles_image_without_objects():
    matcher = HungarianMatcher()
    outputs = {"pred_logits": torch.randn(1, 3, 2), "pred_boxes": random_boxes(3, torch.Generator().manual_seed(0))[None]}
    [(pred_idx, tgt_idx)] = matcher(outputs, [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}])
    assert pred_idx.numel() == 0 and tgt_idx.numel() == 0


def test_matcher_rejects_all_zero_costs():
    with pytest.raises(ValueError, match="cost_class"):
        HungarianMatcher(0, 0, 0)
