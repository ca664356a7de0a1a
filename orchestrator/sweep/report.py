"""The end-of-sweep report: one row per trial, the Pareto front of AP vs GFLOPs, files for MLflow.

A row is a plain dict (so the report can be built and tested without Ray)::

    {'trial': 'a1b2c_00000', 'status': 'completed' | 'stopped early' | 'error' | 'pending' | 'running',
     'params': {'model.rho': 0.1, 'loss.enc_aux_coef': 1.0, ...},   # first-class knobs + swept keys
     'AP': best AP over the trial's epochs, 'AP50': AP50 of that epoch, 'gflops': float,
     'img_per_s': median training throughput, 'epochs': epochs run, 'run_id': MLflow child run id}
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from orchestrator.sweep.pareto import pareto_front, plot_front

# Column titles of the first-class knobs (any other swept key is shown by its last name part).
SHORT_NAMES = {
    "model.rho": "rho",
    "loss.enc_aux_coef": "enc_aux",
    "loss.mask_prediction_coef": "dam",
    "loss.cls_coef": "cls",
    "loss.bbox_coef": "bbox",
    "loss.giou_coef": "giou",
}
TERMINAL = ("completed", "stopped early", "error")


def trial_status(tune_status: str, epochs_run: int, budget: int) -> str:
    """Tune's trial status -> the report's: a TERMINATED trial short of its budget was stopped by the scheduler."""
    if tune_status == "TERMINATED":
        return "completed" if epochs_run >= budget else "stopped early"
    if tune_status == "ERROR":
        return "error"
    return tune_status.lower()


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def summarize_history(history: Sequence[dict], metric: str = "AP", mode: str = "max") -> dict:
    """Per-epoch reports of one trial -> {'AP', 'AP50' (of the best epoch), 'img_per_s' (median), 'epochs'}.

    Epochs run = the highest reported 0-based 'epoch' + 1 (a trial resumed from a checkpoint reports
    each epoch once; a re-reported epoch is not counted twice).
    """
    epochs = [int(h["epoch"]) for h in history if _finite(h.get("epoch")) is not None]
    scored = [h for h in history if _finite(h.get(metric)) is not None]
    best = None
    if scored:
        pick = max if mode == "max" else min
        best = pick(scored, key=lambda h: float(h[metric]))
    speeds = [float(h["img_per_s"]) for h in history if _finite(h.get("img_per_s")) is not None]
    return {
        "AP": _finite(best.get("AP")) if best else None,
        "AP50": _finite(best.get("AP50")) if best else None,
        "img_per_s": statistics.median(speeds) if speeds else None,
        "epochs": max(epochs) + 1 if epochs else 0,
    }


def param_columns(rows: Sequence[dict]) -> list[str]:
    """First-class knobs first (in SHORT_NAMES order), then any other swept key, sorted."""
    keys = {k for r in rows for k in r.get("params", {})}
    first = [k for k in SHORT_NAMES if k in keys]
    return first + sorted(keys - set(first))


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.1f}"
    return str(value)


def _fixed(value, decimals: int) -> str:
    return "-" if _finite(value) is None else f"{float(value):.{decimals}f}"


def table_rows(rows: Sequence[dict], keys: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the trial table."""
    keys = param_columns(rows) if keys is None else keys
    header = ["trial", *[SHORT_NAMES.get(k, k.rsplit(".", 1)[-1]) for k in keys],
              "AP", "AP50", "GFLOPs", "img/s", "epochs", "status"]
    cells = []
    for r in rows:
        params = r.get("params", {})
        cells.append([str(r["trial"]), *[_fmt(params.get(k)) for k in keys], _fixed(r.get("AP"), 4),
                      _fixed(r.get("AP50"), 4), _fixed(r.get("gflops"), 2 if (r.get("gflops") or 0) >= 10 else 4),
                      _fixed(r.get("img_per_s"), 1), _fmt(r.get("epochs")), r.get("status", "")])
    return header, cells


def format_table(header: list[str], cells: list[list[str]]) -> str:
    """Fixed-width text table (also valid Markdown)."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(c) for c in cells)])


def best_trial(rows: Sequence[dict], metric: str = "AP", mode: str = "max") -> dict | None:
    """The row with the best ``metric`` (None when no trial reported it)."""
    scored = [r for r in rows if _finite(r.get(metric)) is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: float(r[metric]))


def epochs_saved(rows: Sequence[dict], budget: int) -> dict:
    """Trial-epochs the scheduler saved against running every trial for its full budget."""
    full = budget * len(rows)
    run = sum(int(r.get("epochs") or 0) for r in rows)
    return {"full_grid_epochs": full, "epochs_run": run, "epochs_saved": full - run,
            "stopped_early": sum(r.get("status") == "stopped early" for r in rows)}


def _write_csv(path: Path, header: list[str], cells: Iterable[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(cells)
    return path


def build_report(rows: Sequence[dict], *, budget: int, metric: str = "AP", mode: str = "max",
                 flops_size: tuple[int, int] | None = None) -> dict:
    """Everything the report shows: tables as text, the front, the best trial, epochs saved."""
    keys = param_columns(rows)
    header, cells = table_rows(rows, keys)
    front = pareto_front(rows, cost="gflops", gain="AP")
    front_header, front_cells = table_rows(front, keys)
    size = f" (GFLOPs of one {flops_size[0]}x{flops_size[1]} image)" if flops_size else ""
    return {
        "header": header, "cells": cells, "front": front, "front_header": front_header, "front_cells": front_cells,
        "best": best_trial(rows, metric, mode), "savings": epochs_saved(rows, budget),
        "text": "\n".join([f"Trials{size}:", format_table(header, cells), "",
                           "Pareto front (AP vs GFLOPs):", format_table(front_header, front_cells)]),
    }


def _point_label(row: dict) -> str:
    rho = row.get("params", {}).get("model.rho")
    return f"{row['trial']} (rho={rho:g})" if isinstance(rho, (int, float)) else str(row["trial"])


def write_report(rows: Sequence[dict], report: dict, out_dir: str | Path, *, title: str = "") -> dict[str, Path]:
    """Write trials.csv, pareto.csv, report.md, pareto.png and trials.json into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "trials_csv": _write_csv(out / "trials.csv", report["header"], report["cells"]),
        "pareto_csv": _write_csv(out / "pareto.csv", report["front_header"], report["front_cells"]),
        "pareto_png": plot_front(rows, report["front"], out / "pareto.png", title=title or "AP vs GFLOPs",
                                 label=_point_label),
    }
    (out / "report.md").write_text(report["text"] + "\n")
    paths["report_md"] = out / "report.md"
    (out / "trials.json").write_text(json.dumps({"trials": list(rows), "best": report["best"],
                                                 "front": list(report["front"]), "savings": report["savings"]}, indent=2, default=str))
    paths["trials_json"] = out / "trials.json"
    return paths
