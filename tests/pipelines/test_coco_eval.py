"""COCO evaluation: ground truth from shards, prediction conversion, merge across ranks, known values."""
import json

import pytest
import torch

from pipelines.coco_eval import (
    METRIC_NAMES,
    evaluate,
    ground_truth,
    merge_predictions,
    to_coco_predictions,
)


def _gt_two_boxes():
    """Two 100x100 images, one 60x60 (medium-size) box each."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in (1, 2)]
    annotations = [{"id": i, "image_id": i, "category_id": 3, "bbox": [20.0, 20.0, 60.0, 60.0], "area": 3600.0,
                    "iscrowd": 0} for i in (1, 2)]
    return {"images": images, "annotations": annotations, "categories": [{"id": 3, "name": "triangle"}]}


def test_ground_truth_from_shards_matches_the_annotation_file(coco_root, val_shards):
    gt = ground_truth(val_shards)
    coco = json.loads((coco_root / "annotations" / "instances_val.json").read_text())
    assert gt["images"] == coco["images"]
    assert gt["categories"] == coco["categories"]
    key = lambda a: a["id"]
    assert sorted(gt["annotations"], key=key) == sorted(coco["annotations"], key=key)


def test_ground_truth_as_predictions_gives_ap_1(val_shards):
    gt = ground_truth(val_shards)
    predictions = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
                   for a in gt["annotations"]]
    metrics = evaluate(predictions, gt)
    assert set(metrics) == set(METRIC_NAMES)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AR100"] == pytest.approx(1.0)


def test_known_value_on_a_perturbed_case():
    """Image 1 exact (score .9), image 2 shifted to IoU 0.6 < 0.65 (score .8).

    IoU thresholds .50/.55/.60 match both (AP 1); the other 7 match only the first, so precision is
    1 up to recall .5 and 0 after: 51 of COCO's 101 recall points -> AP = (3 + 7 * 51/101) / 10.
    """
    gt = _gt_two_boxes()
    shift = 60 * (1 - 0.62) / (1 + 0.62)  # a 60-px box shifted by s along x has IoU (60 - s) / (60 + s)
    predictions = [{"image_id": 1, "category_id": 3, "bbox": [20, 20, 60, 60], "score": 0.9},
                   {"image_id": 2, "category_id": 3, "bbox": [20 + shift, 20, 60, 60], "score": 0.8}]
    metrics = evaluate(predictions, gt)
    assert metrics["AP"] == pytest.approx((3 + 7 * 51 / 101) / 10)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(51 / 101)
    assert metrics["APm"] == pytest.approx(metrics["AP"]) and metrics["APs"] == metrics["APl"] == -1.0  # 3600 px²: medium
    assert metrics["AR1"] == pytest.approx((3 * 1.0 + 7 * 0.5) / 10)


def test_no_predictions_and_a_wrong_class():
    gt = _gt_two_boxes()
    assert evaluate([], gt)["AP"] == 0.0
    wrong = [{"image_id": 1, "category_id": 3, "bbox": [20, 20, 60, 60], "score": 0.9},
             {"image_id": 2, "category_id": 1, "bbox": [20, 20, 60, 60], "score": 0.95}]
    assert evaluate(wrong, gt)["AP50"] == pytest.approx(51 / 101)


def test_merge_across_ranks_keeps_one_rank_per_image():
    gt = _gt_two_boxes()
    good = [{"image_id": i, "category_id": 3, "bbox": [20, 20, 60, 60], "score": 0.9} for i in (1, 2)]
    bad_copy_of_image_2 = [{"image_id": 2, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.99}]
    per_rank = [good, bad_copy_of_image_2]
    assert merge_predictions(per_rank) == good
    assert evaluate(per_rank, gt)["AP"] == pytest.approx(1.0)
    assert merge_predictions(good + good) == good
    unknown_image = good + [{"image_id": 42, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 1.0}]
    assert evaluate(unknown_image, gt)["AP"] == pytest.approx(1.0)


def test_to_coco_predictions_converts_xyxy_and_drops_padding():
    results = [{"scores": torch.tensor([0.5, 0.25]), "labels": torch.tensor([3, 5]),
                "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 1.0, 2.0]])},
               {"scores": torch.tensor([0.9]), "labels": torch.tensor([1]), "boxes": torch.tensor([[1.0, 1, 2, 2]])}]
    predictions = to_coco_predictions(results, [7, -1])
    assert predictions == [{"image_id": 7, "category_id": 3, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.5},
                           {"image_id": 7, "category_id": 5, "bbox": [0.0, 0.0, 1.0, 2.0], "score": 0.25}]
