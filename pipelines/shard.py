"""COCO (image folder + instances json) -> WebDataset shards + index.json.

Each sample is `{__key__, jpg, json}`: `__key__` is the zero-padded image id, `jpg` the original
file's bytes unchanged (`png` for PNG files), `json` the image record (id, file_name, width,
height) with its annotations (id, category_id, bbox, area, iscrowd). Bad input is never kept
silently and never crashes the run: each problem is counted under a reason in the report
(`skipped` = dropped, `fixed` = kept after a repair) with a few examples naming the culprit.

Writes are crash-safe: shards are written under temporary names and renamed when all of them are
complete; only then are old shards of an overwritten directory removed, and `index.json` (which is
what the loader reads) is written last, atomically.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipelines.errors import AnnotationFormatError, DataError
from pipelines.outdir import check_out_dir

INDEX_NAME = "index.json"
INDEX_FORMAT = "sdo-wds-coco/1"
SHARD_PATTERN = "shard-{:06d}.tar"
DEFAULT_SHARD_SIZE = 1000
TMP_SUFFIX = ".tmp"
MAX_EXAMPLES = 5
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads the archive to a multiple of this
_FORMATS = {"JPEG": "jpg", "PNG": "png"}
ANNOTATION_FIELDS = ("id", "category_id", "bbox", "area", "iscrowd")


class _Problems:
    """Counts of skipped / fixed items by reason, with the first few culprits of each."""

    def __init__(self):
        self.skipped, self.fixed = Counter(), Counter()
        self.examples = defaultdict(list)

    def skip(self, reason: str, culprit: str) -> None:
        self.skipped[reason] += 1
        self._example(reason, culprit)

    def fix(self, reason: str, culprit: str) -> None:
        self.fixed[reason] += 1
        self._example(reason, culprit)

    def _example(self, reason, culprit):
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append(culprit)


def load_coco(annotations_file) -> tuple[dict, bytes]:
    """Read and structurally check a COCO instances file. Returns (dict, raw bytes)."""
    path = Path(annotations_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    raw = path.read_bytes()
    try:
        coco = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationFormatError(f"annotation file {path} is not valid JSON: {err}") from None
    if not isinstance(coco, dict):
        raise AnnotationFormatError(f"annotation file {path}: top level must be an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise AnnotationFormatError(f"annotation file {path}: '{key}' must be a list")
    for category in coco["categories"]:
        if not isinstance(category, dict) or not isinstance(category.get("id"), int):
            raise AnnotationFormatError(f"annotation file {path}: category without integer 'id': {category!r}")
    return coco, raw


def _clean_box(bbox, width: int, height: int):
    """Clip an [x, y, w, h] box to the image. Returns (box or None, reason or None)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None, "malformed_annotation"
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None, "malformed_annotation"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None, "malformed_annotation"
    if w <= 0 or h <= 0:
        return None, "degenerate_box"
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x1 <= x0 or y1 <= y0:
        return None, "box_outside_image"
    clipped = [x0, y0, x1 - x0, y1 - y0]
    return clipped, ("box_clipped" if clipped != [x, y, w, h] else None)


def _select_images(coco: dict, problems: _Problems) -> list[dict]:
    """Image records with the fields the shards need; later duplicates of an id are dropped."""
    seen, images = set(), []
    for record in coco["images"]:
        if not isinstance(record, dict) or not isinstance(record.get("id"), int) \
                or not isinstance(record.get("file_name"), str) \
                or not isinstance(record.get("width"), int) or not isinstance(record.get("height"), int) \
                or record["width"] <= 0 or record["height"] <= 0:
            problems.skip("malformed_image_record", repr(record)[:120])
            continue
        if record["id"] in seen:
            problems.skip("duplicate_image_id", f"image id {record['id']} ({record['file_name']})")
            continue
        seen.add(record["id"])
        images.append({k: record[k] for k in ("id", "file_name", "width", "height")})
    return images


