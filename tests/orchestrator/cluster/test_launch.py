"""End to end on real Ray Train + real MLflow (sqlite) + real shards: a tiny 2-worker CPU run.

One run serves every assertion (Ray start-up dominates the cost). Rank 1 is made to exit at global
step 3 (`train.crash_at_step`), i.e. in epoch 1 after the epoch-0 checkpoint: the worker group
restarts from that checkpoint and finishes epoch 1. Then the finished run is continued with
``resume=True`` and one more epoch. Together they prove the normal path (params, per-step metrics,
checkpoint artifacts, plots), fault tolerance and resume, all in one MLflow run.
"""
from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from train_helpers import make_shards, tiny_config

from orchestrator.cluster.launch import launch
from orchestrator.cluster.local import ray_session
from orchestrator.config import flatten
from orchestrator.run import checkpoints
from orchestrator.run.directory import CRASH_MARKER

CRASH_STEP = 3
EPOCHS = 3  # 2 in the first launch, 1 more after --resume
STEPS = 2  # per epoch (train.max_steps_per_epoch)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    shards = make_shards(root)
    _, cfg = tiny_config(root / "tiny.yaml", shards, root / "runs", crash_at_step=CRASH_STEP)
    lines = []
    with ray_session(cfg):  # one Ray instance for both launches
        first = launch(cfg, cluster="local", name="tiny", echo=lines.append)
        first_status = MlflowClient(first["tracking_uri"]).get_run(first["mlflow_run_id"]).info.status
        cfg.train.epochs = EPOCHS
        summary = launch(cfg, cluster="local", name="tiny", resume=True, echo=lines.append)
    client = MlflowClient(summary["tracking_uri"])
    return {"cfg": cfg, "first": first, "first_status": first_status, "summary": summary, "lines": lines,
            "client": client, "root": root, "mlflow_run": client.get_run(summary["mlflow_run_id"])}


def _artifacts(client, run_id, path=None):
    out = []
    for item in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, item.path) if item.is_dir else [item.path])
    return out


def test_one_finished_mlflow_run_despite_the_crash_and_the_resume(run):
    client, summary = run["client"], run["summary"]
    assert run["first_status"] == "FINISHED"
    assert run["first"]["mlflow_run_id"] == summary["mlflow_run_id"]
    runs = client.search_runs([summary["experiment_id"]], run_view_type=3)  # ViewType.ALL
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED"
    assert (run["root"] / "runs" / "tiny" / CRASH_MARKER).is_file()  # the hook really fired
    # restarted from epoch 0's checkpoint after the crash, from epoch 1's on --resume
    resumed = client.get_metric_history(summary["mlflow_run_id"], "resumed_from_epoch")
    assert sorted((m.step, m.value) for m in resumed) == [(STEPS, 0.0), (2 * STEPS, 1.0)]


def test_params_are_the_resolved_config(run):
    params = run["mlflow_run"].data.params
    expected = flatten(run["cfg"])
    assert set(params) == set(expected)
    assert params["model.rho"] == "0.3"
    assert params["train.num_workers"] == "2"
    assert params["data.train_shards"] == str(run["root"] / "shards" / "train")
    tags = run["mlflow_run"].data.tags
    assert (tags["rho"], tags["backbone"], tags["cluster_kind"]) == ("0.3", "resnet18", "local")
    assert len(tags["git_commit"]) in (40, len("unknown"))


def test_per_step_metrics_cover_every_step_once(run):
    client, run_id = run["client"], run["summary"]["mlflow_run_id"]
    total_steps = EPOCHS * STEPS
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask_prediction", "loss_ce_enc_0", "lr"):
        steps = sorted({m.step for m in client.get_metric_history(run_id, key)})
        assert steps == list(range(1, total_steps + 1)), key
        # steps 3-4 ran twice (before and after the crash), yet each (metric, step) is stored once
        assert len(client.get_metric_history(run_id, key)) == total_steps, key
    for key in ("AP", "AP50", "img_per_s", "epoch_time", "epoch_loss"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [STEPS, 2 * STEPS, 3 * STEPS], key
        assert all(m.value >= 0 for m in history)
    ap = [m.value for m in client.get_metric_history(run_id, "AP")]
    assert all(0.0 <= v <= 1.0 for v in ap)
    # dam_recall: one value per evaluated epoch, at the epoch's last step, as in the eval json
    recall = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "dam_recall"))
    assert [step for step, _ in recall] == [STEPS, 2 * STEPS, 3 * STEPS]
    assert all(0.0 < value <= 1.0 for _, value in recall)
    stored = json.loads((run["root"] / "runs" / "tiny" / "eval" / "epoch_0002.json").read_text())
    assert stored["metrics"]["dam_recall"] == pytest.approx(recall[-1][1])


