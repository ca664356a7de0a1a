"""End to end on real Ray Train + real MLflow (sqlite) + real shards: a tiny 2-worker CPU run.

One run serves every assertion (Ray start-up dominates the cost). Rank 1 is made to exit at global
step 3 (`train.crash_at_step`), i.e. in epoch 1 after the epoch-0 checkpoint: the worker group
restarts from that checkpoint and finishes epoch 1. Then the finished run is continued with
``resume=True`` and one more epoch. Together they prove the normal path (params, per-step metrics,
checkpoint artifacts, plots), fault tolerance and resume, all in one MLflow run.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from train_helpers import free_port, make_shards, tiny_config

from orchestrator.cluster.dispatch import train_on
from orchestrator.cluster.local import ray_session
from orchestrator.config import flatten
from orchestrator.run import checkpoints
from orchestrator.run.directory import CRASH_MARKER
from orchestrator.train.console import set_verbose

CRASH_STEP = 3
EPOCHS = 3  # 2 in the first launch, 1 more after --resume
STEPS = 2  # per epoch (train.max_steps_per_epoch)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    shards = make_shards(root)
    _, cfg = tiny_config(root / "tiny.yaml", shards, root / "runs", crash_at_step=CRASH_STEP)
    lines, stdout = [], io.StringIO()
    set_verbose(False)  # what `sdo launch` without -v shows
    with ray_session(cfg), contextlib.redirect_stdout(stdout):  # one Ray instance for both launches
        first = train_on(cfg, cluster="local", name="tiny", echo=lines.append)
        first_status = MlflowClient(first["run"].tracking_uri).get_run(first["mlflow_run_id"]).info.status
        cfg.train.epochs = EPOCHS
        summary = train_on(cfg, cluster="local", name="tiny", resume=True, echo=lines.append)
    client = MlflowClient(summary["run"].tracking_uri)
    return {"cfg": cfg, "first": first, "first_status": first_status, "summary": summary, "lines": lines,
            "stdout": stdout.getvalue(), "client": client, "root": root,
            "mlflow_run": client.get_run(summary["mlflow_run_id"])}


def _artifacts(client, run_id, path=None):
    out = []
    for item in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, item.path) if item.is_dir else [item.path])
    return out


def test_one_finished_mlflow_run_despite_the_crash_and_the_resume(run):
    client, summary = run["client"], run["summary"]
    assert run["first_status"] == "FINISHED"
    assert run["first"]["mlflow_run_id"] == summary["mlflow_run_id"]
    runs = client.search_runs([summary["run"].experiment_id], run_view_type=3)  # ViewType.ALL
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED"
    assert (run["root"] / "runs" / "tiny" / CRASH_MARKER).is_file()  # the hook really fired
    # restarted from epoch 0's checkpoint after the crash, from epoch 1's on --resume
    resumed = client.get_metric_history(summary["mlflow_run_id"], "train/resumed_from_epoch")
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
        steps = sorted({m.step for m in client.get_metric_history(run_id, f"train/{key}")})
        assert steps == list(range(1, total_steps + 1)), key
        # steps 3-4 ran twice (before and after the crash), yet each (metric, step) is stored once
        assert len(client.get_metric_history(run_id, f"train/{key}")) == total_steps, key
    for key in ("train/img_per_s", "train/epoch_time", "train/epoch_loss", "val/AP", "val/AP50"):
        history = client.get_metric_history(run_id, key)
        # train/* by global step, val/* by epoch (its charts read per epoch)
        expected = [1, 2, 3] if key.startswith("val/") else [STEPS, 2 * STEPS, 3 * STEPS]
        assert sorted(m.step for m in history) == expected, key
        assert all(m.value >= 0 for m in history)
    ap = [m.value for m in client.get_metric_history(run_id, "val/AP")]
    assert all(0.0 <= v <= 1.0 for v in ap)
    # dam_recall: one value per evaluated epoch, stepped by epoch, as in the eval json
    recall = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/dam_recall"))
    assert [step for step, _ in recall] == [1, 2, 3]
    assert all(0.0 < value <= 1.0 for _, value in recall)
    stored = json.loads((run["root"] / "runs" / "tiny" / "eval" / "epoch_0002.json").read_text())
    assert stored["metrics"]["dam_recall"] == pytest.approx(recall[-1][1])
    metrics = run["mlflow_run"].data.metrics
    assert metrics["model/params_M"] > 0 and metrics["model/GFLOPs"] > 0
    assert run["mlflow_run"].data.tags["sdo.flops_size"] == "850x1040"  # the paper's size, whatever the run evaluates at
    # MLflow system metrics, one node id per worker node (one node here)
    assert "system/node_0/cpu_utilization_percentage" in metrics
    assert not any(key.startswith("system/") and not key.startswith("system/node_0/") for key in metrics)


def test_run_records_its_source_and_datasets(run):
    mlflow_run = run["mlflow_run"]
    tags = mlflow_run.data.tags
    assert tags["mlflow.source.name"] == "sdo launch" and tags["mlflow.source.type"] == "LOCAL"
    assert tags.get("mlflow.source.git.commit", tags["git_commit"]) == tags["git_commit"]
    inputs = {d.dataset.name: d for d in mlflow_run.inputs.dataset_inputs}
    assert set(inputs) == {"train_shards", "val_shards"}
    for split, count in (("train", 16), ("val", 8)):
        dataset = inputs[f"{split}_shards"].dataset
        assert json.loads(dataset.profile)["num_samples"] == count
        assert json.loads(dataset.source)["uri"] == str(run["root"] / "shards" / split)
        assert len(dataset.digest) == 16
    contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in inputs.items()}
    assert contexts == {"train_shards": "training", "val_shards": "validation"}
    experiment = run["client"].get_experiment(run["summary"]["run"].experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "metrics.`val/AP`" in json.loads(experiment.tags["mlflow.sharedViewState.sdo"])["selectedColumns"]


def test_artifacts_and_the_checkpoints_on_disk(run):
    client, run_id = run["client"], run["summary"]["mlflow_run_id"]
    names = _artifacts(client, run_id)
    for name in ("config.yaml", "model/MLmodel", "eval/epoch_0000.json", "eval/epoch_0001.json",
                 "eval/epoch_0002.json", "plots/loss_curves.png", "plots/ap_per_epoch.png"):
        assert name in names, name
    # drawn at every eval, one folder per epoch (tiny_config: one prediction and one DAM picture)
    for epoch in range(EPOCHS):
        for folder in (f"plots/dam/epoch_{epoch:04d}/", f"plots/predictions/epoch_{epoch:04d}/"):
            assert len([n for n in names if n.startswith(folder) and n.endswith(".png")]) == 1, folder
    assert not [n for n in names if n.startswith("checkpoints/")]  # optimizer state stays in the run directory
    run_dir = run["root"] / "runs" / "tiny"
    kept = sorted(p.name for p in run_dir.glob("checkpoint_step*"))
    assert 1 <= len(kept) <= run["cfg"].checkpoint.keep, kept
    best = run_dir / "best"
    assert best.is_symlink() and best.resolve().parent == run_dir.resolve() and best.resolve().name in kept
    local = run["summary"]["checkpoint"]  # the latest of Ray Train's checkpoints
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

    model, _ = build(run["cfg"].model, run["cfg"].loss)
    load_weights(model, Path(local) / checkpoints.CHECKPOINT_FILE)
    assert torch.equal(model.state_dict()["class_embed.0.weight"], state["model"]["class_embed.0.weight"])


def test_summary_and_printed_result(run):
    summary, lines = run["summary"], run["lines"]
    assert summary["AP"] == run["mlflow_run"].data.metrics["val/AP"]
    assert summary["best_checkpoint"] and (run["root"] / "runs" / "tiny" / "best" / "checkpoint.pt").is_file()
    url = (f"http://127.0.0.1:5000/#/experiments/{summary['run'].experiment_id}/runs/{summary['mlflow_run_id']}"
           "?workflowType=machine_learning")  # MLflow 3 opens the GenAI view without it
    assert summary["run_url"] == url
    assert any(line.startswith("sdo: run tiny finished: AP=") for line in lines)
    assert f"sdo: MLflow run: {url}" in lines


def test_existing_name_is_refused_without_resume(run):
    with pytest.raises(FileExistsError, match="--resume"):
        train_on(run["cfg"], cluster="local", name="tiny", echo=lambda _: None)


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


EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+)  loss ([\d.]+)  AP ([\d.]+) \(best ([\d.]+) @ (\d+)\)  \d+ s$", re.MULTILINE)


def test_log_txt_keeps_the_epoch_lines_with_mlflows_values_and_the_console_hides_ray(run):
    client, run_id = run["client"], run["summary"]["mlflow_run_id"]
    log = (run["root"] / "runs" / "tiny" / "log.txt").read_text()
    printed = {int(m[0]): m for m in EPOCH_LINE.findall(log)}  # the restarted epoch 2 is printed once, after it
    assert sorted(printed) == [1, 2, 3]
    losses = {m.step // STEPS: m.value for m in client.get_metric_history(run_id, "train/epoch_loss")}
    aps = {m.step: m.value for m in client.get_metric_history(run_id, "val/AP")}
    best = (-1.0, 0)
    for epoch, (_, _, loss, ap, best_ap, best_epoch) in sorted(printed.items()):
        assert (loss, ap) == (f"{losses[epoch]:.2f}", f"{aps[epoch]:.3f}"), epoch
        best = max(best, (aps[epoch], -epoch))
        assert (best_ap, int(best_epoch)) == (f"{best[0]:.3f}", -best[1]), epoch
    assert re.search(r"^epoch 1/2  step 2/2  loss [\d.]+  lr [\d.e+-]+  [\d.]+ img/s  ETA \d+:\d\d$", log, re.MULTILINE)
    assert "Reporting training result" in log  # the workers' output is in log.txt ...
    stdout = run["stdout"]
    assert "Reporting training result" not in stdout and "Checkpoint successfully created" not in stdout  # ... not here
    assert f"sdo: MLflow run: {run['summary']['run_url']}" in stdout.splitlines()[:2]  # said at the start
    assert EPOCH_LINE.search(stdout)


def _chromium() -> str | None:
    """A Chromium for playwright: $SDO_CHROMIUM, the system's (apt `chromium`), else playwright's own."""
    import shutil

    for candidate in (os.environ.get("SDO_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    return None


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("SDO_SCREENSHOT_DIR"):
        target = Path(os.environ["SDO_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target / name), full_page=True)
    return path


def _playwright_browser() -> bool:
    """Whether `playwright install chromium` has put a browser in its cache."""
    cache = Path(os.environ.get("PLAYWRIGHT_BROWSERS_PATH") or Path.home() / ".cache" / "ms-playwright")
    return any(cache.glob("chromium*"))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(not _importable("playwright") or (_chromium() is None and not _playwright_browser()),
                    reason="no playwright or no Chromium (`just browser` installs one where it can)")
def test_sdo_ui_in_a_browser_shows_the_run_with_its_ap_and_a_dam_picture(run, tmp_path):
    """`sdo ui` (the command itself) on the finished run, driven by headless Chromium."""
    from playwright import sync_api

    executable = _chromium()
    summary = run["summary"]
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--storage", str(run["root"] / "runs"),
                           "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          start_new_session=True)
    try:
        printed = [ui.stdout.readline() for _ in range(2)]
        [experiment_url] = [line.rsplit(" ", 1)[1].strip() for line in printed if line.startswith("sdo: experiment ")]
        assert experiment_url.startswith(f"http://127.0.0.1:{port}/#/experiments/{summary['run'].experiment_id}/runs?")
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            _wait_for_ui(port)
            page.goto(experiment_url)  # the URL sdo prints: Model-training view, sdo's columns
            page.get_by_role("link", name="tiny", exact=True).wait_for(timeout=60_000)
            page.get_by_text("val/AP", exact=True).first.wait_for(timeout=10_000)
            header = page.locator("[role=columnheader]").all_inner_texts()
            assert any(text.strip() == "val/AP" for text in header), header
            _screenshot(page, tmp_path, "runs_table.png")

            # the run's artifacts view (the URL sdo prints, on this port): open a DAM picture in the tree
            dam = min(_artifacts(run["client"], summary["mlflow_run_id"], "plots/dam"))
            page.goto(summary["run_url"].replace(":5000/", f":{port}/").replace("?", "/artifacts?", 1))
            for name in dam.split("/"):  # plots / dam / epoch_NNNN / dam_imageK.png
                page.get_by_text(name, exact=True).first.click(timeout=90_000)
            # MLflow shows an image artifact as a blob: URL once it is downloaded and decoded
            rendered = ("() => Math.max(0, ...[...document.images].filter(i => i.src.startsWith('blob:') && "
                        "i.complete).map(i => i.naturalWidth))")
            page.wait_for_function(f"({rendered})() > 0", timeout=60_000)
            assert page.evaluate(rendered) > 0
            _screenshot(page, tmp_path, "dam_artifact.png")
            browser.close()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def _wait_for_ui(port: int, timeout: float = 90) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
