"""COCO box evaluation with pycocotools, over predictions gathered from any number of ranks."""
from __future__ import annotations

import builtins
import contextlib
import io
import logging
import warnings

import numpy as np
import webdataset as wds
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipelines.errors import DataError
from pipelines.loader import CorruptSampleWarning
from pipelines.records import parse_record, records_to_coco
from pipelines.sources import resolve_shards

log = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _warn_and_continue(exn) -> bool:
    warnings.warn(f"skipping unreadable shard data: {exn!r}", CorruptSampleWarning, stacklevel=2)
    return True


def ground_truth(source) -> dict:
    """COCO-format dict {images, annotations, categories} read from the shards' json members.

    `source` is anything `make_loader` accepts; image bytes are not loaded. Each json member goes
    through the loader's parser (`pipelines.records.parse_record`); one it rejects is skipped with
    a CorruptSampleWarning, as the loader skips it. During training, ground truth comes from the
    val loader itself (`ShardLoader.ground_truth()`), which also drops samples whose image is
    unreadable. An image id seen twice keeps its first record.
    """
    shard_set = resolve_shards(source)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([shard.url for shard in shard_set.shards]),
        wds.tarfile_to_samples(handler=_warn_and_continue, select_files=lambda name: name.endswith(".json")))
    records = []
    for sample in pipeline:
        try:
            records.append(parse_record(sample["json"]))
        except (KeyError, ValueError) as err:
            _warn_and_continue(ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')}: {err}"))
    return records_to_coco(records, shard_set.index["categories"])


def to_coco_predictions(results, image_ids) -> list[dict]:
    """PostProcess output -> COCO detections.

    results: list (one per image) of {'scores' [K], 'labels' [K], 'boxes' [K, 4] absolute xyxy in the
    original image}; image_ids: the matching ids. Padding entries (negative ids) are dropped.
    Returns [{image_id, category_id, bbox [x, y, w, h], score}].
    """
    results, image_ids = list(results), [int(i) for i in image_ids]
    if len(results) != len(image_ids):
        raise DataError(f"{len(results)} results for {len(image_ids)} image ids")
    predictions = []
    for result, image_id in zip(results, image_ids):
        if image_id < 0:
            continue
        boxes = np.asarray(result["boxes"].detach().cpu() if hasattr(result["boxes"], "detach") else result["boxes"],
                           dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(result["scores"].detach().cpu() if hasattr(result["scores"], "detach") else result["scores"],
                            dtype=np.float64).reshape(-1)
        labels = np.asarray(result["labels"].detach().cpu() if hasattr(result["labels"], "detach") else result["labels"]
                            ).reshape(-1)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        for box, score, label in zip(xywh.tolist(), scores.tolist(), labels.tolist()):
            predictions.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)})
    return predictions


def merge_predictions(predictions) -> list[dict]:
    """One flat prediction list from per-rank lists (or a flat list).

    All predictions of an image come from one rank: for an image id that several ranks report, the
    first rank's predictions are kept. In a flat list, exact duplicates are dropped.
    """
    predictions = list(predictions)
    if predictions and all(isinstance(p, (list, tuple)) for p in predictions):
        merged, owner = [], {}
        for rank, rank_predictions in enumerate(predictions):
            for p in rank_predictions:
                if owner.setdefault(p["image_id"], rank) == rank:
                    merged.append(p)
        return merged
    merged, seen = [], set()
    for p in predictions:
        key = (p["image_id"], p["category_id"], tuple(p["bbox"]), p["score"])
        if key not in seen:
            seen.add(key)
            merged.append(p)
    return merged


@contextlib.contextmanager
def _pycocotools_prints(buffer: io.StringIO):
    """Capture what pycocotools prints into ``buffer``.

    pycocotools reports through print(). Hosts such as Ray Train replace builtins.print with a
    logger call, which a stdout redirect alone does not catch, so print itself is routed too.
    """
    saved = builtins.print

    def to_buffer(*objects, sep=" ", end="\n", file=None, flush=False):
        buffer.write(sep.join(map(str, objects)) + end)

    builtins.print = to_buffer
    try:
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        builtins.print = saved


def _coco_from_dict(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with _pycocotools_prints(io.StringIO()):
        coco.createIndex()
    return coco


def evaluate(predictions, gt) -> dict:
    """The 12 COCO box metrics of `predictions` against `gt`.

    predictions: flat list of COCO detections or a list of per-rank lists (merged, see
    merge_predictions); gt: COCO-format dict (e.g. `ground_truth(val_shards)`) or a pycocotools COCO.
    Predictions of image ids absent from gt are dropped (logged). With no predictions every
    metric is what COCOeval gives for an empty detection set. pycocotools' prints go to the log.
    Returns {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl} as floats.
    """
    coco_gt = gt if isinstance(gt, COCO) else _coco_from_dict(gt)
    predictions = merge_predictions(predictions)
    known = set(coco_gt.getImgIds())
    kept = [p for p in predictions if p["image_id"] in known]
    if len(kept) != len(predictions):
        log.warning("dropped %d predictions of image ids not in the ground truth", len(predictions) - len(kept))
    detections = []
    for i, p in enumerate(kept):
        x, y, w, h = (float(v) for v in p["bbox"])
        detections.append({"id": i + 1, "image_id": p["image_id"], "category_id": int(p["category_id"]),
                           "bbox": [x, y, w, h], "area": w * h, "score": float(p["score"]), "iscrowd": 0})
    coco_dt = _coco_from_dict({"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                               "annotations": detections})
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    with _pycocotools_prints(io.StringIO()) as printed:
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("pycocotools:\n%s", printed.getvalue())
    return {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats)}
