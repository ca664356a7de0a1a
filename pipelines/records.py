"""The one parser of a shard sample's `json` member, and COCO ground truth built from parsed records.

The loader decodes every sample through `parse_record`, and evaluation takes its ground truth from
the records the loader really yielded (`records_to_coco`), so that the two can never disagree: a
sample the loader skips is absent from both predictions and ground truth.
"""
from __future__ import annotations

import json

from pipelines.coco_fields import clean_box, is_int, is_number

RECORD_FIELDS = ("id", "file_name", "width", "height")


class RecordError(ValueError):
    """A sample's json is not a usable image record (the message names the field)."""


def _check_annotation(ann, width: int, height: int) -> dict:
    if not isinstance(ann, dict):
        raise RecordError(f"annotation is not an object: {ann!r}"[:200])
    for field in ("id", "category_id"):
        if not is_int(ann.get(field)):
            raise RecordError(f"annotation {ann.get('id')!r}: {field} {ann.get(field)!r} is not an integer")
    iscrowd = ann.get("iscrowd", 0)
    if not is_int(iscrowd) or iscrowd not in (0, 1):
        raise RecordError(f"annotation {ann['id']}: iscrowd {iscrowd!r} is not 0 or 1")
    box, reason = clean_box(ann.get("bbox"), width, height)
    if box is None:
        raise RecordError(f"annotation {ann['id']}: bbox {ann.get('bbox')!r} is unusable ({reason})")
    area = ann.get("area", box[2] * box[3])
    if not is_number(area) or area < 0:
        raise RecordError(f"annotation {ann['id']}: area {area!r} is not a number >= 0")
    return {"id": ann["id"], "category_id": ann["category_id"], "bbox": [float(v) for v in ann["bbox"]],
            "area": float(area), "iscrowd": iscrowd}


def parse_record(raw: bytes | str) -> dict:
    """A sample's json bytes -> {id, file_name, width, height, annotations: [{id, category_id, bbox
    [x, y, w, h], area, iscrowd}]}. Raises RecordError (a ValueError) naming the field for anything malformed."""
    record = json.loads(raw)
    if not isinstance(record, dict):
        raise RecordError("sample json is not an object")
    if not is_int(record.get("id")) or record["id"] < 0:
        raise RecordError(f"image id {record.get('id')!r} is not an integer >= 0")
    width, height = record.get("width"), record.get("height")
    if not (is_int(width) and is_int(height)) or width <= 0 or height <= 0:
        raise RecordError(f"image {record['id']}: width/height {width!r}x{height!r} are not positive integers")
    annotations = record.get("annotations", [])
    if not isinstance(annotations, list):
        raise RecordError(f"image {record['id']}: annotations is not a list")
    return {"id": record["id"], "file_name": str(record.get("file_name", "")), "width": width, "height": height,
            "annotations": [_check_annotation(ann, width, height) for ann in annotations]}


def records_to_coco(records, categories) -> dict:
    """COCO-format ground truth {images, annotations, categories} from parsed records.

    An image id seen twice keeps its first record. Annotations keep iscrowd (COCOeval ignores
    detections matched to crowd regions) and their COCO ids; only when those are not unique and
    positive do all get fresh ids 1..N (pycocotools reads id 0 as "unmatched").
    """
    images, annotations, seen = [], [], set()
    for record in records:
        if record["id"] in seen:
            continue
        seen.add(record["id"])
        images.append({k: record[k] for k in RECORD_FIELDS})
        for ann in record["annotations"]:
            annotations.append(dict(ann, image_id=record["id"]))
    images.sort(key=lambda image: image["id"])
    annotations.sort(key=lambda ann: (ann["image_id"], ann["id"]))
    ids = [ann["id"] for ann in annotations]
    if len(set(ids)) != len(ids) or min(ids, default=1) <= 0:
        for number, ann in enumerate(annotations, start=1):
            ann["id"] = number
    return {"images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}
