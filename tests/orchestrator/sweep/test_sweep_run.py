"""End to end through the real CLI: `sdo sweep` with real trainings (Ray Tune -> Ray Train -> MLflow sqlite).

Two small sweeps of the same config serve every assertion (Ray start-up dominates the cost): 2 trials
(rho grid x a sampled encoder-aux weight), 1 worker each, one at a time. "whole" runs uninterrupted.
"demo" gets a Ctrl-C (SIGINT to its process group, as a terminal sends it) once its second trial has
started (its MLflow child run exists); `sdo sweep --resume` then finishes it. Every trial must end
terminal with exactly one child run, the finished trial's run must be left alone by the resume, the
interrupted + resumed sweep must equal the whole one (table, best trial, Pareto front, child tags, every
trial's loss curve), and no process may outlive any of the three commands.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from train_helpers import left_in_session, make_shards, tiny_config

from orchestrator.sweep.runs import STATE_FILE

NAME = "demo"
WHOLE = "whole"
RHOS = [0.1, 0.3]


def _sdo(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "sweep", *args]


def _started_trials(trials_dir: Path) -> list[Path]:
    return sorted(p.parent for p in trials_dir.glob("*/sdo_run.json"))


def _finish(process: subprocess.Popen, timeout: float = 480) -> tuple[subprocess.CompletedProcess, list]:
    """Wait for ``process`` -> (its outcome, the processes of its session still alive a little later)."""
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), left_in_session(process.pid)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    shards = make_shards(root)
    tiny_config(root / "tiny.yaml", shards, root / "runs", num_workers=1)
    config = root / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "base": "tiny.yaml",
        "data": {"train_shards": "shards/train", "val_shards": "shards/val"},  # relative to the cwd, as users write them
        "sweep": {"space": {"model.rho": {"grid": RHOS}, "loss.enc_aux_coef": {"choice": [0.5, 2.0]}},
                  "max_concurrent": 1, "max_epochs": 2, "grace_period": 1, "reduction_factor": 2},
    }))
    left = {}
    # start_new_session: each command's pid is its session id, which every process it starts inherits
    whole, left["whole"] = _finish(subprocess.Popen(_sdo("--config", str(config), "--name", WHOLE), cwd=root,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                    start_new_session=True))

    directory = root / "runs" / "sweeps" / NAME
    log1 = (root / "first.log").open("w")
    first = subprocess.Popen(_sdo("--config", str(config), "--name", NAME), cwd=root, stdout=log1,
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 420
    while len(_started_trials(directory / "trials")) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    started = _started_trials(directory / "trials")
    assert len(started) == 2, (root / "first.log").read_text()[-3000:]
    before = {p.name: json.loads((p / "sdo_run.json").read_text())["mlflow_run_id"] for p in started}
    os.killpg(first.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    first_rc = first.wait(timeout=240)
    log1.close()
    left["interrupted"] = left_in_session(first.pid)
    resumed, left["resumed"] = _finish(subprocess.Popen(_sdo("--config", str(config), "--name", NAME, "--resume"),
                                                        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                        text=True, start_new_session=True))
    state = json.loads((directory / STATE_FILE).read_text())
    return {"root": root, "dir": directory, "first_rc": first_rc, "first_log": (root / "first.log").read_text(),
            "resumed": resumed, "whole": whole,
            "before": before, "state": state, "client": MlflowClient(state["tracking_uri"]), "left": left}


def test_interrupted_then_resumed_to_the_end(sweep):
    assert sweep["first_rc"] == 130, sweep["first_log"][-3000:]
    assert f"continue it with --name {NAME} --resume" in sweep["first_log"]
    resumed = sweep["resumed"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials = json.loads((sweep["dir"] / "report" / "trials.json").read_text())["trials"]
    assert len(trials) == 2
    assert all(t["status"] in ("completed", "stopped early") for t in trials), trials
    assert sorted(t["params"]["model.rho"] for t in trials) == RHOS
    assert all(t["params"]["loss.enc_aux_coef"] in (0.5, 2.0) for t in trials)
    assert all(t["gflops"] > 0 and t["img_per_s"] > 0 and t["AP"] is not None for t in trials)
    # GFLOPs grow with the keep ratio (same network otherwise)
    by_rho = {t["params"]["model.rho"]: t["gflops"] for t in trials}
    assert by_rho[0.1] < by_rho[0.3]
    assert "Pareto front (AP max, GFLOPs min): " in resumed.stdout


def test_one_parent_and_one_child_per_trial_no_duplicates(sweep):
    client, state = sweep["client"], sweep["state"]
    everything = client.search_runs([state["experiment_id"]], run_view_type=ViewType.ALL)
    parents = [r for r in everything if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.run_name for r in parents) == sorted([NAME, WHOLE])  # the experiment holds both sweeps
    parent_ids = {r.info.run_id for r in parents if r.info.run_name == NAME}
    runs = [r for r in everything if r.info.run_id in parent_ids or r.data.tags.get("mlflow.parentRunId") in parent_ids]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == state["mlflow_run_id"]]
    assert parent_ids == {state["mlflow_run_id"]}
    assert len(runs) == 1 + 2 and len(children) == 2
    # both trials' runs are the ones created before the interruption: resumed, not duplicated
    assert {r.info.run_name: r.info.run_id for r in children} == sweep["before"]
    trials = {t["run_name"]: t for t in json.loads((sweep["dir"] / "report" / "trials.json").read_text())["trials"]}
    for run in children:
        trial = trials[run.info.run_name]
        assert run.data.params["model.rho"] == str(trial["params"]["model.rho"])
        assert run.data.params["loss.enc_aux_coef"] == str(trial["params"]["loss.enc_aux_coef"])
        assert run.data.params["train.epochs"] == "2"
        assert run.data.tags["sdo.trial_id"] == trial["trial"]
        assert run.data.tags["sdo.sweep.status"] == trial["status"]
        # stopped early is a normal end: FINISHED, with a tag (issue 26)
        assert run.info.status == "FINISHED"
        assert run.data.tags.get("sdo.stopped_early") == ("true" if trial["status"] == "stopped early" else None)
        assert "val/AP" in run.data.metrics and run.data.metrics["model/GFLOPs"] == pytest.approx(trial["gflops"])
        assert run.data.tags["sdo.flops_size"] == "850x1040"
        assert run.data.tags["sdo.pareto"] == str(trial["pareto"]).lower()
        # an MLflow Model only for a completed trial on the front; a trial stopped early keeps no checkpoint
        kept = trial["pareto"] and trial["status"] == "completed"
        assert ("sdo.model_uri" in run.data.tags) == kept, trial
        if trial["status"] == "stopped early":
            assert not list((sweep["dir"] / "trials" / run.info.run_name).glob("checkpoint_*"))


def test_parent_run_records_space_best_trial_and_report(sweep):
    client, state = sweep["client"], sweep["state"]
    parent = client.get_run(state["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.model.rho"] == f"grid {RHOS}"
    assert parent.data.params["space.loss.enc_aux_coef"] == "choice [0.5, 2.0]"
    assert parent.data.params["sweep.budget_epochs"] == "2"
    assert parent.data.params["sweep.flops_size"] == "850x1040"
    assert "rho" not in parent.data.tags
    trials = json.loads((sweep["dir"] / "report" / "trials.json").read_text())
    assert parent.data.tags["best_trial"] == trials["best"]["trial"]
    assert parent.data.metrics["best_AP"] == pytest.approx(max(t["AP"] for t in trials["trials"]))
    # the interrupted sweep logged its summary after 1 ended trial, the resumed one after 2: no step twice (issue 26)
    for key in ("best_AP", "epochs_run", "epochs_saved", "trials_stopped_early"):
        steps = [m.step for m in client.get_metric_history(parent.info.run_id, key)]
        assert len(steps) == len(set(steps)) and max(steps) == 2, (key, steps)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/pareto.png", "report/trials.csv", "report/pareto.csv", "report/report.md"} <= artifacts


def test_starting_an_existing_sweep_without_resume_exits_2(sweep):
    again = subprocess.run(_sdo("--config", str(sweep["root"] / "sweep.yaml"), "--name", NAME), cwd=sweep["root"],
                           capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 2
    assert f"sdo: error: sweep '{NAME}' already exists" in again.stderr


def _report(sweep, name: str) -> dict:
    return json.loads((sweep["root"] / "runs" / "sweeps" / name / "report" / "trials.json").read_text())


def _by_rho(rows: list[dict]) -> dict[float, dict]:
    return {row["params"]["model.rho"]: row for row in rows}


OUTCOME = ("status", "epochs", "AP", "AP50", "gflops", "params")


def test_an_interrupted_and_resumed_sweep_equals_the_whole_one(sweep):
    assert sweep["whole"].returncode == 0, sweep["whole"].stderr[-3000:]
    whole, resumed = _report(sweep, WHOLE), _report(sweep, NAME)
    # the seeded search samples the same trials, and each ends the same way with the same scores
    whole_rows, resumed_rows = _by_rho(whole["trials"]), _by_rho(resumed["trials"])
    assert whole_rows.keys() == resumed_rows.keys() == set(RHOS)
    for rho in RHOS:
        assert {k: resumed_rows[rho][k] for k in OUTCOME} == {k: whole_rows[rho][k] for k in OUTCOME}, rho
    assert resumed["best"]["params"] == whole["best"]["params"]
    assert [r["params"] for r in resumed["front"]] == [r["params"] for r in whole["front"]]
    client = sweep["client"]
    for rho in RHOS:
        runs = {name: client.get_run(_by_rho(report["trials"])[rho]["run_id"])
                for name, report in ((WHOLE, whole), (NAME, resumed))}
        tags = {name: {k: v for k, v in run.data.tags.items() if k in ("sdo.sweep.status", "sdo.sweep.best")}
                for name, run in runs.items()}
        assert tags[NAME] == tags[WHOLE] and len(tags[NAME]) == 2, rho
        assert runs[NAME].info.status == runs[WHOLE].info.status
        # the trial interrupted mid-training resumed at its exact step, with its RNG: the same loss curve
        curves = {name: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"),
                                                            key=lambda m: m.step)] for name, run in runs.items()}
        assert curves[NAME] and [s for s, _ in curves[NAME]] == [s for s, _ in curves[WHOLE]], rho
        assert [v for _, v in curves[NAME]] == pytest.approx([v for _, v in curves[WHOLE]], rel=1e-5), rho


def test_no_process_outlives_sdo_sweep(sweep):
    """After a normal end, after Ctrl-C, and after the resumed run: nothing of the command's session is alive."""
    assert sweep["left"] == {"whole": [], "interrupted": [], "resumed": []}
