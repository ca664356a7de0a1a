"""Synthetic COCO: deterministic per seed, valid COCO that pycocotools loads, exact boxes."""
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipelines.errors import DataError
from pipelines.synth import CATEGORIES, generate, render_image


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    generate(tmp_path / "a", 3, 2, size=64, seed=7)
    generate(tmp_path / "b", 3, 2, size=64, seed=7)
    generate(tmp_path / "c", 3, 2, size=64, seed=8)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 3 + 2 + 2
    assert a == b
    assert a["train/000000000001.jpg"] != c["train/000000000001.jpg"]


def test_pycocotools_loads_it_and_boxes_are_exact(coco_root):
    for split, count in (("train", 16), ("val", 10)):
        coco = COCO(str(coco_root / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == count
        assert sorted(coco.getCatIds()) == [c["id"] for c in CATEGORIES]
        assert all(0 < c < 91 for c in coco.getCatIds())
        assert len(coco.getAnnIds()) >= count
        for image in coco.loadImgs(coco.getImgIds()):
            with Image.open(coco_root / split / image["file_name"]) as pil:
                assert pil.format == "JPEG" and pil.size == (image["width"], image["height"])
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
                x, y, w, h = ann["bbox"]
                assert ann["iscrowd"] == 0
                assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
                assert 0 < ann["area"] <= w * h


def test_boxes_are_tight_around_the_drawn_shape():
    """The topmost shape is fully visible: the pixels of its (solid) colour span exactly its box."""
    for index in range(6):
        image, objects = render_image(seed=1, split="train", index=index, size=128)
        pixels = np.asarray(image).reshape(-1, 3)
        _, (x, y, w, h), area = objects[-1]
        colours, counts = np.unique(np.asarray(image)[int(y):int(y + h), int(x):int(x + w)].reshape(-1, 3),
                                    axis=0, return_counts=True)
        colour = colours[counts.argmax()]
        mask = np.all(pixels == colour, axis=1).reshape(image.height, image.width)
        rows, cols = np.nonzero(mask)
        assert [cols.min(), rows.min(), cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min()] == [x, y, w, h]
        assert mask.sum() == area
    sizes = {render_image(seed=1, split="train", index=i, size=128)[0].size for i in range(12)}
    assert len(sizes) > 1  # varied aspect ratios exercise padding


def test_refuses_non_empty_dir_and_overwrites_on_request(tmp_path):
    generate(tmp_path / "d", 2, 1, size=64)
    with pytest.raises(FileExistsError, match=str(tmp_path / "d")):
        generate(tmp_path / "d", 3, 1, size=64)
    assert len(json.loads((tmp_path / "d/annotations/instances_train.json").read_text())["images"]) == 2
    generate(tmp_path / "d", 3, 1, size=64, overwrite=True)
    assert len(json.loads((tmp_path / "d/annotations/instances_train.json").read_text())["images"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no staging leftovers


def test_bad_arguments_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="num_train"):
        generate(tmp_path / "e", -1, 1)
    with pytest.raises(DataError, match="size"):
        generate(tmp_path / "e", 1, 1, size=8)


def test_shape_knobs_bound_count_and_size(tmp_path):
    generate(tmp_path / "k", 12, 0, size=96, max_shapes=1, scale=(0.4, 0.5))
    coco = json.loads((tmp_path / "k/annotations/instances_train.json").read_text())
    per_image = {}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    assert sorted(per_image.values()) == [1] * 12
    shorter = {i["id"]: min(i["width"], i["height"]) for i in coco["images"]}
    # the tight box of a shape drawn in a box of width 0.4-0.5 x the shorter side (+1 px of rasterisation)
    assert all(0.4 * shorter[a["image_id"]] - 1 <= a["bbox"][2] <= 0.5 * shorter[a["image_id"]] + 2
               for a in coco["annotations"])
    with pytest.raises(DataError, match="max_shapes"):
        generate(tmp_path / "e", 1, 1, max_shapes=0)
    with pytest.raises(DataError, match="scale"):
        generate(tmp_path / "e", 1, 1, scale=(0.5, 0.4))
