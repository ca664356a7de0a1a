"""The sweep report on hand-made results: Pareto front, trial table, epochs saved, files."""
from __future__ import annotations

import csv

import pytest

from orchestrator.sweep.pareto import Objective, dominates, pareto_front
from orchestrator.sweep.report import (
    best_trial,
    build_report,
    epochs_saved,
    format_table,
    summarize_history,
    table_rows,
    trial_status,
    write_report,
)


def _row(trial, rho, ap, gflops, epochs=4, status="completed", **params):
    return {"trial": trial, "status": status, "params": {"model.rho": rho, "loss.enc_aux_coef": 1.0, **params},
            "AP": ap, "AP50": None if ap is None else ap + 0.2, "gflops": gflops, "img_per_s": 10.0,
            "epochs": epochs}


# Hand-made sweep: GFLOPs grow with rho; AP is not monotone. Expected front worked out by hand:
#   t1 (105.4, 0.480) cheapest; t2 (112.9, 0.486) better AP; t3 (120.5, 0.484) dominated by t2;
#   t5 (135.6, 0.490) best AP; t4 (128.0, 0.470) dominated by t2 (cheaper, better);
#   t6 ties t2 exactly (kept); t7 never evaluated (left out); t8 costs more than t5 for less AP.
ROWS = [
    _row("t1", 0.1, 0.480, 105.4),
    _row("t2", 0.2, 0.486, 112.9),
    _row("t3", 0.3, 0.484, 120.5),
    _row("t4", 0.4, 0.470, 128.0, epochs=1, status="stopped early"),
    _row("t5", 0.5, 0.490, 135.6),
    _row("t6", 0.2, 0.486, 112.9, **{"loss.cls_coef": 3.0, "train.lr": 1e-4}),
    _row("t7", 0.3, None, 120.5, epochs=0, status="error"),
    _row("t8", 0.5, 0.489, 140.0),
]


def test_pareto_front_by_hand():
    front = pareto_front(ROWS)
    assert [r["trial"] for r in front] == ["t1", "t2", "t6", "t5"]


def test_dominance_is_strict():
    a, b = _row("a", 0.1, 0.5, 100.0), _row("b", 0.1, 0.5, 100.0)
    assert not dominates(a, b) and not dominates(b, a)
    assert dominates(_row("c", 0.1, 0.5, 99.0), a)
    assert dominates(_row("d", 0.1, 0.51, 100.0), a)
    assert not dominates(_row("e", 0.1, 0.6, 120.0), a)


def test_front_of_empty_or_unscored_rows():
    assert pareto_front([]) == []
    assert pareto_front([_row("x", 0.1, None, 10.0), _row("y", 0.1, 0.3, None)]) == []
    assert [r["trial"] for r in pareto_front([_row("z", 0.1, float("nan"), 1.0), _row("w", 0.2, 0.1, 2.0)])] == ["w"]


def test_summarize_history_best_epoch_and_resumed_reports():
    history = [
        {"epoch": 0, "AP": 0.10, "AP50": 0.30, "img_per_s": 8.0},
        {"epoch": 1, "AP": 0.25, "AP50": 0.45, "img_per_s": 10.0},
        {"epoch": 1, "AP": 0.25, "AP50": 0.45, "img_per_s": 12.0},  # re-reported after a restart
        {"epoch": 2, "AP": 0.20, "AP50": 0.50, "img_per_s": 11.0},
    ]
    assert summarize_history(history) == {"AP": 0.25, "AP50": 0.45, "img_per_s": 10.5, "epochs": 3}
    assert summarize_history([]) == {"AP": None, "AP50": None, "img_per_s": None, "epochs": 0}
    assert summarize_history(history, [Objective("AP", "min")])["AP"] == 0.10
    # several objectives: each one's value at the best epoch of the first
    costly = [{**h, "latency_ms": 12.5, "loss": 1.0 / (h["epoch"] + 1)} for h in history]
    assert summarize_history(costly, [Objective("AP", "max"), Objective("latency_ms", "min"),
                                      Objective("loss", "min")]) == {
        "AP": 0.25, "AP50": 0.45, "latency_ms": 12.5, "loss": 0.5, "img_per_s": 10.5, "epochs": 3}