def _group_annotations(coco: dict, images: list[dict], problems: _Problems) -> dict[int, list[dict]]:
    """Valid annotations per image id (boxes clipped to the image, COCO fields kept)."""
    sizes = {image["id"]: (image["width"], image["height"]) for image in images}
    known_ids = {record.get("id") for record in coco["images"] if isinstance(record, dict)}
    categories = {category["id"] for category in coco["categories"]}
    by_image, seen = defaultdict(list), set()
    for ann in coco["annotations"]:
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), int) or not isinstance(ann.get("image_id"), int):
            problems.skip("malformed_annotation", repr(ann)[:120])
            continue
        culprit = f"annotation {ann['id']} (image {ann['image_id']})"
        if ann["id"] in seen:
            problems.skip("duplicate_annotation_id", culprit)
            continue
        seen.add(ann["id"])
        if ann["image_id"] not in sizes:
            reason = "annotation_of_skipped_image" if ann["image_id"] in known_ids else "annotation_unknown_image"
            problems.skip(reason, culprit)
            continue
        if ann.get("category_id") not in categories:
            problems.skip("unknown_category", f"{culprit}: category_id {ann.get('category_id')!r}")
            continue
        box, reason = _clean_box(ann.get("bbox"), *sizes[ann["image_id"]])
        if box is None:
            problems.skip(reason, f"{culprit}: bbox {ann.get('bbox')!r}")
            continue
        area = ann.get("area")
        area = float(area) if isinstance(area, (int, float)) and area > 0 else box[2] * box[3]
        if reason == "box_clipped":
            problems.fix(reason, f"{culprit}: bbox {ann.get('bbox')!r} -> {box}")
            area = min(area, box[2] * box[3])
        by_image[ann["image_id"]].append({"id": ann["id"], "category_id": ann["category_id"], "bbox": box,
                                          "area": area, "iscrowd": int(ann.get("iscrowd", 0) or 0)})
    return by_image


def _read_image(path: Path, record: dict, problems: _Problems):
    """The file's bytes and its extension, or None (counted) if missing, corrupt or of the wrong size."""
    culprit = f"image {record['id']} ({path})"
    if not path.is_file():
        problems.skip("missing_image", culprit)
        return None
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            ext = _FORMATS.get(image.format)
            size = image.size
            if ext == "jpg":  # DCT-domain downscale: checks the whole stream at a fraction of the cost
                image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
    except Exception:  # noqa: BLE001 - PIL raises many types for broken files
        problems.skip("corrupt_image", culprit)
        return None
    if ext is None:
        problems.skip("unsupported_image_format", culprit)
        return None
    if size != (record["width"], record["height"]):
        problems.skip("size_mismatch", f"{culprit}: file is {size[0]}x{size[1]}, "
                                       f"record says {record['width']}x{record['height']}")
        return None
    return data, ext


def _member_bytes(size: int) -> int:
    return _TAR_BLOCK + math.ceil(size / _TAR_BLOCK) * _TAR_BLOCK


def _archive_bytes(members_bytes: int) -> int:
    """Size of a tar file whose members take `members_bytes` (end blocks + record padding)."""
    return math.ceil((members_bytes + 2 * _TAR_BLOCK) / _TAR_RECORD) * _TAR_RECORD


class _ShardWriter:
    """Writes samples into consecutive temporary shard files, respecting the size limits."""

    def __init__(self, out: Path, shard_size: int | None, max_bytes: int | None):
        self.out, self.shard_size, self.max_bytes = out, shard_size, max_bytes
        self.shards: list[dict] = []
        self.oversized = 0
        self._tar = None

    def _open(self):
        name = SHARD_PATTERN.format(len(self.shards))
        self._tmp = self.out / f".{name}{TMP_SUFFIX}"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed in _close
        self.shards.append({"name": name, "count": 0, "member_bytes": 0})

    def _close(self):
        if self._tar is not None:
            self._tar.close()
            shard = self.shards[-1]
            shard["bytes"] = self._tmp.stat().st_size
            shard["tmp"] = self._tmp
            del shard["member_bytes"]
            self._tar = None

    def add(self, key: str, files: dict[str, bytes]) -> None:
        size = sum(_member_bytes(len(data)) for data in files.values())
        if self._tar is not None:
            shard = self.shards[-1]
            full = self.shard_size is not None and shard["count"] >= self.shard_size
            too_big = self.max_bytes is not None and _archive_bytes(shard["member_bytes"] + size) > self.max_bytes
            if full or too_big:
                self._close()
        if self._tar is None:
            self._open()
            if self.max_bytes is not None and _archive_bytes(size) > self.max_bytes:
                self.oversized += 1
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self.shards[-1]["count"] += 1
        self.shards[-1]["member_bytes"] += size

    def finish(self) -> list[dict]:
        self._close()
        return self.shards

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
        for shard in self.shards:
            Path(shard.get("tmp", self.out / f".{shard['name']}{TMP_SUFFIX}")).unlink(missing_ok=True)


