"""`sdo bench data`: images/s of the shard loader vs a folder + pycocotools loader vs bare JPEG decode.

All three read the same synthetic JPEGs in the same run, side by side (interleaved repeats, median
reported), with the same number of worker processes:
- bare_decode: worker processes read each local file and decode it to RGB pixels, nothing else
  (the physical limit of this machine's JPEG decoder);
- folder: DETR's data path - a map-style Dataset, one file per image + a pycocotools COCO index,
  shuffled torch DataLoader, the same transforms and (uint8) collate as the shard loader;
- shard: pipelines.loader over WebDataset shards of the same images.
Transform settings: `decode` (decode + uint8 tensor + padded batch, no augmentation: isolates
the data path) and `train` (DETR's full training augmentations).
Storage: `local` (files on this machine's disk, in the page cache) and `http` (the same files
served by an HTTP server on 127.0.0.1: one GET per image for the folder loader, one per shard for
the shard loader - a stand-in for object storage, where every request pays a round trip).
`<loader>_img_per_s` is the steady rate after the first batch; `<loader>_epoch_img_per_s` covers
the whole epoch including worker start-up (both loaders start their workers every epoch).
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import platform
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing import get_context
from pathlib import Path

import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipelines.loader import collate_uint8, decode_image, make_loader
from pipelines.shard import INDEX_NAME, write_shards
from pipelines.synth import generate
from pipelines.transforms import Compose, ToTensor, make_transforms, prepare_target

GOAL_VS_FOLDER = 1.3
GOAL_VS_BARE_DECODE = 0.8
MODES = ("decode", "train")
STORAGES = ("local", "http")


class FolderDataset(Dataset):
    """DETR-style CocoDetection: one file (or URL) per image, annotations from a pycocotools index."""

    def __init__(self, images: str, annotations_file: Path, transforms, seed: int = 0):
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(annotations_file))
        self.ids = sorted(self.coco.getImgIds())
        self.images, self.transforms, self.seed = str(images), transforms, seed

    def __len__(self) -> int:
        return len(self.ids)

    def _read(self, file_name: str) -> bytes:
        if self.images.startswith("http"):
            with urllib.request.urlopen(f"{self.images}/{file_name}") as response:
                return response.read()
        return Path(self.images, file_name).read_bytes()

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        record = self.coco.loadImgs(image_id)[0]
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
        image = decode_image(self._read(record["file_name"]))
        return self.transforms(image, prepare_target(record, annotations), random.Random(f"{self.seed}-{index}"))


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _http_server(root: Path):
    """Serve `root` on 127.0.0.1 (a free port) from a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _decode_files(paths: list[str]) -> int:
    for path in paths:
        with open(path, "rb") as handle:
            decode_image(handle.read())
    return len(paths)


def _bare_decode(pool, paths: list[str], workers: int) -> float:
    chunks = [paths[i::workers * 4] for i in range(workers * 4)]
    start = time.perf_counter()
    done = sum(pool.map(_decode_files, chunks))
    return done / (time.perf_counter() - start)


def _images_per_second(loader) -> tuple[float, float]:
    """(steady images/s after the first batch, images/s of the whole epoch incl. worker start-up)."""
    start, count, first = time.perf_counter(), 0, None
    for images, _, _ in loader:
        count += images.shape[0]
        if first is None:
            first, first_count = time.perf_counter(), count
    end = time.perf_counter()
    return (count - first_count) / (end - first), count / (end - start)


def _transforms(mode: str, scales, max_size: int):
    if mode == "decode":
        return Compose([ToTensor()])
    return make_transforms(True, scales=scales, max_size=max_size, random_crop=True)


