"""Real-COCO quirks, made synthetic: grayscale, CMYK, PNG-in-.jpg, EXIF-rotated JPEGs, images without
annotations and iscrowd=1 regions. Boxes, sizes, colours and COCO eval must come out as the official
code has them (crowd kept in shards, excluded from matching, passed to COCOeval as crowd)."""
import json

import pytest
import torch
from PIL import Image

from pipelines.coco_eval import evaluate, ground_truth
from pipelines.loader import make_loader
from pipelines.shard import write_shards
from pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_batch

COLOUR = (200, 40, 40)
GRAY = (120, 120, 120)
EXIF_ORIENTATION = 0x0112


def _save(path, size, mode, colour, fmt="JPEG", exif_orientation=None):
    image = Image.new("RGB", size, colour)
    if mode != "RGB":
        image = image.convert(mode)
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = exif_orientation
        kwargs["exif"] = exif
    image.save(path, format=fmt, **kwargs)


@pytest.fixture(scope="module")
def quirks(tmp_path_factory):
    """COCO folder: 1 rgb, 2 grayscale, 3 cmyk, 4 png bytes behind .jpg, 5 no annotations,
    6 EXIF orientation 6 (stored 64x40: COCO's size and boxes are those of the stored pixels),
    7 a crowd region beside a normal box."""
    root = tmp_path_factory.mktemp("quirks")
    images = root / "images"
    images.mkdir()
    specs = {1: ((64, 48), "RGB", COLOUR, "JPEG", None), 2: ((48, 64), "L", GRAY, "JPEG", None),
             3: ((56, 40), "CMYK", COLOUR, "JPEG", None), 4: ((40, 40), "RGB", COLOUR, "PNG", None),
             5: ((64, 64), "RGB", COLOUR, "JPEG", None), 6: ((64, 40), "RGB", COLOUR, "JPEG", 6),
             7: ((64, 64), "RGB", COLOUR, "JPEG", None)}
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 7, "name": "crowd"}]}
    for image_id, (size, mode, colour, fmt, orientation) in specs.items():
        name = f"{image_id:012d}.jpg"
        _save(images / name, size, mode, colour, fmt, orientation)
        coco["images"].append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
        if image_id == 5:
            continue
        coco["annotations"].append({"id": 10 * image_id, "image_id": image_id, "category_id": 1, "area": 120.0,
                                    "bbox": [4.0, 6.0, 12.0, 10.0], "iscrowd": 0})
    coco["annotations"].append({"id": 71, "image_id": 7, "category_id": 1, "bbox": [30.0, 30.0, 20.0, 20.0],
                                "area": 300.0, "iscrowd": 1, "segmentation": {"counts": [900, 400], "size": [64, 64]}})
    (root / "instances.json").write_text(json.dumps(coco))
    shards = root / "shards"
    report = write_shards(images, root / "instances.json", shards, shard_size=3, progress=False)
    return {"root": root, "coco": coco, "shards": shards, "report": report, "specs": specs}


def test_every_quirk_is_kept_by_the_shard_writer(quirks):
    report = quirks["report"]
    assert report["skipped"] == {} and report["fixed"] == {}
    assert report["num_samples"] == 7 and report["num_annotations"] == 7 and report["num_crowd"] == 1
    with Image.open(quirks["root"] / "images" / "000000000006.jpg") as image:
        assert image.getexif()[EXIF_ORIENTATION] == 6 and image.size == (64, 40)
    with Image.open(quirks["root"] / "images" / "000000000003.jpg") as image:
        assert image.mode == "CMYK"


def _pixels(images, mask, b):
    """Mean RGB (0..255) of the valid region of batch item b."""
    h, w = (~mask[b]).nonzero().max(0).values.tolist()
    region = normalize_batch(images, mask)[b, :, : h + 1, : w + 1]
    rgb = region * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return (rgb.mean(dim=(1, 2)) * 255).tolist(), (h + 1, w + 1)


def test_loader_sizes_colours_and_boxes(quirks):
    loader = make_loader(quirks["shards"], train=False, batch_size=7, val_scale=80, max_size=200)
    [(images, mask, targets)] = list(loader)
    by_id = {t["image_id"]: (b, t) for b, t in enumerate(targets)}
    assert sorted(by_id) == list(range(1, 8))
    for image_id, ((width, height), mode, colour, _, _) in quirks["specs"].items():
        b, target = by_id[image_id]
        assert target["orig_size"].tolist() == [height, width]  # stored pixels: EXIF orientation not applied
        mean, (h, w) = _pixels(images, mask, b)
        assert (h, w) == tuple(target["size"].tolist())
        assert abs(h / w - height / width) < 0.05
        expected = GRAY if mode == "L" else colour
        assert max(abs(m - e) for m, e in zip(mean, expected)) < 12, (image_id, mean)
        if image_id == 5:
            assert target["boxes"].shape == (0, 4)
            continue
        # crowd regions are not matching targets (ConvertCocoPolysToMask drops them): one box each
        assert target["labels"].tolist() == [1] and target["iscrowd"].tolist() == [0]
        cx, cy, bw, bh = target["boxes"][0].tolist()
        assert (cx, cy, bw, bh) == pytest.approx([10 / width, 11 / height, 12 / width, 10 / height], abs=1e-5)


def test_ground_truth_keeps_crowd_for_cocoeval(quirks):
    loader = make_loader(quirks["shards"], train=False, batch_size=2, val_scale=64)
    list(loader)
    gt = loader.ground_truth()
    assert gt == ground_truth(quirks["shards"])
    assert [a["iscrowd"] for a in gt["annotations"] if a["image_id"] == 7] == [0, 1]
    assert [i["id"] for i in gt["images"]] == list(range(1, 8))  # the image without annotations is there
    normal = [a for a in gt["annotations"] if not a["iscrowd"]]
    predictions = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
                   for a in normal]
    # a confident detection on the crowd region is ignored, neither a hit nor a false positive:
    # AP is 1 only if the region reaches COCOeval as crowd (dropped: a false positive; as a plain
    # box: a missed object without this detection)
    crowd_hit = {"image_id": 7, "category_id": 1, "bbox": [30.0, 30.0, 20.0, 20.0], "score": 0.95}
    assert evaluate(predictions + [crowd_hit], gt)["AP"] == pytest.approx(1.0)
    assert evaluate(predictions, gt)["AP"] == pytest.approx(1.0)
    as_plain = dict(gt, annotations=[dict(a, iscrowd=0) for a in gt["annotations"]])
    assert evaluate(predictions, as_plain)["AP"] < 1.0
    dropped = dict(gt, annotations=normal)
    assert evaluate(predictions + [crowd_hit], dropped)["AP"] < 1.0
