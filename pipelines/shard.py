"""COCO (image folder + instances json) -> WebDataset shards + index.json.

Each sample is `{__key__, jpg, json}`: `__key__` is the zero-padded image id, `jpg` the original
file's bytes unchanged (`png` for PNG files, whatever the file name says), `json` the image record
(id, file_name, width, height) with its annotations (id, category_id, bbox, area, iscrowd). Crowd
regions (iscrowd=1) and images without annotations are kept, as in COCO. Bad input is never kept
silently and never aborts the job: each malformed field of an image record or an annotation is a
skip counted under a reason naming the field (see pipelines/coco_fields.py), `fixed` counts items
kept after a repair, both with a few examples naming the culprit. Only whole-file problems (the
annotation file missing or not COCO-shaped) raise.

Inputs are never touched: an output folder that equals, contains or lies inside the image folder,
or holds the annotation file, is refused before anything is written. Writes are crash-safe: shards
are written into a staging folder inside the output and moved into place only when all of them are
complete and the skip budget holds; only then are the files that an earlier sdo index of that
folder lists (and the new one does not) removed, and `index.json` (which is what the loader reads)
is written last, atomically. Over the budget, the new shards stay in `unpublished-*/` and no
index is published.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tarfile
import uuid
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipelines.coco_fields import check_annotation_fields, check_image, is_int
from pipelines.errors import AnnotationFormatError, DataError, SkipBudgetError
from pipelines.outdir import check_apart_from_inputs, check_out_dir

INDEX_NAME = "index.json"
INDEX_FORMAT = "sdo-wds-coco/1"
SHARD_PATTERN = "shard-{:06d}.tar"
DEFAULT_SHARD_SIZE = 1000
DEFAULT_MAX_SKIP_FRACTION = 0.05
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


def _file_sha256(path: Path) -> hashlib._Hash:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest


def load_coco(annotations_file) -> dict:
    """Read and structurally check a COCO instances file (whole-file problems raise, naming it)."""
    path = Path(annotations_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        with open(path, "rb") as handle:
            coco = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationFormatError(f"annotation file {path} is not valid JSON: {err}") from None
    if not isinstance(coco, dict):
        raise AnnotationFormatError(f"annotation file {path}: top level must be an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise AnnotationFormatError(f"annotation file {path}: '{key}' must be a list")
    ids = set()
    for category in coco["categories"]:
        if not isinstance(category, dict) or not is_int(category.get("id")) or category["id"] < 0:
            raise AnnotationFormatError(f"annotation file {path}: category without a non-negative integer 'id': "
                                        f"{category!r}"[:300])
        if category["id"] in ids:
            raise AnnotationFormatError(f"annotation file {path}: category id {category['id']} appears twice")
        ids.add(category["id"])
    return coco


def _select_images(coco: dict, problems: _Problems) -> list[dict]:
    """Image records with usable fields; later duplicates of an id are dropped."""
    seen, images = set(), []
    for record in coco["images"]:
        clean, reason = check_image(record)
        if clean is None:
            problems.skip(reason, repr(record)[:120])
            continue
        if clean["id"] in seen:
            problems.skip("duplicate_image_id", f"image id {clean['id']} ({clean['file_name']})")
            continue
        seen.add(clean["id"])
        images.append(clean)
    return images


def _culprit(ann: dict) -> str:
    return f"annotation {ann['id']} (image {ann['image_id']})"


def _group_annotations(coco: dict, images: list[dict], problems: _Problems) -> dict[int, list[str]]:
    """Valid annotations per image id, each as compact JSON text (far smaller than dicts in RAM)."""
    sizes = {image["id"]: (image["width"], image["height"]) for image in images}
    known_ids = {record.get("id") for record in coco["images"] if isinstance(record, dict)}
    categories = {category["id"] for category in coco["categories"]}
    by_image, seen = defaultdict(list), set()
    for ann in coco["annotations"]:
        if not isinstance(ann, dict):
            problems.skip("malformed_annotation", repr(ann)[:120])
            continue
        if not is_int(ann.get("id")):
            problems.skip("bad_annotation_id", repr(ann)[:120])
            continue
        if not is_int(ann.get("image_id")):
            problems.skip("bad_annotation_image_id", f"annotation {ann['id']}: image_id {ann.get('image_id')!r}")
            continue
        if ann["id"] in seen:
            problems.skip("duplicate_annotation_id", _culprit(ann))
            continue
        seen.add(ann["id"])
        if ann["image_id"] not in sizes:
            reason = "annotation_of_skipped_image" if ann["image_id"] in known_ids else "annotation_unknown_image"
            problems.skip(reason, _culprit(ann))
            continue
        clean, reason, fixes = check_annotation_fields(ann, categories, *sizes[ann["image_id"]])
        if clean is not None and not fixes:
            by_image[ann["image_id"]].append(json.dumps(clean, sort_keys=True))
            continue
        culprit = _culprit(ann)
        if clean is None:
            field = {"bad_category_id": "category_id", "unknown_category": "category_id", "bad_iscrowd": "iscrowd",
                     "bad_area": "area", "bad_segmentation": "segmentation"}.get(reason, "bbox")
            problems.skip(reason, f"{culprit}: {field} {ann.get(field)!r}"[:200])
            continue
        for fix in fixes:
            problems.fix(fix, f"{culprit}: bbox {ann.get('bbox')!r} -> {clean['bbox']}" if fix == "box_clipped"
                         else culprit)
        by_image[ann["image_id"]].append(json.dumps(clean, sort_keys=True))
    return by_image


_CROWD = '"iscrowd": 1'  # how json.dumps writes a clean crowd annotation


def _sample_json(record: dict, annotation_texts: list[str]) -> bytes:
    """json.dumps(dict(record, annotations=[...]), sort_keys=True), joined from the annotations' own
    texts ("annotations" sorts first) instead of parsing them back."""
    head = json.dumps(record, sort_keys=True)
    return ('{"annotations": [' + ", ".join(annotation_texts) + "], " + head[1:]).encode()


def _read_image(path: Path, record: dict, problems: _Problems):
    """The file's bytes and its extension, or None (counted) if missing, corrupt or of the wrong size.

    The size is that of the stored pixels, EXIF orientation ignored: COCO's boxes refer to them
    (and the official loader, PIL's open + convert, does not rotate either)."""
    culprit = f"image {record['id']} ({path})"
    if not path.is_file():
        problems.skip("missing_image", culprit)
        return None
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            ext = _FORMATS.get(image.format)
            size = image.size
            if ext == "jpg" and image.mode in ("RGB", "L"):  # DCT-domain downscale: checks the whole stream cheaply
                image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
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
    """Writes samples into consecutive shard files in a staging folder, respecting the size limits."""

    def __init__(self, stage: Path, shard_size: int | None, max_bytes: int | None):
        self.stage, self.shard_size, self.max_bytes = stage, shard_size, max_bytes
        self.shards: list[dict] = []
        self.oversized = 0
        self._tar = None

    def _open(self):
        name = SHARD_PATTERN.format(len(self.shards))
        self._tar = tarfile.open(self.stage / name, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed in _close
        self.shards.append({"name": name, "count": 0, "annotations": 0, "member_bytes": 0})

    def _close(self):
        if self._tar is not None:
            self._tar.close()
            shard = self.shards[-1]
            shard["bytes"] = (self.stage / shard["name"]).stat().st_size
            del shard["member_bytes"]
            self._tar = None

    def add(self, key: str, files: dict[str, bytes], num_annotations: int) -> None:
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
        self.shards[-1]["annotations"] += num_annotations
        self.shards[-1]["member_bytes"] += size

    def finish(self) -> list[dict]:
        self._close()
        return self.shards

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def previous_index_files(out: Path) -> set[str]:
    """Names of the files that an earlier sdo index in `out` lists (the only files --overwrite removes).

    Raises FileExistsError when `out` holds an `index.json` that is not an sdo index, or a shard-named
    file that its index does not list: overwriting either would destroy a file sdo did not write.
    """
    if not out.is_dir():
        return set()
    listed: set[str] = set()
    index_path = out / INDEX_NAME
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            ok = isinstance(index, dict) and index.get("format") == INDEX_FORMAT and isinstance(index.get("shards"), list)
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise FileExistsError(f"{index_path} is not an sdo shard index; --overwrite only replaces shards that "
                                  "`sdo data shard` wrote")
        listed = {s["name"] for s in index["shards"] if isinstance(s, dict) and isinstance(s.get("name"), str)
                  and "/" not in s["name"] and s["name"] not in ("", ".", "..")}
        listed.add(INDEX_NAME)
    for path in out.glob("shard-*.tar"):
        if path.name not in listed:
            raise FileExistsError(f"{path} is not listed in an sdo index of {out}; --overwrite only replaces "
                                  "shards that `sdo data shard` wrote")
    return listed


def _publish(out: Path, stage: Path, shards: list[dict], index: dict, old_files: set[str]) -> None:
    """Move the complete shards into place, drop the earlier index's other files, write the index."""
    (out / INDEX_NAME).unlink(missing_ok=True)  # without an index the dir is unreadable, never mixed
    new_names = {shard["name"] for shard in shards}
    for name in sorted(new_names):
        os.replace(stage / name, out / name)
    stage.rmdir()
    for name in sorted(old_files - new_names - {INDEX_NAME}):
        path = out / name
        if path.is_file() or path.is_symlink():
            path.unlink()
    tmp_index = out / f".{INDEX_NAME}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    tmp_index.write_text(json.dumps(index, indent=1))
    os.replace(tmp_index, out / INDEX_NAME)


def skip_summary(skipped: dict, limit: int = 6) -> str:
    """'missing_image 87, annotation_of_skipped_image 500, ...' (largest counts first)."""
    items = sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{reason} {count}" for reason, count in items[:limit])
    return text + (f", ... ({len(items) - limit} more reasons)" if len(items) > limit else "")


def _skip_fraction(num_images: int, kept_images: int, num_annotations: int, kept_annotations: int) -> float:
    """The larger of the skipped shares of image records and of annotations."""
    shares = [(num_images - kept_images) / num_images if num_images else 0.0,
              (num_annotations - kept_annotations) / num_annotations if num_annotations else 0.0]
    return max(shares)


def write_shards(images_dir, annotations_file, out_dir, shard_size: int | None = None,
                 max_bytes: int | None = None, overwrite: bool = False, progress: bool = True,
                 max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION) -> dict:
    """Convert a COCO folder into WebDataset shards under `out_dir`.

    images_dir: folder the records' `file_name`s are relative to; annotations_file: COCO instances
    json; shard_size: samples per shard; max_bytes: upper bound of a shard file's size (a sample
    larger than that gets a shard of its own and is counted as `oversized_samples`). With neither
    limit, shards hold 1000 samples. max_skip_fraction: the largest share of image records or of
    annotations that may be skipped.

    Returns the report that is also written as out_dir/index.json: shards (name, count,
    annotations, bytes), num_samples, num_annotations, num_crowd, categories, max_category_id,
    source (paths, sha256 over the annotation file and every kept image), skipped / fixed counts by
    reason with examples, skip_fraction.

    Raises InputOverlapError when `out_dir` could touch an input, FileExistsError if `out_dir` is
    not empty and `overwrite` is false (or holds files sdo did not write), FileNotFoundError for a
    missing input, AnnotationFormatError for a malformed annotation file, DataError for bad limits
    or when no image is usable: in all these cases nothing is written. SkipBudgetError when more
    than `max_skip_fraction` was skipped: the new shards stay in out_dir/unpublished-*/, everything
    that was in `out_dir` before is untouched.
    """
    for name, value in (("shard_size", shard_size), ("max_bytes", max_bytes)):
        if value is not None and (not is_int(value) or value <= 0):
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(max_skip_fraction, bool) or not isinstance(max_skip_fraction, (int, float)) \
            or not 0.0 <= max_skip_fraction <= 1.0:
        raise DataError(f"max_skip_fraction must be a number in [0, 1], got {max_skip_fraction!r}")
    if shard_size is None and max_bytes is None:
        shard_size = DEFAULT_SHARD_SIZE
    images_root = Path(images_dir)
    if not images_root.is_dir():
        raise FileNotFoundError(f"image directory {images_root} does not exist")
    check_apart_from_inputs(out_dir, images_dir=images_root, annotations_file=annotations_file)
    out = check_out_dir(out_dir, overwrite)
    old_files = previous_index_files(out)
    coco = load_coco(annotations_file)
    num_image_records, num_annotation_records = len(coco["images"]), len(coco["annotations"])
    categories = [{k: c[k] for k in ("id", "name", "supercategory") if k in c} for c in coco["categories"]]

    problems = _Problems()
    images = _select_images(coco, problems)
    annotations = _group_annotations(coco, images, problems)
    del coco  # from here on only the compact records are held, never the parsed file nor many images
    digest = _file_sha256(Path(annotations_file))
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    writer = _ShardWriter(stage, shard_size, max_bytes)
    num_samples = num_annotations = num_crowd = 0
    try:
        for record in tqdm(images, desc=f"shard {out.name}", unit="img", disable=not progress):
            texts = annotations.pop(record["id"], [])
            loaded = _read_image(images_root / record["file_name"], record, problems)
            if loaded is None:
                for text in texts:
                    problems.skip("annotation_of_skipped_image",
                                  f"annotation {json.loads(text)['id']} (image {record['id']})")
                continue
            data, ext = loaded
            key = f"{record['id']:012d}"
            sample_json = _sample_json(record, texts)
            writer.add(key, {ext: data, "json": sample_json}, len(texts))
            digest.update(key.encode())
            digest.update(data)
            num_samples += 1
            num_annotations += len(texts)
            num_crowd += sum(_CROWD in text for text in texts)
        if num_samples == 0:
            raise DataError(f"no usable image in {annotations_file} (skipped: {skip_summary(problems.skipped)})")
        shards = writer.finish()
    except BaseException:
        writer.close()
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            out.rmdir()
        raise
    if writer.oversized:
        problems.fixed["oversized_samples"] += writer.oversized
    fraction = _skip_fraction(num_image_records, num_samples, num_annotation_records, num_annotations)
    index = {
        "format": INDEX_FORMAT,
        "shards": [{"name": s["name"], "count": s["count"], "annotations": s["annotations"], "bytes": s["bytes"]}
                   for s in shards],
        "num_samples": num_samples,
        "num_annotations": num_annotations,
        "num_crowd": num_crowd,
        "categories": categories,
        "max_category_id": max((c["id"] for c in categories), default=None),
        "source": {"images": str(images_root), "annotations": str(annotations_file), "sha256": digest.hexdigest()},
        "skipped": dict(sorted(problems.skipped.items())),
        "fixed": dict(sorted(problems.fixed.items())),
        "examples": {k: v for k, v in sorted(problems.examples.items())},
        "skip_fraction": fraction,
        "max_skip_fraction": float(max_skip_fraction),
    }
    if fraction > max_skip_fraction:
        kept = out / f"unpublished-{stage.name.rsplit('-', 1)[1]}"
        (stage / "report.json").write_text(json.dumps(index, indent=1))
        os.replace(stage, kept)
        raise SkipBudgetError(
            f"skipped {num_image_records - num_samples} of {num_image_records} images and "
            f"{num_annotation_records - num_annotations} of {num_annotation_records} annotations "
            f"({fraction:.1%} > --max-skip-fraction {max_skip_fraction:g}): {skip_summary(problems.skipped)}; "
            f"shards kept in {kept} (report.json there), index.json not published")
    _publish(out, stage, shards, index, old_files)
    return dict(index, out_dir=str(out))