def _summary(runs: dict[str, list[float]], cores: int) -> dict:
    medians = {name: statistics.median(values) for name, values in runs.items()}
    return {
        **{f"{name}_img_per_s": round(value, 2) for name, value in medians.items()},
        # every loader (and the bare decode) runs `workers` processes: per core = rate / min(workers, cpus)
        **{f"{name}_img_per_s_per_core": round(value / cores, 2) for name, value in medians.items()},
        "shard_vs_folder": round(medians["shard"] / medians["folder"], 3),
        "shard_vs_bare_decode": round(medians["shard"] / medians["bare_decode"], 3),
        "shard_vs_folder_epoch": round(medians["shard_epoch"] / medians["folder_epoch"], 3),
        "runs_img_per_s": {name: [round(v, 2) for v in values] for name, values in runs.items()},
    }


def run(*, images: int = 192, image_size: int = 640, batch_size: int = 4, workers: int = 2, repeats: int = 3,
        modes=MODES, storages=STORAGES, scales=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
        max_size: int = 1333, progress: bool = True) -> dict:
    """Run the benchmark on a fresh synthetic dataset; returns the JSON-able result dict."""
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = {}
    with tempfile.TemporaryDirectory(prefix="sdo-bench-data-") as tmp, _http_server(Path(tmp)) as base_url:
        root = Path(tmp)
        generate(root / "coco", images, 0, size=image_size, seed=0)
        images_dir, ann = root / "coco" / "train", root / "coco" / "annotations" / "instances_train.json"
        index = write_shards(images_dir, ann, root / "shards", shard_size=max(1, images // 8), progress=False)
        paths = sorted(str(p) for p in images_dir.glob("*.jpg"))
        where = {"local": (str(images_dir), str(root / "shards")),
                 "http": (f"{base_url}/coco/train", f"{base_url}/shards/{INDEX_NAME}")}
        with get_context("fork").Pool(workers) as pool:
            pool.map(_decode_files, [paths[:workers]] * workers)  # start the workers, warm the page cache
            for storage in storages:
                folder_source, shard_source = where[storage]
                for mode in modes:
                    transforms = _transforms(mode, tuple(scales), max_size)
                    runs = {"bare_decode": [], "folder": [], "shard": [], "folder_epoch": [], "shard_epoch": []}
                    for repeat in tqdm(range(repeats), desc=f"bench data ({storage}, {mode})", disable=not progress):
                        runs["bare_decode"].append(_bare_decode(pool, paths, workers))
                        folder = DataLoader(FolderDataset(folder_source, ann, transforms, seed=repeat),
                                            batch_size=batch_size, shuffle=True, drop_last=True,
                                            num_workers=workers, collate_fn=collate_uint8)
                        steady, epoch = _images_per_second(folder)
                        runs["folder"].append(steady)
                        runs["folder_epoch"].append(epoch)
                        shard = make_loader(shard_source, train=True, batch_size=batch_size, num_workers=workers,
                                            seed=repeat, scales=scales, max_size=max_size)
                        shard.transforms = transforms  # identical transforms for both loaders
                        steady, epoch = _images_per_second(shard)
                        runs["shard"].append(steady)
                        runs["shard_epoch"].append(epoch)
                    results.setdefault(storage, {})[mode] = _summary(runs, min(workers, os.cpu_count() or 1))
    return {
        "benchmark": "data",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(),
                    # other processes competing for the CPUs make every figure lower and noisier
                    "load_average_1_5_15min": {"before": load_before,
                                               "after": [round(x, 2) for x in os.getloadavg()]}},
        "config": {"images": images, "image_size": image_size, "shards": len(index["shards"]),
                   "batch_size": batch_size, "workers": workers, "repeats": repeats, "scales": list(scales),
                   "max_size": max_size},
        "results": results,
        "goals": {
            "shard_vs_folder_min": GOAL_VS_FOLDER, "shard_vs_bare_decode_min": GOAL_VS_BARE_DECODE,
            "met": {storage: {mode: {"vs_folder": r["shard_vs_folder"] >= GOAL_VS_FOLDER,
                                     "vs_bare_decode": r["shard_vs_bare_decode"] >= GOAL_VS_BARE_DECODE}
                              for mode, r in by_mode.items()}
                    for storage, by_mode in results.items()},
        },
    }
