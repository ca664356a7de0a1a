"""Shard loader: rank x worker split, equal epochs, padding policy, corrupt data skipped and counted."""
import io
import json
import shutil
import tarfile
from collections import Counter

import pytest
import torch

from pipelines.errors import DataError, ShardIndexError
from pipelines.loader import PAD_IMAGE_ID, CorruptSampleWarning, make_loader
from pipelines.shard import INDEX_NAME, write_shards

SMALL = {"scales": (64, 72), "max_size": 96, "val_scale": 64, "random_crop": False}


def _epoch_ids(source, *, train, world_size, num_workers, batch_size, epoch=0, **kw):
    """Image ids each rank yields in one epoch, and each rank's len()."""
    ids, lengths = [], []
    for rank in range(world_size):
        loader = make_loader(source, train=train, batch_size=batch_size, num_workers=num_workers, rank=rank,
                             world_size=world_size, **SMALL, **kw)
        loader.set_epoch(epoch)
        rank_ids, batches = [], 0
        for images, mask, targets in loader:
            assert images.shape[0] == mask.shape[0] == len(targets) == batch_size
            rank_ids += [t["image_id"] for t in targets]
            batches += 1
        assert batches == len(loader)
        ids.append(rank_ids)
        lengths.append(len(loader))
    return ids, lengths


def test_train_split_2_ranks_x_2_workers_no_duplicate_no_missing(train_shards):
    ids, lengths = _epoch_ids(train_shards, train=True, world_size=2, num_workers=2, batch_size=2, epoch=1)
    assert lengths == [4, 4]
    flat = ids[0] + ids[1]
    assert sorted(flat) == list(range(1, 17))
    assert not set(ids[0]) & set(ids[1])


def test_train_split_by_sample_position_when_shards_are_few(coco_root, tmp_path):
    out = tmp_path / "one_shard"
    write_shards(coco_root / "train", coco_root / "annotations" / "instances_train.json", out, progress=False)
    ids, lengths = _epoch_ids(out, train=True, world_size=2, num_workers=2, batch_size=2)
    assert lengths == [4, 4]
    assert sorted(ids[0] + ids[1]) == list(range(1, 17))


@pytest.mark.parametrize("shard_size,world_size", [(4, 2), (1, 2), (4, 3)])
def test_eval_sees_every_sample_exactly_once(coco_root, tmp_path, shard_size, world_size):
    out = tmp_path / "val"
    write_shards(coco_root / "val", coco_root / "annotations" / "instances_val.json", out, shard_size=shard_size,
                 progress=False)
    ids, lengths = _epoch_ids(out, train=False, world_size=world_size, num_workers=2, batch_size=3)
    assert len(set(lengths)) == 1
    real = [i for rank_ids in ids for i in rank_ids if i != PAD_IMAGE_ID]
    assert sorted(real) == list(range(1, 11))
    assert sum(len(r) for r in ids) == lengths[0] * world_size * 3


def test_epochs_are_reproducible_and_differ(train_shards):
    def run(epoch):
        loader = make_loader(train_shards, train=True, batch_size=4, num_workers=0, seed=5, **SMALL)
        loader.set_epoch(epoch)
        return [(t["image_id"], t["size"].tolist(), t["boxes"].sum().item()) for _, _, ts in loader for t in ts]

    first = run(3)
    assert first == run(3)
    assert first != run(4)
    assert sorted(i for i, _, _ in first) == list(range(1, 17))


def test_batch_layout_and_targets(val_shards):
    loader = make_loader(val_shards, train=False, batch_size=4, num_workers=0, **SMALL)
    images, mask, targets = next(iter(loader))
    assert images.dtype == torch.uint8 and mask.dtype == torch.bool  # normalised on the consumer's device
    for image, valid, target in zip(images, mask, targets):
        h, w = target["size"].tolist()
        assert min(h, w) == 64
        assert not valid[:h, :w].any() and valid[h:, :].all() and valid[:, w:].all()
        assert (image[:, h:, :] == 0).all() and (image[:, :, w:] == 0).all()
        assert target["labels"].dtype == torch.int64 and target["boxes"].shape == (len(target["labels"]), 4)
        assert ((target["boxes"] > 0) & (target["boxes"] <= 1)).all()
        assert target["orig_size"].dtype == torch.int64 and isinstance(target["image_id"], int)


