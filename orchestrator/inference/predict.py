"""`sdo predict`: detections on image files, written as a COCO-format json and as pictures.

Images are preprocessed exactly as the validation shards are (same decoder, the val resize of the
model's config, ImageNet normalisation, zero padding of a batch), and post-processed by the same
PostProcess, so on the val images the detections are the ones `sdo eval` scores. Folders are
streamed: files are listed first (names only), then read, predicted and forgotten batch by batch.
A file that cannot be decoded as an image is skipped and counted, never fatal.
"""
from __future__ import annotations

import json
import logging
import os
import random
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DETECTIONS_FILE = "detections.json"
PICTURES_DIR = "pictures"


@dataclass
class PredictReport:
    out_dir: str
    images: int = 0
    detections: int = 0
    skipped: int = 0
    skipped_files: list = field(default_factory=list)


def list_images(inputs: Iterable[str]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in the named folders."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                files.extend(Path(root) / n for n in sorted(names) if n.lower().endswith(IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{item}: no such image file or folder")
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}")
    return files


def class_names(cfg, classes_source: str | None = None) -> dict[int, str]:
    """Category id -> name from a shard directory / index (``classes_source``), else from the shards the
    weights were trained on (``data.val_shards`` of their config); ``{}`` when neither can be read."""
    from pipelines.sources import resolve_shards

    for source in ([classes_source] if classes_source else []) + [cfg.data.val_shards, cfg.data.train_shards]:
        try:
            categories = resolve_shards(source).index.get("categories", [])
        except (OSError, ValueError):
            if source == classes_source:
                raise
            continue
        return {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    return {}


def _load_image(path: Path, transforms):
    """-> (uint8 [3, h, w] resized, (orig_h, orig_w)), or None for a file that is not a readable image."""
    from pipelines.loader import decode_image

    try:
        image = decode_image(path.read_bytes())
    except Exception as err:  # noqa: BLE001 - any undecodable file is skipped and counted, never fatal
        warnings.warn(f"skipping {path}: not a readable image ({type(err).__name__}: {err})", stacklevel=2)
        return None
    empty = {"boxes": torch.zeros(0, 4), "area": torch.zeros(0)}
    pixels, _ = transforms(image, empty, random.Random(0))
    return pixels, (image.height, image.width)


def _batches(files: list[Path], transforms, batch_size: int, report: PredictReport) -> Iterator[list]:
    batch = []
    for path in files:
        loaded = _load_image(path, transforms)
        if loaded is None:
            report.skipped += 1
            report.skipped_files.append(str(path))
            continue
        batch.append((path, *loaded))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def _detect(model, postprocess, batch, device):
    from pipelines.loader import collate_uint8
    from pipelines.transforms import normalize_batch

    images, mask, _ = collate_uint8([(pixels, {}) for _, pixels, _ in batch])
    mask = mask.to(device)
    outputs = model(normalize_batch(images.to(device), mask), mask)
    sizes = torch.tensor([size for _, _, size in batch], dtype=torch.int64, device=device)
    return [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in r.items()}
            for r in postprocess(outputs, sizes)]


def predict(model, cfg, inputs: Iterable[str], out_dir: str | os.PathLike, *, names: dict[int, str],
            score_threshold: float = 0.3, batch_size: int = 1, device: str = "cpu", pictures: bool = True,
            progress: bool = True, compile: bool | None = None, fast: bool = True) -> PredictReport:
    """Detect objects in ``inputs`` (files and folders) with ``model`` (a SparseDETR in eval mode built from
    ``cfg``); write ``out_dir/detections.json`` (COCO format: images, annotations with scores, categories)
    and ``out_dir/pictures/<name>.jpg`` (boxes, class names, scores) -> PredictReport. ``compile``:
    `orchestrator.train.evaluation.inference_module` (None = when the files are enough to pay for it); ``fast``:
    on a GPU, bf16 on batches padded to multiples of 32 px, with CUDA graphs when compiled (same function)."""
    from tqdm import tqdm

    from model.postprocess import PostProcess
    from orchestrator.inference.pictures import draw_detections
    from orchestrator.train.evaluation import inference_module
    from pipelines.transforms import make_transforms

    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be >= 1")
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"--score-threshold {score_threshold}: must be in [0, 1]")
    files = list_images(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if pictures:
        (out / PICTURES_DIR).mkdir(exist_ok=True)
    transforms = make_transforms(train=False, max_size=cfg.data.max_size, val_scale=cfg.data.val_scale)
    postprocess = PostProcess(cfg.eval.max_dets)
    model = model.to(device).eval()
    forward = inference_module(model, compile=compile, images=len(files), fast=fast)
    report = PredictReport(out_dir=str(out))
    images, annotations, used_names = [], [], set()
    with tqdm(total=len(files), desc="predict", unit="img", disable=not progress) as bar:
        for batch in _batches(files, transforms, batch_size, report):
            for (path, _, (height, width)), result in zip(batch, _detect(forward, postprocess, batch, device)):
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": str(path), "height": height, "width": width})
                keep = result["scores"] >= score_threshold
                kept = {k: v[keep] for k, v in result.items()}
                for box, score, label in zip(kept["boxes"].tolist(), kept["scores"].tolist(), kept["labels"].tolist()):
                    x0, y0, x1, y1 = box
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                        "score": float(score), "iscrowd": 0})
                if pictures:
                    draw_detections(path, kept, names, out / PICTURES_DIR / _picture_name(path, used_names))
            bar.update(len(batch))
            bar.set_postfix(skipped=report.skipped)
        bar.update(len(files) - bar.n)
    report.images, report.detections = len(images), len(annotations)
    categories = [{"id": i, "name": names.get(i, f"class {i}")} for i in range(cfg.model.num_classes)
                  if i in names or not names]
    (out / DETECTIONS_FILE).write_text(json.dumps({"images": images, "annotations": annotations,
                                                   "categories": categories, "info": {"skipped": report.skipped_files}}))
    return report


def _picture_name(path: Path, used: set) -> str:
    """<stem>.jpg, made unique when two folders hold the same file name."""
    name, n = f"{path.stem}.jpg", 1
    while name in used:
        name, n = f"{path.stem}_{n}.jpg", n + 1
    used.add(name)
    return name
