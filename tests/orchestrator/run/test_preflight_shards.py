"""Preflight resolves shard sources as the loader does, and checks category ids against model.num_classes."""
import json
import shutil

import pytest

from orchestrator.config import Config, ConfigError
from orchestrator.run.preflight import check_shards
from pipelines.loader import make_loader
from pipelines.shard import write_shards
from pipelines.synth import generate


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    generate(root / "coco", num_train=4, num_val=4, size=48, seed=2)
    out = root / "shards"
    write_shards(root / "coco" / "val", root / "coco" / "annotations" / "instances_val.json", out, shard_size=2,
                 progress=False)
    return out


def _cfg(source, num_classes=91):
    cfg = Config()
    cfg.data.train_shards = cfg.data.val_shards = str(source)
    cfg.model.num_classes = num_classes
    return cfg


@pytest.mark.parametrize("form,expected", [("folder", 4), ("index", 4), ("single_tar", 2), ("brace", 4),
                                           ("pipe", 4)])
def test_every_source_form_resolves_the_same_in_preflight_and_loader(shards, form, expected):
    source = {"folder": str(shards), "index": str(shards / "index.json"),
              "single_tar": str(shards / "shard-000001.tar"), "brace": str(shards / "shard-{000000..000001}.tar"),
              "pipe": f"pipe:cat {shards / 'index.json'}"}[form]
    check_shards(_cfg(source))
    loader = make_loader(source, train=False, batch_size=2)
    assert loader.num_samples == expected
    assert len([t for _, _, ts in loader for t in ts if t["image_id"] >= 0]) == expected


def test_bad_sources_are_refused_naming_the_key(shards, tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    for source, message in ((tmp_path / "absent", "does not exist"),
                            (shards / "shard-000009.tar", "does not exist"),
                            (shards / "shard-{000000..000009}.tar", "not listed"),
                            (tmp_path / "x.txt", "neither a shard directory")):
        with pytest.raises(ConfigError, match=f"data.train_shards=.*{message}"):
            check_shards(_cfg(source))


def test_category_ids_beyond_num_classes_are_refused_naming_both(shards, tmp_path):
    check_shards(_cfg(shards, num_classes=6))  # synthetic ids 1..5
    with pytest.raises(ConfigError, match=r"category ids up to 5, but model.num_classes=5 .*>= 6"):
        check_shards(_cfg(shards, num_classes=5))
    old = tmp_path / "old_index"  # an index written before max_category_id existed: taken from the categories
    shutil.copytree(shards, old)
    index = json.loads((old / "index.json").read_text())
    del index["max_category_id"]
    (old / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="category ids up to 5, but model.num_classes=3"):
        check_shards(_cfg(old, num_classes=3))
