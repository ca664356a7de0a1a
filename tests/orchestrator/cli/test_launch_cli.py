"""`sdo launch` / `sdo eval` error paths: bad input exits 2 with one line naming the culprit, and
nothing is started or written. These fail before Ray starts, so they are fast."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from train_helpers import free_port, tiny_config

from orchestrator.cli import main


@pytest.fixture
def config(tmp_path):
    shards = {"train": tmp_path / "no-train", "val": tmp_path / "no-val"}
    path, _ = tiny_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs")
    return path


def _sdo(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def _one_error_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("sdo: error:"), output
    return lines[0]


def test_bad_cluster_kind_exits_2(config):
    code, out = _sdo("launch", "--config", str(config), "--cluster", "ray://nowhere:10001")
    assert code == 2
    assert "ray://nowhere:10001" in _one_error_line(out)


def test_unreachable_ray_cluster_exits_2(config, tmp_path):
    address = f"http://127.0.0.1:{free_port()}"
    code, out = _sdo("launch", "--config", str(config), "--cluster", address)
    assert code == 2
    line = _one_error_line(out)
    assert address in line and "no Ray dashboard" in line


def test_missing_cluster_spec_exits_2(config, tmp_path):
    code, out = _sdo("launch", "--config", str(config), "--cluster", str(tmp_path / "k8s.yaml"))
    assert code == 2
    assert "k8s.yaml" in _one_error_line(out)


def test_bad_config_key_exits_2_through_the_console_script(config):
    sdo = Path(sys.executable).with_name("sdo")
    proc = subprocess.run([str(sdo), "launch", "--config", str(config), "--set", "train.epochz=1"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "train.epochz" in _one_error_line(proc.stderr)
    assert "did you mean train.epochs" in proc.stderr


def test_bad_config_value_and_missing_file_exit_2(config, tmp_path):
    code, out = _sdo("launch", "--config", str(config), "--set", "model.rho=1.5")
    assert code == 2 and "model.rho" in _one_error_line(out)
    code, out = _sdo("launch", "--config", str(tmp_path / "absent.yaml"))
    assert code == 2 and "absent.yaml" in _one_error_line(out)


def test_missing_shards_exit_2_before_anything_is_written(config, tmp_path):
    code, out = _sdo("launch", "--config", str(config), "--name", "r")
    assert code == 2
    assert "data.train_shards" in _one_error_line(out)
    assert not (tmp_path / "runs" / "r").exists()


def test_unreachable_tracking_server_exits_2_before_training(config, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    code, out = _sdo("launch", "--config", str(config), "--name", "r", "--set", f"tracking.uri={uri}")
    assert code == 2
    line = _one_error_line(out)
    assert uri in line and "unreachable" in line
    assert not (tmp_path / "runs").exists()


def test_resume_needs_an_existing_run(config, tmp_path):
    code, out = _sdo("launch", "--config", str(config), "--resume")
    assert code == 2 and "--name" in out
    code, out = _sdo("launch", "--config", str(config), "--resume", "--name", "ghost")
    assert code == 2 and "no run named 'ghost'" in _one_error_line(out)


def test_bad_run_name_exits_2(config):
    code, out = _sdo("launch", "--config", str(config), "--name", "../escape")
    assert code == 2 and "../escape" in _one_error_line(out)


def test_eval_missing_checkpoint_exits_2(config, tmp_path):
    code, out = _sdo("eval", "--config", str(config), "--checkpoint", str(tmp_path / "none.pt"))
    assert code == 2 and "none.pt" in _one_error_line(out)


def test_ui_without_store_exits_2(tmp_path):
    code, out = _sdo("ui", "--storage", str(tmp_path / "empty"))
    assert code == 2 and "no MLflow store" in _one_error_line(out)


def test_relative_paths_are_refused_for_a_ray_jobs_cluster(config):
    address = f"http://127.0.0.1:{free_port()}"
    code, out = _sdo("launch", "--config", str(config), "--cluster", address, "--set", "train.storage_path=runs")
    assert code == 2
    line = _one_error_line(out)
    assert "train.storage_path='runs'" in line and "absolute" in line
