"""ASHA really stops trials early: a real Ray Tune sweep (run_sweep: scheduler, MLflow parent run,
report) whose trials are a deterministic toy function trainable instead of a training.

A real training's AP after one epoch is noise, so the stopping decisions could not be predicted;
here AP = cls_coef / 10 + 0.01 * epoch, one trial at a time in grid order, so every ASHA decision
is known in advance (budget 4 epochs, grace 1, reduction factor 2 -> rungs after epochs 1 and 2):
  cls 4.0: no rival at any rung -> trains all 4 epochs
  cls 3.0: rung 1 cutoff = median{0.40} = 0.40 > 0.30 -> stopped after epoch 1
  cls 2.0: rung 1 cutoff = median{0.40, 0.30} = 0.35 > 0.20 -> stopped after epoch 1
  cls 1.0: rung 1 cutoff = median{0.40, 0.30, 0.20} = 0.30 > 0.10 -> stopped after epoch 1
"""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from train_helpers import make_shards, tiny_config

from orchestrator.config import set_value, validate
from orchestrator.sweep.tuner import run_sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("asha")
    shards = make_shards(root, num_train=2, num_val=1, size=32)  # the toy reads none, but a sweep checks them once
    _, cfg = tiny_config(root / "tiny.yaml", shards, root / "runs")
    set_value(cfg, "sweep.space", {"loss.cls_coef": {"grid": [4.0, 3.0, 2.0, 1.0]}})
    for key, value in {"max_concurrent": 1, "max_epochs": 4, "grace_period": 1, "reduction_factor": 2,
                       "scheduler": "asha", "metric": "AP", "mode": "max"}.items():
        set_value(cfg, f"sweep.{key}", value)
    validate(cfg)

    def toy_trial(params, *, setup):
        from ray import tune

        coef = float(params["loss.cls_coef"])
        for epoch in range(setup["epochs"]):
            tune.report({"epoch": epoch, "AP": coef / 10 + 0.01 * epoch, "AP50": coef / 5, "loss": 1.0 / (epoch + 1),
                         "img_per_s": 100.0 + coef})

    lines = []
    summary = run_sweep(cfg, name="asha", trainable=toy_trial, echo=lines.append)
    return {"summary": summary, "lines": lines, "client": MlflowClient(summary["run"].tracking_uri)}


def test_asha_stops_the_weaker_trials_after_the_first_rung(sweep):
    rows = sweep["summary"]["rows"]
    assert [r["params"]["loss.cls_coef"] for r in rows] == [4.0, 3.0, 2.0, 1.0]
    assert [r["epochs"] for r in rows] == [4, 1, 1, 1]
    assert [r["status"] for r in rows] == ["completed", "stopped early", "stopped early", "stopped early"]
    assert [r["AP"] for r in rows] == pytest.approx([0.43, 0.30, 0.20, 0.10])
    assert sweep["summary"]["savings"] == {"full_grid_epochs": 16, "epochs_run": 7, "epochs_saved": 9,
                                           "stopped_early": 3}
    assert not sweep["summary"]["interrupted"]


def test_parent_run_holds_the_report_and_best_trial(sweep):
    summary, client = sweep["summary"], sweep["client"]
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sdo.kind"] == "sweep"
    assert parent.data.tags["best_trial"] == summary["rows"][0]["trial"]
    assert parent.data.metrics["best_AP"] == pytest.approx(0.43)
    assert parent.data.metrics["epochs_saved"] == 9
    assert parent.data.params["space.loss.cls_coef"] == "grid [4.0, 3.0, 2.0, 1.0]"
    assert parent.data.params["sweep.num_trials"] == "4"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/pareto.png", "report/trials.csv", "report/pareto.csv", "report/report.md"} <= artifacts
    # one model config (only a loss weight varies): every trial has the same GFLOPs, so the front is the best AP
    assert len({r["gflops"] for r in summary["rows"]}) == 1 and summary["rows"][0]["gflops"] > 0
    front = summary["paths"]["pareto_csv"].read_text().splitlines()
    assert len(front) == 2 and front[1].startswith(parent.data.tags["best_trial"] + ",")
    assert any("9 saved, 3 trials stopped early" in line for line in sweep["lines"])
