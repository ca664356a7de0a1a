"""A real run (local Ray Train + sqlite MLflow) logs the loader's skip counts per epoch as data/skipped_*
and fails, naming the source, when an index over-states its shards beyond data.max_skip_fraction."""
from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from train_helpers import make_shards, tiny_config

from orchestrator.cluster.dispatch import train_on
from orchestrator.run.tracking import tracking_uri


def test_skip_counts_reach_mlflow_and_an_overstated_val_index_fails_the_run(tmp_path):
    shards = make_shards(tmp_path, num_train=8, num_val=4, size=64)
    index_path = shards["val"] / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][0]["count"] *= 3  # 4 real samples, 12 promised
    index_path.write_text(json.dumps(index))
    _, cfg = tiny_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs", num_workers=1, epochs=1,
                         max_failures=0, max_steps_per_epoch=1)
    with pytest.raises(Exception, match=r"data.val_shards=.*8 of 12 samples lost .*index_mismatch 8"):
        train_on(cfg, cluster="local", name="bad-val", echo=lambda line: None)
    client = MlflowClient(tracking_uri(cfg))
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    metrics = run.data.metrics
    assert metrics["data/skipped_train_index_mismatch"] == 0 and metrics["data/skipped_train_fraction"] == 0
    assert metrics["data/skipped_val_index_mismatch"] == 8 and metrics["data/skipped_val_index_mismatch_shards"] == 1
    assert metrics["data/skipped_val_fraction"] == pytest.approx(8 / 12)
