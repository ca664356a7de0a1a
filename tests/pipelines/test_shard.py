"""COCO -> shards: bit-equal round trip, every bad input counted, crash-safe writes."""
import json
import shutil
import tarfile

import pytest

import pipelines.shard as shard_module
from pipelines.errors import AnnotationFormatError, DataError
from pipelines.shard import INDEX_NAME, write_shards


def _read_tars(out):
    """{key: {ext: bytes}} over every shard listed in index.json, and the index."""
    index = json.loads((out / INDEX_NAME).read_text())
    samples = {}
    for entry in index["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            members = [m for m in tar.getmembers()]
            assert len({m.name.split(".")[0] for m in members}) == entry["count"]
            for member in members:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples, index


def test_round_trip_is_bit_equal(coco_root, train_shards):
    samples, index = _read_tars(train_shards)
    coco = json.loads((coco_root / "annotations" / "instances_train.json").read_text())
    assert index["num_samples"] == len(coco["images"]) == len(samples) == 16
    assert index["num_annotations"] == len(coco["annotations"])
    assert [s["count"] for s in index["shards"]] == [2] * 8
    assert index["categories"] == coco["categories"]
    assert index["skipped"] == {} and index["fixed"] == {}
    for image in coco["images"]:
        sample = samples[f"{image['id']:012d}"]
        assert sample["jpg"] == (coco_root / "train" / image["file_name"]).read_bytes()
        record = json.loads(sample["json"])
        assert {k: record[k] for k in ("id", "file_name", "width", "height")} == image
        expected = [{k: a[k] for k in ("id", "category_id", "bbox", "area", "iscrowd")}
                    for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert record["annotations"] == expected


def test_same_input_same_hash_and_bytes(coco_root, train_shards, tmp_path):
    report = write_shards(coco_root / "train", coco_root / "annotations" / "instances_train.json", tmp_path / "again",
                          shard_size=2, progress=False)
    first = json.loads((train_shards / INDEX_NAME).read_text())
    assert report["source"]["sha256"] == first["source"]["sha256"]
    assert (tmp_path / "again" / "shard-000003.tar").read_bytes() == (train_shards / "shard-000003.tar").read_bytes()


@pytest.fixture()
def broken_coco(coco_root, tmp_path):
    """A COCO folder with one instance of every bad input the shard writer must count."""
    images_dir = tmp_path / "images"
    shutil.copytree(coco_root / "val", images_dir)
    coco = json.loads((coco_root / "annotations" / "instances_val.json").read_text())
    images = coco["images"]
    (images_dir / images[1]["file_name"]).unlink()  # missing_image
    jpg = (images_dir / images[2]["file_name"]).read_bytes()
    (images_dir / images[2]["file_name"]).write_bytes(jpg[: len(jpg) // 2])  # corrupt_image (truncated)
    images[3]["width"] += 5  # size_mismatch
    coco["images"].append(dict(images[0], file_name="dup.jpg"))  # duplicate_image_id
    coco["images"].append({"id": 999, "file_name": 7})  # bad_file_name
    size = (images[0]["width"], images[0]["height"])
    next_id = max(a["id"] for a in coco["annotations"]) + 1
    extra = [
        {"image_id": images[0]["id"], "category_id": 1, "bbox": [5, 5, 0, 10]},  # degenerate_box
        {"image_id": images[0]["id"], "category_id": 1, "bbox": [5, 5, -3, 10]},  # degenerate_box
        {"image_id": images[0]["id"], "category_id": 1, "bbox": [size[0] + 1, 2, 10, 10]},  # box_outside_image
        {"image_id": images[0]["id"], "category_id": 1, "bbox": [size[0] - 10, 2, 30, 10]},  # box_clipped (kept)
        {"image_id": images[0]["id"], "category_id": 77, "bbox": [1, 1, 10, 10]},  # unknown_category
        {"image_id": 123456, "category_id": 1, "bbox": [1, 1, 10, 10]},  # annotation_unknown_image
        {"image_id": images[0]["id"], "category_id": 1, "bbox": [1, 1, 10]},  # bad_bbox
    ]
    for ann in extra:
        coco["annotations"].append(dict(ann, id=next_id, area=50.0, iscrowd=0))
        next_id += 1
    coco["annotations"].append(dict(coco["annotations"][0]))  # duplicate_annotation_id
    lost = sum(1 for a in coco["annotations"][:-len(extra) - 1] if a["image_id"] in {i["id"] for i in images[1:4]})
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(coco))
    return images_dir, ann_file, lost, size


def test_every_bad_input_is_counted(broken_coco, tmp_path):
    images_dir, ann_file, lost, size = broken_coco
    report = write_shards(images_dir, ann_file, tmp_path / "out", shard_size=3, progress=False, max_skip_fraction=1)
    assert report["skipped"] == {
        "missing_image": 1, "corrupt_image": 1, "size_mismatch": 1, "duplicate_image_id": 1,
        "bad_file_name": 1, "degenerate_box": 2, "box_outside_image": 1, "unknown_category": 1,
        "annotation_unknown_image": 1, "bad_bbox": 1, "duplicate_annotation_id": 1,
        "annotation_of_skipped_image": lost,
    }
    assert report["fixed"] == {"box_clipped": 1}
    assert report["num_samples"] == 10 - 3
    assert all(report["examples"][reason] for reason in report["skipped"])
    samples, _ = _read_tars(tmp_path / "out")
    assert len(samples) == 7
    clipped = [a for s in samples.values() for a in json.loads(s["json"])["annotations"] if a["bbox"][0] == size[0] - 10]
    assert clipped and clipped[0]["bbox"] == [size[0] - 10, 2.0, 10.0, 10.0]
    categories = {a["category_id"] for s in samples.values() for a in json.loads(s["json"])["annotations"]}
    assert 77 not in categories


def test_max_bytes_bounds_every_shard(coco_root, tmp_path):
    report = write_shards(coco_root / "val", coco_root / "annotations" / "instances_val.json", tmp_path / "o",
                          max_bytes=20480, progress=False)
    assert len(report["shards"]) > 1
    assert sum(s["count"] for s in report["shards"]) == 10
    for entry in report["shards"]:
        assert (tmp_path / "o" / entry["name"]).stat().st_size == entry["bytes"] <= 20480


def test_refuses_non_empty_out_dir(coco_root, train_shards):
    with pytest.raises(FileExistsError, match=str(train_shards)):
        write_shards(coco_root / "train", coco_root / "annotations" / "instances_train.json", train_shards,
                     progress=False)


def test_bad_annotation_files_raise_and_touch_nothing(coco_root, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        write_shards(coco_root / "val", tmp_path / "nope.json", out, progress=False)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AnnotationFormatError, match="bad.json"):
        write_shards(coco_root / "val", tmp_path / "bad.json", out, progress=False)
    (tmp_path / "nolist.json").write_text(json.dumps({"images": [], "annotations": {}, "categories": []}))
    with pytest.raises(AnnotationFormatError, match="'annotations'"):
        write_shards(coco_root / "val", tmp_path / "nolist.json", out, progress=False)
    with pytest.raises(DataError, match="shard_size"):
        write_shards(coco_root / "val", coco_root / "annotations" / "instances_val.json", out, shard_size=0)
    assert not out.exists()


def test_overwrite_keeps_old_shards_until_new_ones_are_complete(coco_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    ann = coco_root / "annotations" / "instances_val.json"
    write_shards(coco_root / "val", ann, out, shard_size=4, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # nothing usable: refused before any old file is touched
    (tmp_path / "empty.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DataError, match="no usable image"):
        write_shards(coco_root / "val", tmp_path / "empty.json", out, shard_size=2, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # a crash in the middle of writing: old shards intact, no temporary file left behind
    calls = {"n": 0}
    real_read = shard_module._read_image

    def crash_on_fifth(path, record, problems):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real_read(path, record, problems)

    monkeypatch.setattr(shard_module, "_read_image", crash_on_fifth)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shards(coco_root / "val", ann, out, shard_size=2, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()

    report = write_shards(coco_root / "val", ann, out, shard_size=2, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX_NAME] + [s["name"] for s in report["shards"]])
    assert len(report["shards"]) == 5
