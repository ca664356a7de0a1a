"""A retried RayJob continues its run: same run directory, same MLflow run, latest checkpoint.

KubeRay runs the RayJob's entrypoint again, unchanged, on a fresh RayCluster after a failure
(backoffLimit). With retries sdo renders ``--resume-if-exists``, so attempt 2 finds the state attempt 1
left in train.storage_path (sdo_run.json, a real sqlite MLflow store here) and resumes it. That a
resumed run continues from its latest checkpoint is proven end to end in test_launch.py.
"""
from pathlib import Path

import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.cli.launch import run_exists
from orchestrator.cluster.kuberay.render import entrypoint
from orchestrator.config import load_config
from orchestrator.run.lifecycle import open_run

ROOT = Path(__file__).resolve().parents[3]


def test_each_attempt_finds_the_state_of_the_previous_one(tmp_path):
    cfg = load_config(None, [f"train.storage_path={tmp_path / 'runs'}"])
    command = entrypoint("launch", "r50-rho01", retries=2).split()
    assert command[-1] == "--resume-if-exists"

    assert run_exists(cfg, "r50-rho01") is False  # attempt 1: a new run
    first = open_run(cfg, name="r50-rho01", resume=False)
    assert run_exists(cfg, "r50-rho01") is True  # attempt 2 (KubeRay's retry): resume it
    again = open_run(cfg, name="r50-rho01", resume=True)
    assert again == first  # the same identity: directory, MLflow run
    client = MlflowClient(first.tracking_uri)
    runs = client.search_runs([first.experiment_id], run_view_type=3)
    assert [r.info.run_id for r in runs] == [first.run_id]  # one MLflow run across the attempts
    assert runs[0].info.status == "RUNNING"
    # no shards here: the dataset inputs are named as missing, the run is opened all the same
    assert runs[0].data.tags["sdo.dataset_inputs_missing"].startswith("train: data source runs/data/shards/train")


def test_resume_if_exists_is_decided_inside_the_job(tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  use_gpu: true\n  num_workers: 2\n")
    result = CliRunner().invoke(main, ["launch", "--config", str(tmp_path / "run.yaml"), "--cluster",
                                       str(ROOT / "deploy" / "k8s.yaml"), "--name", "x", "--resume-if-exists",
                                       "--dry-run"])
    assert result.exit_code == 2 and "--resume-if-exists is decided where the storage is" in result.output
    result = CliRunner().invoke(main, ["launch", "--config", str(tmp_path / "run.yaml"), "--name", "x",
                                       "--resume", "--resume-if-exists"])
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_local_dry_run_of_the_entrypoint_config(tmp_path):
    """The RayJob's own command line parses as the CLI (what the head pod runs)."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"storage_path": str(tmp_path / "runs")}}))
    args = entrypoint("launch", "r1", retries=1).split()[1:]
    args[args.index("--config") + 1] = str(tmp_path / "config.yaml")
    result = CliRunner().invoke(main, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["train"]["storage_path"] == str(tmp_path / "runs")


def test_the_sweep_entrypoint_with_retries_parses_as_the_cli(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "train": {"storage_path": str(tmp_path / "runs")}, "sweep": {"space": {"model.rho": {"grid": [0.1, 0.2]}}}}))
    args = entrypoint("sweep", "s1", retries=1).split()[1:]
    assert args[-1] == "--resume-if-exists"
    args[args.index("--config") + 1] = str(tmp_path / "config.yaml")
    result = CliRunner().invoke(main, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "runs" / "sweeps" / "s1").exists()  # a dry run claims nothing
