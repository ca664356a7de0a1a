"""Tiny synthetic datasets shared by the pipelines tests (64-pixel images keep them fast)."""
import pytest

from pipelines.shard import write_shards
from pipelines.synth import generate


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory):
    """A synthetic COCO folder: 16 train and 10 val images of 64 px."""
    root = tmp_path_factory.mktemp("synth") / "coco"
    generate(root, num_train=16, num_val=10, size=64, seed=3)
    return root


@pytest.fixture(scope="session")
def train_shards(coco_root, tmp_path_factory):
    """8 shards of 2 samples (balanced: every slot split is exact)."""
    out = tmp_path_factory.mktemp("shards") / "train"
    write_shards(coco_root / "train", coco_root / "annotations" / "instances_train.json", out, shard_size=2,
                 progress=False)
    return out


@pytest.fixture(scope="session")
def val_shards(coco_root, tmp_path_factory):
    """3 shards (4, 4, 2): fewer shards than 2 ranks x 2 workers, so samples are split by position."""
    out = tmp_path_factory.mktemp("shards") / "val"
    write_shards(coco_root / "val", coco_root / "annotations" / "instances_val.json", out, shard_size=4,
                 progress=False)
    return out
