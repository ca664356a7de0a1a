"""Several objectives and failing trials in real Ray Tune sweeps (run_sweep: scheduler, MLflow parent and child
runs, report) whose trials are a deterministic toy function trainable: it opens its MLflow child run as a
real trial does (open_run) and reports made-up AP and GFLOPs, so every MO-ASHA decision is known in advance.

"mo": AP max and GFLOPs min, one trial at a time in grid order, budget 4, grace 1, reduction factor 2
(rungs after epochs 1 and 2); AP = base + 0.01 * epoch:
  cls 4.0: AP .40, 10 GFLOPs: alone at each rung -> 4 epochs
  cls 3.0: AP .30,  5 GFLOPs: cheaper than 4.0, so no peer dominates it -> 4 epochs
           (ASHA on AP alone stops it after epoch 1: test_sweep_asha)
  cls 2.0: AP .20,  8 GFLOPs: dominated by 3.0; rank 2 of 3, only ceil(3/2) = 2 go on -> stopped after epoch 1
  cls 1.0: AP .35, 12 GFLOPs: dominated by 4.0; rank 2 of 4, 2 go on -> stopped after epoch 1
  cls 0.5: reports AP .90 at 1 GFLOP for epoch 0, then fails with a ValueError: recorded as failed with its
           cause; neither best trial nor on the front, although its numbers beat everyone's
"limit": sweep.max_failures 0; its first trial fails, so the sweep ends there: no other trial runs.
Both sweeps share one Ray session.
"""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from train_helpers import make_shards, tiny_config

from orchestrator.cluster.local import ray_session
from orchestrator.config import set_value, validate
from orchestrator.sweep.tuner import run_sweep

VALUES = {4.0: (0.40, 10.0), 3.0: (0.30, 5.0), 2.0: (0.20, 8.0), 1.0: (0.35, 12.0), 0.5: (0.90, 1.0)}


def make_toy_trial():
    """The toy trainable, made here so that Ray pickles it by value (the test module is not importable there)."""
    values = dict(VALUES)

    def toy_trial(params, *, setup):
        from ray import tune

        from orchestrator.config import from_dict
        from orchestrator.run.lifecycle import open_run
        from orchestrator.sweep.space import trial_config
        from orchestrator.sweep.trial import model_cost, trial_run_name

        cfg = trial_config(from_dict(setup["cfg"]), params, epochs=setup["epochs"], parent_run_id=setup["parent_run_id"],
                           tracking_uri=setup["tracking_uri"])
        cfg.train.storage_path = setup["trials_dir"]
        run = open_run(cfg, name=trial_run_name(setup["name"], tune.get_context().get_trial_id()))
        measured = model_cost(cfg, run, latency=setup["latency"])  # the real trial's: a Ray task times the model
        latency = {k: v for k, v in measured.items() if k.startswith("latency")}
        coef = float(params["loss.cls_coef"])
        ap, gflops = values[coef]
        for epoch in range(setup["epochs"]):
            if coef == 0.5 and epoch == 1:
                raise ValueError(f"loss.cls_coef={coef}: the toy fails here")
            tune.report({"epoch": epoch, "AP": ap + 0.01 * epoch, "AP50": ap, "gflops": gflops, "img_per_s": 100.0,
                         **latency})

    return toy_trial


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    shards = make_shards(root, num_train=2, num_val=1, size=32)  # the toy reads none, but a sweep checks them once
    _, cfg = tiny_config(root / "tiny.yaml", shards, root / "runs")
    for key, value in {"max_concurrent": 1, "max_epochs": 4, "grace_period": 1, "reduction_factor": 2,
                       "scheduler": "asha", "max_failures": 1, "latency": "always", "latency_size": [128, 128],
                       "objectives": [{"metric": "AP", "mode": "max"}, {"metric": "gflops", "mode": "min"}]}.items():
        set_value(cfg, f"sweep.{key}", value)
    set_value(cfg, "sweep.space", {"loss.cls_coef": {"grid": list(VALUES)}})
    validate(cfg)
    out = {"lines": {"mo": [], "limit": []}}
    with ray_session(cfg):
        out["mo"] = run_sweep(cfg, name="mo", trainable=make_toy_trial(), echo=out["lines"]["mo"].append)
        set_value(cfg, "sweep.max_failures", 0)
        set_value(cfg, "sweep.space", {"loss.cls_coef": {"grid": [0.5, 4.0, 3.0]}})
        out["limit"] = run_sweep(cfg, name="limit", trainable=make_toy_trial(), echo=out["lines"]["limit"].append)
    out["client"] = MlflowClient(out["mo"]["run"].tracking_uri)
    return out


def _by_coef(rows):
    return {r["params"]["loss.cls_coef"]: r for r in rows}


