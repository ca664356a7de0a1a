"""`sdo bench demo` reads a run's eval json files (as the training loop writes them) into the AP curve
and fails, after writing its JSON, when the demo did not learn enough or took too long."""
from __future__ import annotations

import json

from click.testing import CliRunner

from orchestrator.cli.app import main
from orchestrator.train.evaluation import write_eval_json


def _run_dir(tmp_path, ap50s):
    run_dir = tmp_path / "runs" / "demo-check"
    for epoch, ap50 in enumerate(ap50s):
        write_eval_json(run_dir / "eval" / f"epoch_{epoch:04d}.json", {"AP": ap50 / 2, "AP50": ap50, "dam_recall": 0.5},
                        epoch=epoch, num_predictions=10)
    return run_dir


def test_report_holds_the_curve_and_passes_above_the_bar(tmp_path):
    run_dir = _run_dir(tmp_path, [0.1, 0.4, 0.62])
    out = tmp_path / "check.json"
    result = CliRunner().invoke(main, ["bench", "demo", "--run-dir", str(run_dir), "--started-at", "0",
                                       "--min-ap50", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [(p["epoch"], p["AP50"]) for p in report["curve"]] == [(0, 0.1), (1, 0.4), (2, 0.62)]
    assert report["final"]["AP50"] == 0.62 and report["final"]["dam_recall"] == 0.5
    assert report["passed"] is True and report["wall_seconds"] > 0
    assert len(report["machine"]["load_average_1_5_15"]) == 3


def test_fails_below_the_bar_or_over_the_time_after_writing_the_json(tmp_path):
    run_dir = _run_dir(tmp_path, [0.1, 0.3])
    out = tmp_path / "check.json"
    result = CliRunner().invoke(main, ["bench", "demo", "--run-dir", str(run_dir), "--started-at", "0",
                                       "--max-seconds", "60", "--out", str(out)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("sdo: failed: demo check: final AP50 0.300 < 0.5; wall time")
    assert json.loads(out.read_text())["failures"][0] == "final AP50 0.300 < 0.5"
