"""`sdo bench gpu-check`: the GPU command lines are valid `sdo` invocations, the report and its table, the
no-GPU refusal (the stages themselves run in `--cpu-dry-run`; here only what needs no heavy work)."""
import json

import pytest
import torch

from orchestrator.bench import gpu_check
from orchestrator.bench.model import Setting
from orchestrator.cli.bench import bench


@pytest.mark.parametrize("dry_run", [False, True])
def test_stage_command_lines_parse(dry_run):
    commands = {"model": gpu_check.model_bench_args(dry_run),
                "train": gpu_check.train_bench_args(dry_run, reference="."),
                "overfit": ["--device", "cuda", "--precisions", "fp32,tf32,bf16"]}
    for name, args in commands.items():
        context = bench.commands[name].make_context(name, [*args, "--out", "x.json"])
        assert context.params["out"] == "x.json"
    assert Setting.parse(gpu_check.BEST_INFERENCE).mode == "cudagraphs"


def test_refuses_without_cuda_unless_dry_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        gpu_check.run(tmp_path / "r.json", stages=("env",))
    with pytest.raises(ValueError, match="--stages"):
        gpu_check.run(tmp_path / "r.json", stages=("env", "bogus"), dry_run=True)


def test_report_is_written_per_stage_and_a_failing_stage_does_not_stop_the_next(tmp_path):
    out = tmp_path / "check" / "gpu_check.json"
    lines = []
    report = gpu_check.run(out, stages=("env", "build"), dry_run=True, build=False, echo=lines.append)
    assert json.loads(out.read_text())["stages"].keys() == {"env", "build"}
    assert report["stages"]["env"]["ok"] and "torch" in report["stages"]["env"]
    assert "--no-build" in report["stages"]["build"]["skipped"]
    assert out.with_suffix(".log").read_text().count("ops status") == 1
    assert any(line.startswith("stage env") for line in lines[-1].splitlines())


def test_summary_rows_carry_the_figures():
    report = {"stages": {
        "env": {"ok": True, "seconds": 1.0, "gpu": "H200", "capability": "9.0", "torch": "2.11"},
        "tests": {"ok": False, "seconds": 9.0, "tests": 9, "failures": 1, "errors": 0, "skipped": 2},
        "model": {"ok": True, "seconds": 90.0, "report": {"cells": [
            {"setting": "native-cudagraphs-bf16", "rho": 0.1, "batch": 4, "fps": 251.25}]}},
        "train": {"ok": True, "seconds": 60.0, "report": {"modes": [
            {"mode": "bf16", "images_per_s": 41.0, "gpu_busy_pct": 82.4, "cuda_launches": 3000, "cuda_syncs": 3,
             "peak_memory_gib": 20.5, "aten_ops": 5000, "local_scalar_dense": 2, "loss_first": 60.0,
             "loss_last": 50.0},
            {"mode": "reference:fp32", "error": "RuntimeError: boom"}]}},
        "overfit": {"ok": True, "seconds": 30.0, "report": {"runs": [
            {"precision": "bf16", "AP50": 1.0, "AP": 0.9, "loss_curve": [[1, 60.0], [150, 2.0]],
             "median_step_s": 0.05}]}}}}
    table = dict(gpu_check.summary_rows(report))
    assert table["stage tests"] == "FAILED 9.0 s"
    assert table["cuda tests"] == "9 run, 1 failed, 2 skipped"
    assert table["infer native-cudagraphs-bf16 rho0.1 b4"] == "251.2 FPS"
    assert table["train bf16"].startswith("41.0 img/s, busy 82%, 3000 launches, 3 syncs, 20.5 GiB")
    assert table["train reference:fp32"] == "error: RuntimeError: boom"
    assert table["overfit bf16"] == "AP50 1.000, AP 0.900, loss 60.00->2.00, 50 ms/step"
    assert "infer native-cudagraphs-bf16 rho0.1 b4  251.2 FPS" in gpu_check.format_table(gpu_check.summary_rows(report))