def test_mo_asha_keeps_the_cheap_trial_and_stops_the_dominated_ones(sweeps):
    rows = _by_coef(sweeps["mo"]["rows"])
    assert {c: r["epochs"] for c, r in rows.items()} == {4.0: 4, 3.0: 4, 2.0: 1, 1.0: 1, 0.5: 1}
    assert {c: r["status"] for c, r in rows.items()} == {4.0: "completed", 3.0: "completed", 2.0: "stopped early",
                                                          1.0: "stopped early", 0.5: "error"}
    assert {c: r["rank"] for c, r in rows.items()} == {4.0: 1, 3.0: 1, 2.0: 2, 1.0: 2, 0.5: None}
    summary = sweeps["mo"]
    assert [r["params"]["loss.cls_coef"] for r in summary["front"]] == [3.0, 4.0]  # cheapest first
    assert summary["best"]["params"]["loss.cls_coef"] == 4.0 and summary["best"]["AP"] == pytest.approx(0.43)
    # hypervolume by hand: reference AP .20 - 10% of .23, GFLOPs 12 + 10% of 7
    ap_ref, gf_ref = 0.20 - 0.023, 12.7
    assert summary["hypervolume"] == pytest.approx((10 - 5) * (0.33 - ap_ref) + (gf_ref - 10) * (0.43 - ap_ref))
    # the failed trial's epoch counts neither as run nor as saved (issue 26)
    assert summary["savings"] == {"full_grid_epochs": 16, "epochs_run": 10, "epochs_saved": 6, "stopped_early": 2}
    assert summary["failed"] == 1 and summary["failure_limit"] is None and not summary["interrupted"]


def test_the_failed_trial_is_named_with_its_cause(sweeps):
    failed = _by_coef(sweeps["mo"]["rows"])[0.5]
    assert failed["error"] == "ValueError: loss.cls_coef=0.5: the toy fails here"
    closing = [line for line in sweeps["lines"]["mo"] if "trials failed" in line]
    assert len(closing) == 1 and closing[0].startswith(
        f"sdo: 1 of 5 trials failed: trial {failed['trial']} (cls=0.5): ValueError: loss.cls_coef=0.5: the toy fails")
    assert f"  {failed['trial']}: ValueError: loss.cls_coef=0.5: the toy fails here" in sweeps["mo"]["report"]


def test_child_runs_carry_outcome_pareto_and_status(sweeps):
    client = sweeps["client"]
    for coef, row in _by_coef(sweeps["mo"]["rows"]).items():
        run = client.get_run(row["run_id"])
        tags = run.data.tags
        assert tags["sdo.pareto"] == ("true" if coef in (4.0, 3.0) else "false"), coef
        assert tags["sdo.sweep.status"] == row["status"]
        if row["status"] == "stopped early":  # a normal end (issue 26: it was FAILED or KILLED)
            assert run.info.status == "FINISHED" and tags["sdo.stopped_early"] == "true"
        elif row["status"] == "error":
            assert run.info.status == "FAILED"
            assert tags["sdo.sweep.error"] == "ValueError: loss.cls_coef=0.5: the toy fails here"
        else:
            assert run.info.status == "FINISHED" and "sdo.stopped_early" not in tags


def test_parent_run_holds_the_front(sweeps):
    client, summary = sweeps["client"], sweeps["mo"]
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.optimised"] == "AP max, gflops min"
    assert parent.data.params["sweep.flops_size"] == "850x1040"
    assert parent.data.metrics["pareto_size"] == 2 and parent.data.metrics["trials_failed"] == 1
    assert parent.data.metrics["pareto_hypervolume"] == pytest.approx(summary["hypervolume"])
    assert parent.data.tags["sdo.sweep.front"] == ", ".join(r["trial"] for r in summary["front"])
    history = client.get_metric_history(parent.info.run_id, "best_AP")
    assert [(m.step, m.value) for m in history] == [(5, pytest.approx(0.43))]  # step: trials ended
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/pareto.png", "report/pareto.csv", "report/trials.json"} <= artifacts


def test_latency_is_measured_where_the_trial_ran_and_reported(sweeps):
    client = sweeps["client"]
    for row in sweeps["mo"]["rows"]:
        run = client.get_run(row["run_id"])
        assert run.data.metrics["model/latency_ms"] > 0 and run.data.metrics["model/latency_ms_b4"] > 0
        assert run.data.tags["sdo.latency_device"].startswith("cpu") and run.data.tags["sdo.latency_size"] == "128x128"
        if row["status"] != "error":
            assert row["latency_ms"] == pytest.approx(run.data.metrics["model/latency_ms"])
    header = sweeps["mo"]["report"].splitlines()[1]
    assert "ms (b1)" in header and "ms (b4)" in header and "rank" in header and "pareto" in header


def test_max_failures_ends_the_sweep_with_one_line(sweeps):
    summary, lines = sweeps["limit"], sweeps["lines"]["limit"]
    rows = summary["rows"]
    assert rows[0]["status"] == "error" and rows[0]["params"]["loss.cls_coef"] == 0.5
    assert all(r["status"] == "cancelled" and r["epochs"] == 0 for r in rows[1:])  # nothing else trained
    assert summary["failure_limit"] == (f"sweep limit ended: 1 trials failed, more than sweep.max_failures=0 "
                                        f"(trial {rows[0]['trial']} (cls=0.5): ValueError: loss.cls_coef=0.5: "
                                        "the toy fails here)")
    assert f"sdo: {summary['failure_limit']}" in lines
    assert not any("--resume retries them" in line for line in lines)
    assert sweeps["client"].get_run(summary["mlflow_run_id"]).info.status == "FAILED"
