"""Per-field checks of COCO image records and annotations: every malformed field is a named reason.

The shard writer skips (and counts) an image record or an annotation as soon as one of its fields
is unusable, so that one odd value never aborts a whole job, and never slips into the shards.
Each check returns `(clean value or None, reason or None)`; the reason names the field.
"""
from __future__ import annotations

import math
from pathlib import PurePosixPath


def is_int(value) -> bool:
    """A JSON integer (bool is an int subclass in Python but `true` is no id; json never makes subclasses)."""
    return type(value) is int


def is_number(value) -> bool:
    kind = type(value)
    return kind is int or (kind is float and math.isfinite(value))


def is_safe_relative(file_name: str) -> bool:
    """True when `file_name` stays inside the image folder: relative, no `..`, no NUL or backslash."""
    if not file_name or "\x00" in file_name or "\\" in file_name:
        return False
    path = PurePosixPath(file_name)
    return not path.is_absolute() and ".." not in path.parts and path.parts != ()


def check_image(record) -> tuple[dict | None, str | None]:
    """COCO image record -> ({id, file_name, width, height}, None) or (None, reason)."""
    if not isinstance(record, dict):
        return None, "malformed_image_record"
    if not is_int(record.get("id")):
        return None, "bad_image_id"
    if record["id"] < 0:  # the loader pads evaluation batches with image id -1
        return None, "negative_image_id"
    if not isinstance(record.get("file_name"), str) or not record["file_name"]:
        return None, "bad_file_name"
    if not is_safe_relative(record["file_name"]):
        return None, "unsafe_path"
    width, height = record.get("width"), record.get("height")
    if not (is_int(width) and is_int(height)) or width <= 0 or height <= 0:
        return None, "bad_width_height"
    return {"id": record["id"], "file_name": record["file_name"], "width": width, "height": height}, None


def clean_box(bbox, width: int, height: int) -> tuple[list[float] | None, str | None]:
    """Clip an [x, y, w, h] box to the image. Returns (box or None, reason or None);
    reason `box_clipped` comes with a (repaired) box."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
        return None, "bad_bbox"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None, "degenerate_box"
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x1 <= x0 or y1 <= y0:
        return None, "box_outside_image"
    clipped = [x0, y0, x1 - x0, y1 - y0]
    return clipped, ("box_clipped" if clipped != [x, y, w, h] else None)


def _is_polygon(points) -> bool:
    """A flat list of an even number of finite numbers (one C-speed sum instead of a check per value:
    COCO polygons hold dozens of coordinates, ~10 million over train2017)."""
    if not isinstance(points, list) or len(points) % 2:
        return False
    try:
        return math.isfinite(math.fsum(points))
    except (TypeError, ValueError, OverflowError):  # a non-number, or inf - inf
        return False


def segmentation_ok(segmentation) -> bool:
    """Polygons (list of flat [x0, y0, x1, y1, ...] lists) or RLE ({counts: list | str, size: [h, w]})."""
    if isinstance(segmentation, list):
        return all(_is_polygon(points) for points in segmentation)
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        return (isinstance(segmentation.get("counts"), (list, str)) and isinstance(size, list) and len(size) == 2
                and all(is_int(v) and v >= 0 for v in size))
    return False


def check_annotation_fields(ann: dict, categories: set, width: int, height: int):
    """The fields of one annotation whose ids are already checked.

    Returns (clean {id, category_id, bbox, area, iscrowd} or None, skip reason or None, list of fix
    reasons). COCO's defaults: a missing iscrowd is 0, a missing area is the (clipped) box area.
    """
    if not is_int(ann.get("category_id")):
        return None, "bad_category_id", []
    if ann["category_id"] not in categories:
        return None, "unknown_category", []
    iscrowd = ann.get("iscrowd", 0)
    if not is_int(iscrowd) or iscrowd not in (0, 1):
        return None, "bad_iscrowd", []
    if "segmentation" in ann and not segmentation_ok(ann["segmentation"]):
        return None, "bad_segmentation", []
    box, reason = clean_box(ann.get("bbox"), width, height)
    if box is None:
        return None, reason, []
    fixes = [reason] if reason else []
    area = ann.get("area")
    if area is None:
        area = box[2] * box[3]
        fixes.append("area_missing")
    elif not is_number(area) or area < 0:
        return None, "bad_area", []
    area = float(area)
    if reason == "box_clipped":
        area = min(area, box[2] * box[3])
    return {"id": ann["id"], "category_id": ann["category_id"], "bbox": box, "area": area, "iscrowd": iscrowd}, \
        None, fixes