def test_checkpoint_artifacts_hold_the_training_state(run, tmp_path):
    client, run_id = run["client"], run["summary"]["mlflow_run_id"]
    names = _artifacts(client, run_id)
    for name in ("config.yaml", "checkpoints/final/checkpoint.pt", "checkpoints/final/config.yaml",
                 "checkpoints/best/checkpoint.pt", "eval/epoch_0000.json", "eval/epoch_0001.json", "eval/epoch_0002.json",
                 "plots/loss_curves.png", "plots/ap_per_epoch.png"):
        assert name in names, name
    # drawn at every eval, one folder per epoch (tiny_config: one prediction and one DAM picture)
    for epoch in range(EPOCHS):
        for folder in (f"plots/dam/epoch_{epoch:04d}/", f"plots/predictions/epoch_{epoch:04d}/"):
            assert len([n for n in names if n.startswith(folder) and n.endswith(".png")]) == 1, folder
    local = client.download_artifacts(run_id, "checkpoints/final/checkpoint.pt", str(tmp_path))
    state = checkpoints.load(local)
    assert (state["epoch"], state["step"], state["mlflow_run_id"]) == (EPOCHS - 1, EPOCHS * STEPS, run_id)
    assert state["config"]["model"]["rho"] == 0.3
    assert state["config"]["train"]["epochs"] == EPOCHS
    assert state["scheduler"]["last_epoch"] == EPOCHS  # StepLR stepped once per epoch, across restarts
    # lr_drop=1: divided by 10 after every epoch, from the sqrt(global_batch 4 / 16)-scaled base rate
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-4 * 0.5 * 0.1 ** EPOCHS)
    assert {g["name"] for g in state["optimizer"]["param_groups"]} == {"main", "backbone", "linear_proj"}

    from model import build
    from model.checkpoint import load_weights

    model, _, _ = build(run["cfg"].model, run["cfg"].loss)
    load_weights(model, local)
    assert torch.equal(model.state_dict()["class_embed.0.weight"], state["model"]["class_embed.0.weight"])


def test_summary_and_printed_result(run):
    summary, lines = run["summary"], run["lines"]
    assert summary["AP"] == run["mlflow_run"].data.metrics["AP"]
    assert summary["best_checkpoint"] and (run["root"] / "runs" / "tiny" / "best" / "checkpoint.pt").is_file()
    url = f"http://127.0.0.1:5000/#/experiments/{summary['experiment_id']}/runs/{summary['mlflow_run_id']}"
    assert summary["run_url"] == url
    assert any(line.startswith("sdo: run tiny finished: AP=") for line in lines)
    assert f"sdo: MLflow run: {url}" in lines


def test_existing_name_is_refused_without_resume(run):
    with pytest.raises(FileExistsError, match="--resume"):
        launch(run["cfg"], cluster="local", name="tiny", echo=lambda _: None)


def test_sdo_eval_scores_sdo_and_official_checkpoints_alike(run, tmp_path):
    """`sdo eval` on the run's best checkpoint, and on the same weights saved the official way."""
    import json

    from click.testing import CliRunner

    from orchestrator.cli import main

    best = run["root"] / "runs" / "tiny" / "best"
    official = tmp_path / "official.pth"
    torch.save({"model": checkpoints.load(best)["model"], "epoch": 7}, official)
    config = str(run["root"] / "tiny.yaml")
    outputs = []
    for checkpoint in (best, official):
        result = CliRunner().invoke(main, ["eval", "--config", config, "--checkpoint", str(checkpoint),
                                           "--out", str(tmp_path / "m.json")])
        assert result.exit_code == 0, result.output
        outputs.append(json.loads((tmp_path / "m.json").read_text()))
    assert outputs[0] == outputs[1]
    assert set(outputs[0]) >= {"AP", "AP50", "AP75", "AR100"}
    assert all(0.0 <= v <= 1.0 or v == -1.0 for v in outputs[0].values())
