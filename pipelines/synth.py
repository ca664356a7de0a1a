"""Synthetic COCO: coloured shapes on textured backgrounds, with exact boxes.

The embedded default dataset of the demo and the tests. Every image is generated from its own
seed (dataset seed, split, index), so a dataset is bit-identical for a seed and any image can be
regenerated alone. Boxes and areas are measured on the rasterised shape mask, so they are exact
to the pixel. Shapes are large (15-45% of the shorter side) and overlap little, which keeps the
task learnable by a small model in a few hundred steps.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipelines.errors import DataError
from pipelines.outdir import check_out_dir, staging_dir, swap_in

# COCO-style category ids (1-based, < 91 so they fit the model's 91-way classifier).
CATEGORIES = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "diamond", "supercategory": "shape"},
    {"id": 5, "name": "cross", "supercategory": "shape"},
]
SPLITS = {"train": 0, "val": 1}
JPEG_QUALITY = 95
MAX_SHAPES = 4
SHAPE_SCALE = (0.15, 0.45)  # shape width as a fraction of the shorter image side
MAX_PAIR_IOU = 0.25
# Width/height ratios: some images are not square so that batch padding is exercised.
ASPECTS = ((1.0, 1.0), (1.0, 0.75), (0.75, 1.0))


def _box_iou(a, b) -> float:
    """IoU of two [x0, y0, x1, y1] boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Muted texture: a colour gradient, low-frequency stripes and pixel noise. [H, W, 3] uint8."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(70, 170, size=3)
    tilt = rng.uniform(-40, 40, size=(2, 3))
    image = base + tilt[0] * (xx[..., None] / width) + tilt[1] * (yy[..., None] / height)
    freq = rng.uniform(0.02, 0.12)
    angle = rng.uniform(0, np.pi)
    stripes = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))[..., None]
    image = image + rng.uniform(5, 20) * stripes + rng.normal(0, 8, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated colour (stands out against the muted background)."""
    channels = rng.permutation([rng.uniform(200, 255), rng.uniform(0, 60), rng.uniform(0, 255)])
    return tuple(int(c) for c in channels)


def _draw_shape(draw: ImageDraw.ImageDraw, category_id: int, box, rng: np.random.Generator) -> None:
    """Rasterise one shape of `category_id` inside `box` = [x0, y0, x1, y1] (fill value 255)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if category_id == 1:
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif category_id == 2:
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif category_id == 3:
        apex = x0 + rng.uniform(0.2, 0.8) * w
        if rng.random() < 0.5:
            points = [(x0, y1), (x1, y1), (apex, y0)]
        else:
            points = [(x0, y0), (x1, y0), (apex, y1)]
        draw.polygon(points, fill=255)
    elif category_id == 4:
        cx, cy = x0 + w / 2, y0 + h / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif category_id == 5:
        tx, ty = w / 3, h / 3
        draw.rectangle([x0 + tx, y0, x1 - tx, y1], fill=255)
        draw.rectangle([x0, y0 + ty, x1, y1 - ty], fill=255)
    else:
        raise DataError(f"unknown synthetic category id {category_id}")


def render_image(seed: int, split: str, index: int, size: int, *, max_shapes: int = MAX_SHAPES,
                 scale: tuple[float, float] = SHAPE_SCALE):
    """One synthetic image and its objects: 1..``max_shapes`` shapes whose width is a uniform fraction
    in ``scale`` of the shorter side.

    Returns (PIL RGB image, list of (category_id, [x, y, w, h], area)); boxes are the tight
    pixel extents of each drawn shape's mask, area its pixel count.
    """
    rng = np.random.default_rng([seed, SPLITS[split], index])
    aspect = ASPECTS[rng.integers(len(ASPECTS))]
    width, height = round(size * aspect[0]), round(size * aspect[1])
    canvas = Image.fromarray(_background(rng, width, height))
    short = min(width, height)
    placed, objects = [], []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        for _attempt in range(30):
            bw = rng.uniform(*scale) * short
            bh = bw * rng.uniform(0.6, 1.6)
            bh = min(bh, 0.6 * short)
            x0 = rng.uniform(0, width - bw - 1)
            y0 = rng.uniform(0, height - bh - 1)
            box = [x0, y0, x0 + bw, y0 + bh]
            if all(_box_iou(box, other) <= MAX_PAIR_IOU for other in placed):
                break
        else:
            continue
        category_id = int(rng.integers(1, len(CATEGORIES) + 1))
        mask = Image.new("L", (width, height), 0)
        _draw_shape(ImageDraw.Draw(mask), category_id, box, rng)
        bbox = mask.getbbox()
        if bbox is None:
            continue
        area = int(np.count_nonzero(np.asarray(mask)))
        canvas.paste(_shape_colour(rng), (0, 0, width, height), mask)
        placed.append(box)
        ex0, ey0, ex1, ey1 = bbox
        objects.append((category_id, [float(ex0), float(ey0), float(ex1 - ex0), float(ey1 - ey0)], float(area)))
    return canvas, objects


def _write_split(root: Path, split: str, count: int, size: int, seed: int, **shapes) -> dict:
    """Write root/split/*.jpg and return the split's COCO dict (``shapes``: render_image's knobs)."""
    image_dir = root / split
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        image, objects = render_image(seed, split, index, size, **shapes)
        image_id = index + 1
        file_name = f"{image_id:012d}.jpg"
        image.save(image_dir / file_name, format="JPEG", quality=JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for category_id, bbox, area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": bbox, "area": area, "iscrowd": 0})
    return {"info": {"description": f"sdo synthetic shapes ({split}, seed {seed})"},
            "images": images, "annotations": annotations, "categories": CATEGORIES}


def generate(out_dir, num_train: int, num_val: int, size: int = 256, seed: int = 0,
             overwrite: bool = False, max_shapes: int = MAX_SHAPES,
             scale: tuple[float, float] = SHAPE_SCALE) -> dict:
    """Write a synthetic COCO dataset.

    Layout: out_dir/train/*.jpg, out_dir/val/*.jpg, out_dir/annotations/instances_{train,val}.json.
    The dataset is built in a staging directory next to `out_dir` and moved into place when
    complete, so an interrupted run never leaves a partial dataset under `out_dir`.

    `max_shapes` and `scale` (shape width as a fraction of the shorter side, low <= high) set how
    many and how large the shapes are; the defaults draw the same bytes as before these knobs existed.

    Raises FileExistsError if `out_dir` is not empty and `overwrite` is false; DataError for
    invalid sizes, counts or shape knobs. Returns a summary dict (paths, image and annotation counts).
    """
    for name, value, low in (("num_train", num_train, 0), ("num_val", num_val, 0), ("size", size, 32)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
    if num_train + num_val == 0:
        raise DataError("num_train + num_val must be > 0")
    if not isinstance(max_shapes, int) or isinstance(max_shapes, bool) or max_shapes < 1:
        raise DataError(f"max_shapes must be an integer >= 1, got {max_shapes!r}")
    low, high = (float(v) for v in scale)
    if not 0.02 <= low <= high <= 0.9:
        raise DataError(f"scale must be (low, high) with 0.02 <= low <= high <= 0.9, got {tuple(scale)!r}")
    out = check_out_dir(out_dir, overwrite)
    stage = staging_dir(out)
    try:
        (stage / "annotations").mkdir()
        summary = {"out_dir": str(out), "size": size, "seed": seed, "max_shapes": max_shapes,
                   "scale": [low, high], "splits": {}}
        for split, count in (("train", num_train), ("val", num_val)):
            coco = _write_split(stage, split, count, size, seed, max_shapes=max_shapes, scale=(low, high))
            ann_file = stage / "annotations" / f"instances_{split}.json"
            ann_file.write_text(json.dumps(coco))
            summary["splits"][split] = {
                "images": len(coco["images"]), "annotations": len(coco["annotations"]),
                "image_dir": str(out / split), "annotation_file": str(out / "annotations" / ann_file.name)}
        swap_in(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    summary["categories"] = [c["name"] for c in CATEGORIES]
    return summary