def test_index_url_pipe_and_brace_pattern_sources(val_shards):
    pipe = f"pipe:cat {val_shards / INDEX_NAME}"
    brace = str(val_shards / "shard-{000000..000001}.tar")
    for source, expected in ((pipe, 10), (str(val_shards / INDEX_NAME), 10), (brace, 8)):
        loader = make_loader(source, train=False, batch_size=2, **SMALL)
        assert loader.num_samples == expected
        ids = [t["image_id"] for _, _, ts in loader for t in ts]
        assert sorted(ids) == list(range(1, expected + 1))


def test_bad_sources_and_arguments(tmp_path, train_shards):
    with pytest.raises(FileNotFoundError, match="index.json"):
        make_loader(tmp_path, train=True, batch_size=2)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"shards": []}))
    with pytest.raises(ShardIndexError, match="not an sdo shard index"):
        make_loader(tmp_path, train=True, batch_size=2)
    with pytest.raises(DataError, match="rank"):
        make_loader(train_shards, train=True, batch_size=2, rank=2, world_size=2)
    with pytest.raises(DataError, match="cannot fill one batch"):
        make_loader(train_shards, train=True, batch_size=16, world_size=2)


def _rewrite_shard(path, edit):
    """Rewrite a shard's members through `edit(list of (name, bytes)) -> list`."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in edit(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def damaged_shards(train_shards, tmp_path):
    """train shards with: shard 1 truncated mid-member, a garbage jpg in shard 2, a json-only sample in shard 3."""
    out = tmp_path / "damaged"
    shutil.copytree(train_shards, out)
    raw = (out / "shard-000001.tar").read_bytes()
    (out / "shard-000001.tar").write_bytes(raw[:1536])
    _rewrite_shard(out / "shard-000002.tar",
                   lambda ms: [(n, b"not a jpeg" if i == 0 else d) for i, (n, d) in enumerate(ms)])
    _rewrite_shard(out / "shard-000003.tar", lambda ms: [(n, d) for n, d in ms if not (n.endswith(".jpg") and
                                                                                      n == ms[0][0])])
    return out


def test_corrupt_data_is_skipped_counted_and_warned(damaged_shards):
    loader = make_loader(damaged_shards, train=False, batch_size=2, num_workers=0, **SMALL)
    with pytest.warns(CorruptSampleWarning):
        ids = [t["image_id"] for _, _, ts in loader for t in ts]
    assert len(ids) == len(loader) * 2
    real = [i for i in ids if i != PAD_IMAGE_ID]
    assert len(real) == len(set(real))
    stats = loader.stats
    assert stats["tar_errors"] >= 1
    assert stats["corrupt_samples"] == 1
    assert stats["incomplete_samples"] == 1
    # shard 1 lost both samples (one before the cut, one after), shards 2 and 3 one each
    assert stats["missing_samples"] == 16 - len(real) == 4


def test_corrupt_data_with_workers_and_ranks(damaged_shards):
    totals = Counter()
    for rank in range(2):
        loader = make_loader(damaged_shards, train=True, batch_size=2, num_workers=2, rank=rank, world_size=2,
                             **SMALL)
        batches = sum(1 for _ in loader)  # worker processes print their warnings to stderr
        assert batches == len(loader) == 4
        totals.update(loader.stats)
    assert totals["corrupt_samples"] == 1 and totals["incomplete_samples"] == 1 and totals["tar_errors"] >= 1



@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http(s) URLs with curl")
def test_http_source(val_shards):
    """Shards served over HTTP (127.0.0.1): index and shards come through webdataset's curl opener."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(val_shards)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        source = f"http://127.0.0.1:{server.server_address[1]}/{INDEX_NAME}"
        loader = make_loader(source, train=False, batch_size=5, num_workers=1, **SMALL)
        ids = [t["image_id"] for _, _, ts in loader for t in ts]
        assert sorted(ids) == list(range(1, 11)) and loader.stats == {}
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_many_workers_few_samples_still_balanced_across_ranks(coco_root, tmp_path):
    """3 workers x 2 ranks = 6 slots over 10 samples in one shard: ranks get 5 samples each
    (2 + 2 + 1 over the workers) and never share one; batches are filled without repeats."""
    out = tmp_path / "val_one_shard"
    write_shards(coco_root / "val", coco_root / "annotations" / "instances_val.json", out, progress=False)
    ids, lengths = _epoch_ids(out, train=True, world_size=2, num_workers=3, batch_size=2)
    assert lengths == [2, 2]
    assert not set(ids[0]) & set(ids[1])
    assert all(len(set(rank_ids)) == 4 for rank_ids in ids)
    assert {i % 2 for i in ids[0]} == {1} and {i % 2 for i in ids[1]} == {0}  # position p -> rank p % 2
