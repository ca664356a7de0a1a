"""The loader checks the index every epoch, keeps a skip budget, and gives the ground truth it yielded."""
import json
import shutil
import warnings

import pytest

from pipelines.coco_eval import evaluate, ground_truth
from pipelines.errors import SkipBudgetError
from pipelines.loader import PAD_IMAGE_ID, CorruptSampleWarning, check_skip_budget, make_loader, skip_fraction
from pipelines.records import records_to_coco
from pipelines.shard import INDEX_NAME
from tests.pipelines.test_loader import _rewrite_shard

SMALL = {"scales": (64, 72), "max_size": 96, "val_scale": 64, "random_crop": False}


def _inflate_index(shards_dir, factor):
    index = json.loads((shards_dir / INDEX_NAME).read_text())
    for shard in index["shards"]:
        shard["count"] *= factor
    (shards_dir / INDEX_NAME).write_text(json.dumps(index))


def _one_epoch(loader):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        return [t["image_id"] for _, _, targets in loader for t in targets]


def test_honest_index_verifies_clean(train_shards, val_shards):
    for source, train in ((train_shards, True), (val_shards, False)):
        for workers in (0, 2):
            loader = make_loader(source, train=train, batch_size=2, num_workers=workers, **SMALL)
            _one_epoch(loader)
            skips = loader.epoch_skips()
            assert skips == {"tar_errors": 0, "corrupt_samples": 0, "incomplete_samples": 0, "missing_samples": 0,
                             "index_mismatch": 0, "index_mismatch_shards": 0, "expected": loader.num_samples}
            check_skip_budget(skips, 0.0, "data.train_shards")


@pytest.mark.parametrize("train,workers,world_size", [(True, 0, 1), (True, 2, 2), (False, 0, 1), (False, 2, 2)])
def test_overstated_index_is_counted_and_fails_the_budget(train_shards, tmp_path, train, workers, world_size):
    """An index claiming 3x the samples: each image would be seen 3 times per epoch."""
    shards = tmp_path / "inflated"
    shutil.copytree(train_shards, shards)
    _inflate_index(shards, 3)
    totals = {}
    for rank in range(world_size):
        loader = make_loader(shards, train=train, batch_size=2, num_workers=workers, rank=rank,
                             world_size=world_size, **SMALL)
        _one_epoch(loader)
        for key, value in loader.epoch_skips().items():
            totals[key] = totals.get(key, 0) + value
    assert totals["expected"] == 48
    assert totals["index_mismatch"] == 32 and totals["index_mismatch_shards"] == 8  # every shard, checked once
    assert skip_fraction(totals) == pytest.approx(32 / 48)
    with pytest.raises(SkipBudgetError, match=r"data.train_shards='x': 32 of 48 samples lost .* index_mismatch 32"):
        check_skip_budget(totals, 0.01, "data.train_shards='x'")


def test_ground_truth_is_what_the_loader_yielded(val_shards, tmp_path):
    """Invalid json in one val sample: the loader skips it and so does the ground truth (no crash)."""
    shards = tmp_path / "val"
    shutil.copytree(val_shards, shards)
    _rewrite_shard(shards / "shard-000001.tar",
                   lambda ms: [(n, b"{not json" if n.endswith(".json") and i == 1 else d) for i, (n, d) in enumerate(ms)])
    loader = make_loader(shards, train=False, batch_size=3, num_workers=0, **SMALL)
    ids = [i for i in _one_epoch(loader) if i != PAD_IMAGE_ID]
    gt = loader.ground_truth()
    assert sorted(ids) == [image["id"] for image in gt["images"]] and len(ids) == 9
    assert loader.epoch_skips()["corrupt_samples"] == 1
    with pytest.warns(CorruptSampleWarning):
        from_shards = ground_truth(shards)  # the json-only reader skips it too, through the same parser
    assert from_shards == gt
    predictions = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
                   for a in gt["annotations"]]
    assert evaluate(predictions, gt)["AP"] == pytest.approx(1.0)


def test_ground_truth_over_ranks_and_workers_is_the_whole_set(val_shards):
    records = []
    for rank in range(2):
        loader = make_loader(val_shards, train=False, batch_size=2, num_workers=2, rank=rank, world_size=2, **SMALL)
        _one_epoch(loader)
        records += loader.ground_truth_records()
    assert sorted(r["id"] for r in records) == list(range(1, 11))
    assert records_to_coco(records, loader.index["categories"]) == ground_truth(val_shards)