def _publish(out: Path, shards: list[dict], index: dict) -> None:
    """Rename complete temporary shards to their final names, drop stale files, write the index."""
    (out / INDEX_NAME).unlink(missing_ok=True)  # without an index the dir is unreadable, never mixed
    keep = {INDEX_NAME}
    for shard in shards:
        os.replace(shard.pop("tmp"), out / shard["name"])
        keep.add(shard["name"])
    for path in out.iterdir():
        if path.name not in keep and path.is_file():
            path.unlink()
    tmp_index = out / f".{INDEX_NAME}{TMP_SUFFIX}"
    tmp_index.write_text(json.dumps(index, indent=1))
    os.replace(tmp_index, out / INDEX_NAME)


def write_shards(images_dir, annotations_file, out_dir, shard_size: int | None = None,
                 max_bytes: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert a COCO folder into WebDataset shards under `out_dir`.

    images_dir: folder the records' `file_name`s are relative to; annotations_file: COCO instances
    json; shard_size: samples per shard; max_bytes: upper bound of a shard file's size (a sample
    larger than that gets a shard of its own and is counted as `oversized_samples`). With neither
    limit, shards hold 1000 samples.

    Returns the report that is also written as out_dir/index.json: shards (name, count, bytes),
    num_samples, num_annotations, categories, source (paths, sha256 over the annotation file and
    every kept image), skipped / fixed counts by reason with examples.

    Raises FileExistsError if `out_dir` is not empty and `overwrite` is false, FileNotFoundError
    for a missing input, AnnotationFormatError for a malformed annotation file, DataError for bad
    limits or when no image is usable. In all these cases `out_dir` is left untouched.
    """
    for name, value in (("shard_size", shard_size), ("max_bytes", max_bytes)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    if shard_size is None and max_bytes is None:
        shard_size = DEFAULT_SHARD_SIZE
    images_root = Path(images_dir)
    if not images_root.is_dir():
        raise FileNotFoundError(f"image directory {images_root} does not exist")
    out = check_out_dir(out_dir, overwrite)
    coco, raw = load_coco(annotations_file)

    problems = _Problems()
    images = _select_images(coco, problems)
    annotations = _group_annotations(coco, images, problems)
    digest = hashlib.sha256(raw)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, shard_size, max_bytes)
    num_samples = num_annotations = 0
    try:
        for record in tqdm(images, desc=f"shard {out.name}", unit="img", disable=not progress):
            loaded = _read_image(images_root / record["file_name"], record, problems)
            if loaded is None:
                for ann in annotations.get(record["id"], []):
                    problems.skip("annotation_of_skipped_image", f"annotation {ann['id']} (image {record['id']})")
                continue
            data, ext = loaded
            key = f"{record['id']:012d}"
            sample_json = dict(record, annotations=annotations.get(record["id"], []))
            writer.add(key, {ext: data, "json": json.dumps(sample_json, sort_keys=True).encode()})
            digest.update(key.encode())
            digest.update(data)
            num_samples += 1
            num_annotations += len(sample_json["annotations"])
        if num_samples == 0:
            raise DataError(f"no usable image in {annotations_file} (skipped: {dict(problems.skipped)})")
        shards = writer.finish()
    except BaseException:
        writer.abort()
        raise
    if writer.oversized:
        problems.fixed["oversized_samples"] += writer.oversized
    index = {
        "format": INDEX_FORMAT,
        "shards": [{"name": s["name"], "count": s["count"], "bytes": s["bytes"]} for s in shards],
        "num_samples": num_samples,
        "num_annotations": num_annotations,
        "categories": [{k: c[k] for k in ("id", "name", "supercategory") if k in c} for c in coco["categories"]],
        "source": {"images": str(images_root), "annotations": str(annotations_file), "sha256": digest.hexdigest()},
        "skipped": dict(sorted(problems.skipped.items())),
        "fixed": dict(sorted(problems.fixed.items())),
        "examples": {k: v for k, v in sorted(problems.examples.items())},
    }
    _publish(out, shards, index)
    return dict(index, out_dir=str(out))
