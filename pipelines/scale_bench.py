"""Sharding at COCO scale: a synthesized train2017-sized annotation file (118,287 images, ~7.3 boxes
and a polygon each, crowd regions, images without annotations) over tiny JPEGs, sharded in a child
process whose peak RSS and images/s are measured. A benchmark, not a test:

    python -m pipelines.scale_bench --work /tmp/coco-scale [--images 118287] [--json]

Every image file is a hard link to one of a few tiny JPEGs (no disk or page-cache cost that real
COCO would not have too), so the figures are the writer's own: parsing and checking the json,
reading, verifying and tarring each image, hashing. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

COCO_TRAIN_IMAGES = 118_287
BOXES_PER_IMAGE = 7.3  # 860,001 annotations / 118,287 images in instances_train2017.json
SIZES = ((32, 24), (24, 32), (32, 32))


def _tiny_jpegs(folder: Path) -> dict[tuple[int, int], Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for width, height in SIZES:
        path = folder / f"tiny_{width}x{height}.jpg"
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (90, 140, 200)).save(buffer, format="JPEG", quality=90)
        path.write_bytes(buffer.getvalue())
        out[(width, height)] = path
    return out


def synthesize(work: Path, num_images: int, seed: int = 0) -> tuple[Path, Path]:
    """work/images/*.jpg (hard links) + work/instances.json shaped like COCO train2017."""
    rng = random.Random(seed)
    images_dir = work / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    sources = _tiny_jpegs(work / "sources")
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = SIZES[image_id % len(SIZES)]
        name = f"{image_id:012d}.jpg"
        target = images_dir / name
        if not target.exists():
            try:
                os.link(sources[(width, height)], target)
            except OSError:
                target.write_bytes(sources[(width, height)].read_bytes())
        images.append({"id": image_id, "file_name": name, "width": width, "height": height, "license": 1,
                       "coco_url": f"http://images.cocodataset.org/train2017/{name}", "date_captured": "2013-11-14"})
        count = 0 if image_id % 100 == 0 else max(0, round(rng.gauss(BOXES_PER_IMAGE, 3)))  # ~1% without
        for _ in range(count):
            x, y = rng.uniform(0, width - 4), rng.uniform(0, height - 4)
            w, h = rng.uniform(2, width - x), rng.uniform(2, height - y)
            polygon = [round(v, 2) for v in (x, y, x + w, y, x + w, y + h, x, y + h)]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": rng.randint(1, 90),
                                "bbox": [round(v, 2) for v in (x, y, w, h)], "area": round(w * h, 2),
                                "iscrowd": int(rng.random() < 0.01), "segmentation": [polygon]})
    categories = [{"id": i, "name": f"class{i}", "supercategory": "thing"} for i in range(1, 91)]
    ann_file = work / "instances.json"
    ann_file.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations,
                                    "categories": categories}))
    return images_dir, ann_file


def _shard_child(images_dir: str, ann_file: str, out: str) -> None:
    """Runs in a fresh interpreter so that ru_maxrss is sharding's peak alone."""
    from pipelines.shard import write_shards

    started = time.perf_counter()
    report = write_shards(images_dir, ann_file, out, overwrite=True, progress=False)
    elapsed = time.perf_counter() - started
    print(json.dumps({"seconds": elapsed, "num_samples": report["num_samples"],
                      "num_annotations": report["num_annotations"], "num_crowd": report["num_crowd"],
                      "shards": len(report["shards"]), "skipped": report["skipped"],
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(work: Path, num_images: int) -> dict:
    started = time.perf_counter()
    images_dir, ann_file = synthesize(work, num_images)
    synth_seconds = time.perf_counter() - started
    out = work / "shards"
    code = ("import sys; from pipelines.scale_bench import _shard_child; "
            "_shard_child(sys.argv[1], sys.argv[2], sys.argv[3])")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code, str(images_dir), str(ann_file), str(out)],
                            capture_output=True, text=True, check=True, env=env)
    child = json.loads(result.stdout.strip().splitlines()[-1])
    shard_bytes = sum(p.stat().st_size for p in out.glob("shard-*.tar"))
    return {"images": num_images, "annotation_file_mib": ann_file.stat().st_size / 2**20,
            "synthesize_seconds": synth_seconds, **child, "images_per_s": child["num_samples"] / child["seconds"],
            "shard_mib": shard_bytes / 2**20}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path, help="scratch folder (images, json, shards)")
    parser.add_argument("--images", type=int, default=COCO_TRAIN_IMAGES, help="images in the synthesized file")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.work, args.images), indent=1))


if __name__ == "__main__":
    main()
