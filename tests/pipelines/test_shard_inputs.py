"""`sdo data shard` never touches its inputs, skips bad fields one by one, and keeps to a skip budget."""
import json
import math
import shutil
import tarfile

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from pipelines.errors import InputOverlapError, SkipBudgetError
from pipelines.shard import INDEX_NAME, write_shards


def _snapshot(root):
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def coco(coco_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    return root


def _shard_cli(images, annotations, out, *extra):
    return CliRunner().invoke(main, ["data", "shard", "--images", str(images), "--annotations", str(annotations),
                                     "--out", str(out), "--no-progress", *extra])


@pytest.mark.parametrize("case", ["out_is_images", "out_inside_images", "out_contains_images",
                                  "out_holds_annotations", "out_is_symlink_to_images"])
def test_overlapping_out_is_refused_and_every_input_byte_is_kept(coco, case):
    images, annotations = coco / "train", coco / "annotations" / "instances_train.json"
    out = {"out_is_images": images, "out_inside_images": images / "shards",
           "out_contains_images": coco, "out_holds_annotations": coco / "annotations",
           "out_is_symlink_to_images": coco.parent / "link"}[case]
    if case == "out_is_symlink_to_images":
        out.symlink_to(images, target_is_directory=True)
    before = _snapshot(coco)
    result = _shard_cli(images, annotations, out, "--overwrite")
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and line.startswith("sdo: error: --out") and "outside the inputs" in line
    assert _snapshot(coco) == before
    assert sorted(p.name for p in coco.rglob("*") if p.name.startswith((".staging", "unpublished"))) == []
    with pytest.raises(InputOverlapError):
        write_shards(images, annotations, out, overwrite=True, progress=False)
    assert _snapshot(coco) == before


def test_overwrite_removes_only_what_the_earlier_index_lists(coco, tmp_path):
    images, annotations = coco / "val", coco / "annotations" / "instances_val.json"
    out = tmp_path / "out"
    write_shards(images, annotations, out, shard_size=2, progress=False)  # 5 shards
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "shard-000007.tar").write_bytes(b"also mine")
    report = write_shards(images, annotations, out, shard_size=4, overwrite=True, progress=False)  # 3 shards
    assert [s["name"] for s in report["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [INDEX_NAME, "notes.txt", "sub"] + [s["name"] for s in report["shards"]])
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "shard-000007.tar").read_bytes() == b"also mine"


def test_overwrite_refuses_files_sdo_did_not_write(coco, tmp_path):
    images, annotations = coco / "val", coco / "annotations" / "instances_val.json"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard-000000.tar").write_bytes(b"a user's own tar")
    (foreign / "photo.jpg").write_bytes(b"jpeg")
    before = _snapshot(foreign)
    result = _shard_cli(images, annotations, foreign, "--overwrite")
    assert result.exit_code == 2 and "not listed in an sdo index" in result.output
    assert _snapshot(foreign) == before
    (foreign / "shard-000000.tar").unlink()
    (foreign / INDEX_NAME).write_text('{"some": "other tool"}')
    before = _snapshot(foreign)
    result = _shard_cli(images, annotations, foreign, "--overwrite")
    assert result.exit_code == 2 and "is not an sdo shard index" in result.output
    assert _snapshot(foreign) == before
    (foreign / INDEX_NAME).unlink()
    result = _shard_cli(images, annotations, foreign, "--overwrite")  # nothing of ours to replace: files stay
    assert result.exit_code == 0, result.output
    assert (foreign / "photo.jpg").read_bytes() == b"jpeg"


def _bad_fields_coco(coco):
    """The val annotation file plus one record per malformed field, and the expected skip counts."""
    data = json.loads((coco / "annotations" / "instances_val.json").read_text())
    good = data["images"][0]
    (coco / "val" / "sub").mkdir()
    shutil.copy(coco / "val" / good["file_name"], coco / "val" / "sub" / "ok.jpg")
    outside = coco / "outside.jpg"
    shutil.copy(coco / "val" / good["file_name"], outside)
    bad_images = [
        ({"id": "501", "file_name": good["file_name"], "width": good["width"], "height": good["height"]}, "bad_image_id"),
        ({"id": True, "file_name": good["file_name"], "width": good["width"], "height": good["height"]}, "bad_image_id"),
        ({"id": -1, "file_name": good["file_name"], "width": good["width"], "height": good["height"]},
         "negative_image_id"),
        ({"id": 502, "file_name": str(outside), "width": good["width"], "height": good["height"]}, "unsafe_path"),
        ({"id": 503, "file_name": "../outside.jpg", "width": good["width"], "height": good["height"]}, "unsafe_path"),
        ({"id": 504, "file_name": "sub/../../outside.jpg", "width": good["width"], "height": good["height"]},
         "unsafe_path"),
        ({"id": 505, "file_name": None, "width": good["width"], "height": good["height"]}, "bad_file_name"),
        ({"id": 506, "file_name": "sub/ok.jpg", "width": "64", "height": good["height"]}, "bad_width_height"),
        ({"id": 507, "file_name": "sub/ok.jpg", "width": float(good["width"]), "height": good["height"]},
         "bad_width_height"),
        ({"id": 508, "file_name": "sub/ok.jpg", "width": good["width"], "height": 0}, "bad_width_height"),
        ("not a record", "malformed_image_record"),
    ]
    data["images"] += [record for record, _ in bad_images]
    data["images"].append({"id": 509, "file_name": "sub/ok.jpg", "width": good["width"], "height": good["height"]})
    ok = {"image_id": good["id"], "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100.0, "iscrowd": 0}
    bad_annotations = [
        (dict(ok, iscrowd="yes"), "bad_iscrowd"), (dict(ok, iscrowd=[1]), "bad_iscrowd"),
        (dict(ok, iscrowd=2), "bad_iscrowd"), (dict(ok, iscrowd=True), "bad_iscrowd"),
        (dict(ok, area="big"), "bad_area"), (dict(ok, area=-1), "bad_area"), (dict(ok, area=math.inf), "bad_area"),
        (dict(ok, bbox=["a", 1, 2, 3]), "bad_bbox"), (dict(ok, bbox=[1, 1, True, 3]), "bad_bbox"),
        (dict(ok, bbox="1,1,2,2"), "bad_bbox"), (dict(ok, bbox=[1, 1, math.nan, 3]), "bad_bbox"),
        (dict(ok, category_id="1"), "bad_category_id"), (dict(ok, category_id=1.0), "bad_category_id"),
        (dict(ok, segmentation="poly"), "bad_segmentation"), (dict(ok, segmentation=[[1, "x"]]), "bad_segmentation"),
        (dict(ok, segmentation={"counts": 5, "size": [2, 2]}), "bad_segmentation"),
        (dict(ok, image_id="3"), "bad_annotation_image_id"), (dict(ok, image_id=None), "bad_annotation_image_id"),
    ]
    next_id = max(a["id"] for a in data["annotations"]) + 1
    for i, (ann, _) in enumerate(bad_annotations):
        data["annotations"].append(dict(ann, id=next_id + i))
    data["annotations"].append(dict(ok, id="77"))  # bad_annotation_id
    data["annotations"].append([1, 2])  # malformed_annotation
    kept = [dict(ok, id=next_id + 100, segmentation=[[1, 1, 5, 1, 5, 5]]),
            dict(ok, id=next_id + 101, iscrowd=1, segmentation={"counts": "abc", "size": [64, 64]}),
            {k: v for k, v in dict(ok, id=next_id + 102).items() if k not in ("area", "iscrowd")}]
    data["annotations"] += kept
    expected = {}
    for _, reason in bad_images + bad_annotations + [(None, "bad_annotation_id"), (None, "malformed_annotation")]:
        expected[reason] = expected.get(reason, 0) + 1
    path = coco / "annotations" / "bad_fields.json"
    path.write_text(json.dumps(data))
    return path, expected, [k["id"] for k in kept]


def test_every_malformed_field_is_a_counted_skip(coco, tmp_path):
    annotations, expected, kept_ids = _bad_fields_coco(coco)
    report = write_shards(coco / "val", annotations, tmp_path / "out", progress=False, max_skip_fraction=1.0)
    assert report["skipped"] == expected
    assert report["fixed"] == {"area_missing": 1}
    assert report["num_samples"] == 10 + 1  # the good val images and image 509 (sub/ok.jpg)
    assert report["num_crowd"] == 1
    assert all(report["examples"][reason] for reason in expected)
    assert any("'yes'" in example for example in report["examples"]["bad_iscrowd"])
    assert report["max_category_id"] == max(c["id"] for c in report["categories"])
    assert sum(s["annotations"] for s in report["shards"]) == report["num_annotations"]
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert index["shards"] == report["shards"] and index["max_category_id"] == 5
    with tarfile.open(tmp_path / "out" / report["shards"][0]["name"]) as tar:
        anns = [a for m in tar.getmembers() if m.name.endswith(".json")
                for a in json.loads(tar.extractfile(m).read())["annotations"]]
    assert {a["id"] for a in anns} >= set(kept_ids)  # polygon, crowd RLE, and the one without area/iscrowd
    assert [a["iscrowd"] for a in anns if a["id"] == kept_ids[1]] == [1]


def test_cli_malformed_fields_exit_0_with_the_reasons(coco, tmp_path):
    annotations, expected, _ = _bad_fields_coco(coco)
    result = _shard_cli(coco / "val", annotations, tmp_path / "out", "--max-skip-fraction", "1")
    assert result.exit_code == 0, result.output
    for reason, count in expected.items():
        assert f"skipped {reason}: {count}" in result.output


def test_skip_budget_keeps_shards_unpublished(coco, tmp_path):
    """val images with train annotations: nearly every record points at a missing file."""
    out = tmp_path / "out"
    before = _snapshot(coco)
    result = _shard_cli(coco / "val", coco / "annotations" / "instances_train.json", out)
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "--max-skip-fraction 0.05" in line and "missing_image" in line
    assert not (out / INDEX_NAME).exists()
    [kept] = [p for p in out.iterdir()]
    assert kept.name.startswith("unpublished-") and str(kept) in line
    report = json.loads((kept / "report.json").read_text())
    assert report["skipped"]["missing_image"] == 6  # train ids 11..16 do not exist in val/
    assert sorted(p.name for p in kept.glob("shard-*.tar")) == [s["name"] for s in report["shards"]]
    assert _snapshot(coco) == before
    with pytest.raises(SkipBudgetError):
        write_shards(coco / "val", coco / "annotations" / "instances_train.json", tmp_path / "o2", progress=False)
    report = write_shards(coco / "val", coco / "annotations" / "instances_train.json", tmp_path / "o3",
                          progress=False, max_skip_fraction=0.9)  # the same skips within a looser budget: published
    assert report["num_samples"] == 3 and report["skip_fraction"] == 42 / 48
    assert (tmp_path / "o3" / INDEX_NAME).is_file()
