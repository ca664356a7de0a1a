"""The COCO-scale sharding benchmark runs end to end on a small size (its figures are not asserted)."""
import json

from pipelines.scale_bench import measure


def test_scale_bench_shards_every_synthesized_image(tmp_path):
    result = measure(tmp_path, 300)
    coco = json.loads((tmp_path / "instances.json").read_text())
    assert result["num_samples"] == len(coco["images"]) == 300 and result["skipped"] == {}
    assert result["num_annotations"] == len(coco["annotations"])
    assert result["num_crowd"] == sum(a["iscrowd"] for a in coco["annotations"])
    assert result["peak_rss_mib"] > 0 and result["images_per_s"] > 0