def test_status_best_and_savings():
    assert trial_status("TERMINATED", 4, 4) == "completed"
    assert trial_status("TERMINATED", 2, 4) == "stopped early"
    assert trial_status("ERROR", 1, 4) == "error"
    assert trial_status("PENDING", 0, 4) == "pending"
    assert best_trial(ROWS)["trial"] == "t5"
    assert best_trial([_row("n", 0.1, None, 1.0)]) is None
    # the failed t7 counts neither in the full grid nor as saved (issue 26: it was counted as 4 saved epochs)
    assert epochs_saved(ROWS, budget=4) == {"full_grid_epochs": 28, "epochs_run": 25, "epochs_saved": 3,
                                            "stopped_early": 1}
    failed_late = [*ROWS, _row("t9", 0.1, 0.9, 1.0, epochs=2, status="error")]
    assert best_trial(failed_late)["trial"] == "t5"  # a failed trial's AP is not the best
    assert epochs_saved(failed_late, budget=4) == epochs_saved(ROWS, budget=4)


def test_table_has_first_class_columns_then_other_swept_keys():
    header, cells = table_rows(ROWS)
    assert header == ["trial", "rho", "enc_aux", "cls", "lr", "AP", "AP50", "GFLOPs", "img/s", "epochs", "status"]
    t6 = cells[5]
    assert t6 == ["t6", "0.2", "1", "3", "0.0001", "0.4860", "0.6860", "112.90", "10.0", "4", "completed"]
    assert cells[0][2:5] == ["1", "-", "-"]  # keys a trial did not sweep are blank
    assert cells[6][5:8] == ["-", "-", "120.50"]  # t7: no AP
    text = format_table(header, cells)
    lines = text.splitlines()
    assert len(lines) == 2 + len(ROWS) and len({len(line) for line in lines}) == 1


def test_report_files(tmp_path):
    rows = [dict(r, params=dict(r["params"])) for r in ROWS]
    rows[6]["error"] = "ValueError: loss.cls_coef: boom"
    report = build_report(rows, budget=4, flops_size=(850, 1040))
    assert [r["trial"] for r in report["front"]] == ["t1", "t2", "t6", "t5"]
    assert [r["rank"] for r in rows] == [1, 1, 2, 3, 1, 1, None, 2]  # t7 failed: unranked
    assert [r["pareto"] for r in rows] == [True, True, False, False, True, True, False, False]
    # hypervolume by hand: AP up, GFLOPs down; reference = worst AP - 10% span, worst GFLOPs + 10% span
    ap_ref, gf_ref = 0.470 - 0.1 * 0.020, 140.0 + 0.1 * 34.6
    volume = ((112.9 - 105.4) * (0.480 - ap_ref) + (135.6 - 112.9) * (0.486 - ap_ref)
              + (gf_ref - 135.6) * (0.490 - ap_ref))
    assert report["hypervolume"] == pytest.approx(volume)
    assert "Trials (GFLOPs of one 850x1040 image):" in report["text"]
    assert "Pareto front (AP max, GFLOPs min): 4 trials, hypervolume" in report["text"]
    assert "Failed trials:\n  t7: ValueError: loss.cls_coef: boom" in report["text"]
    paths = write_report(rows, report, tmp_path / "report")
    with paths["pareto_csv"].open() as f:
        front = list(csv.DictReader(f))
    assert [r["trial"] for r in front] == ["t1", "t2", "t6", "t5"]
    assert [float(r["GFLOPs"]) for r in front] == pytest.approx([105.4, 112.9, 112.9, 135.6])
    assert {r["pareto"] for r in front} == {"yes"} and {r["rank"] for r in front} == {"1"}
    with paths["trials_csv"].open() as f:
        assert len(list(csv.DictReader(f))) == len(ROWS)
    png = paths["pareto_png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "Pareto front" in paths["report_md"].read_text()
