"""The end-of-sweep report: one row per trial, the Pareto front over the objectives, its hypervolume, each
trial's non-domination rank, files for MLflow.

A row is a plain dict (so the report can be built and tested without Ray)::

    {'trial': 'a1b2c_00000', 'status': 'completed' | 'stopped early' | 'error' | 'cancelled' | 'pending' | 'running',
     'params': {'model.rho': 0.1, 'loss.enc_aux_coef': 1.0, ...},   # first-class knobs + swept keys
     'AP': AP of the trial's best epoch (by the first objective), 'AP50': of that epoch, 'gflops': float,
     'latency_ms', 'latency_ms_b4': where measured, any other objective's value at that epoch,
     'img_per_s': median training throughput, 'epochs': epochs run, 'error': the cause of a failure,
     'run_id': MLflow child run id}

build_report adds 'rank' (1 = on the front; None: failed, cancelled or unscored) and 'pareto' to each row.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from orchestrator.sweep.pareto import (
    AP_VS_GFLOPS,
    Objective,
    hypervolume,
    nondominated_ranks,
    pareto_front,
    plot_front,
    reference_point,
)

# Column titles of the first-class knobs (any other swept key is shown by its last name part).
SHORT_NAMES = {
    "model.rho": "rho",
    "loss.enc_aux_coef": "enc_aux",
    "loss.mask_prediction_coef": "dam",
    "loss.cls_coef": "cls",
    "loss.bbox_coef": "bbox",
    "loss.giou_coef": "giou",
}
TERMINAL = ("completed", "stopped early", "error", "cancelled")
FINISHED = ("completed", "stopped early")  # trials whose epochs count, and (with running ones) that can be ranked
UNRANKED = ("error", "cancelled")
METRIC_TITLES = {"gflops": "GFLOPs", "latency_ms": "ms (b1)", "latency_ms_b4": "ms (b4)", "img_per_s": "img/s"}


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


def summarize_history(history: Sequence[dict], objectives: Sequence[Objective] = (Objective("AP", "max"),)) -> dict:
    """Per-epoch reports of one trial -> {'AP', 'AP50', every objective's value (of the best epoch by the first
    objective), 'img_per_s' (median), 'epochs'}.

    Epochs run = the highest reported 0-based 'epoch' + 1 (a trial resumed from a checkpoint reports
    each epoch once; a re-reported epoch is not counted twice).
    """
    first = objectives[0]
    epochs = [int(h["epoch"]) for h in history if _finite(h.get("epoch")) is not None]
    scored = [h for h in history if _finite(h.get(first.metric)) is not None]
    best = None
    if scored:
        pick = max if first.mode == "max" else min
        best = pick(scored, key=lambda h: float(h[first.metric]))
    speeds = [float(h["img_per_s"]) for h in history if _finite(h.get("img_per_s")) is not None]
    out = {key: _finite(best.get(key)) if best else None for key in ("AP", "AP50", *(o.metric for o in objectives))}
    out.update({"img_per_s": statistics.median(speeds) if speeds else None, "epochs": max(epochs) + 1 if epochs else 0})
    return out


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


def _metric_cell(key: str, value) -> str:
    if key in ("AP", "AP50") or key.startswith(("AP", "AR")):
        return _fixed(value, 4)
    if key == "gflops":
        return _fixed(value, 2 if (_finite(value) or 0) >= 10 else 4)
    if key in ("img_per_s", "latency_ms", "latency_ms_b4"):
        return _fixed(value, 1 if key == "img_per_s" else 2)
    return _fmt(_finite(value))


def metric_columns(rows: Sequence[dict], objectives: Sequence[Objective] = ()) -> list[str]:
    """AP, AP50, GFLOPs, the latencies when measured, any other objective, img/s."""
    keys = ["AP", "AP50", "gflops"]
    keys += [k for k in ("latency_ms", "latency_ms_b4") if any(_finite(r.get(k)) is not None for r in rows)]
    keys += [o.metric for o in objectives if o.metric not in keys]
    return [*keys, "img_per_s"]


def table_rows(rows: Sequence[dict], keys: list[str] | None = None,
               metrics: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the trial table; 'rank' and 'pareto' once build_report has set them."""
    keys = param_columns(rows) if keys is None else keys
    metrics = metric_columns(rows) if metrics is None else metrics
    ranked = any("rank" in r for r in rows)
    header = ["trial", *[SHORT_NAMES.get(k, k.rsplit(".", 1)[-1]) for k in keys],
              *[METRIC_TITLES.get(m, m) for m in metrics], "epochs", *(["rank", "pareto"] if ranked else []), "status"]
    cells = []
    for r in rows:
        params = r.get("params", {})
        rank = [_fmt(r.get("rank")), "yes" if r.get("pareto") else "no"] if ranked else []
        cells.append([str(r["trial"]), *[_fmt(params.get(k)) for k in keys], *[_metric_cell(m, r.get(m)) for m in metrics],
                      _fmt(r.get("epochs")), *rank, r.get("status", "")])
    return header, cells


def format_table(header: list[str], cells: list[list[str]]) -> str:
    """Fixed-width text table (also valid Markdown)."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(c) for c in cells)])


def rankable(rows: Sequence[dict]) -> list[dict]:
    """The rows a best trial or a front may come from: not failed, not cancelled by the failure limit."""
    return [r for r in rows if r.get("status") not in UNRANKED]


def best_trial(rows: Sequence[dict], metric: str = "AP", mode: str = "max") -> dict | None:
    """The row with the best ``metric`` among the trials that did not fail (None when none reported it)."""
    scored = [r for r in rankable(rows) if _finite(r.get(metric)) is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: float(r[metric]))


def epochs_saved(rows: Sequence[dict], budget: int) -> dict:
    """Trial-epochs the scheduler saved against running every finished trial (completed or stopped early) for its
    full budget; a failed or cancelled trial's epochs were not saved by anyone and are not counted."""
    finished = [r for r in rows if r.get("status") in FINISHED]
    full = budget * len(finished)
    run = sum(int(r.get("epochs") or 0) for r in finished)
    return {"full_grid_epochs": full, "epochs_run": run, "epochs_saved": full - run,
            "stopped_early": sum(r.get("status") == "stopped early" for r in rows)}


def _write_csv(path: Path, header: list[str], cells: Iterable[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(cells)
    return path


def _objective_text(objectives: Sequence[Objective]) -> str:
    return ", ".join(f"{METRIC_TITLES.get(o.metric, o.metric)} {o.mode}" for o in objectives)


def build_report(rows: Sequence[dict], *, budget: int, objectives: Sequence[Objective] = (Objective("AP", "max"),),
                 front_over: Sequence[Objective] = AP_VS_GFLOPS, flops_size: tuple[int, int] | None = None,
                 note: str = "") -> dict:
    """Everything the report shows: tables as text, the front over ``front_over`` with its hypervolume, each row's
    'rank' and 'pareto' (set on the rows), the best trial by the first objective, epochs saved, failures.
    ``note``: what stood in for what (a latency objective without a GPU)."""
    candidates = rankable(rows)
    ranks = nondominated_ranks(candidates, front_over)
    for r in rows:
        r["rank"] = ranks.get(id(r))
        r["pareto"] = r["rank"] == 1
    front = pareto_front(candidates, front_over)
    reference = reference_point(candidates, front_over)
    volume = hypervolume(front, front_over, reference)
    keys = param_columns(rows)
    metrics = metric_columns(rows, front_over)
    header, cells = table_rows(rows, keys, metrics)
    front_header, front_cells = table_rows(front, keys, metrics)
    first = objectives[0]
    failures = [r for r in rows if r.get("status") == "error"]
    size = f" (GFLOPs of one {flops_size[0]}x{flops_size[1]} image)" if flops_size else ""
    text = [f"Trials{size}:", format_table(header, cells), "",
            (f"Pareto front ({_objective_text(front_over)}): {len(front)} trials, hypervolume {volume:.6g} "
            f"(reference {', '.join(f'{abs(v):.4g}' for v in reference)})"),
            format_table(front_header, front_cells)]
    if note:
        text += ["", f"Note: {note}"]
    if failures:
        text += ["", "Failed trials:", *[f"  {r['trial']}: {r.get('error') or 'unknown cause'}" for r in failures]]
    return {
        "header": header, "cells": cells, "front": front, "front_header": front_header, "front_cells": front_cells,
        "objectives": [vars(o) for o in objectives], "front_over": [vars(o) for o in front_over],
        "hypervolume": volume, "reference": reference, "note": note,
        "best": best_trial(rows, first.metric, first.mode), "savings": epochs_saved(rows, budget),
        "failed": failures, "text": "\n".join(text),
    }


def _point_label(row: dict) -> str:
    rho = row.get("params", {}).get("model.rho")
    return f"{row['trial']} (rho={rho:g})" if isinstance(rho, (int, float)) else str(row["trial"])


def plot_axes(front_over: Sequence[dict]) -> tuple[str, str]:
    """(x, y) of the front's picture: the first cost-like (min) objective across, the first max one up."""
    over = [Objective(**o) for o in front_over]
    y = next((o.metric for o in over if o.mode == "max"), over[0].metric)
    x = next((o.metric for o in over if o.metric != y), over[-1].metric)
    return x, y


def write_report(rows: Sequence[dict], report: dict, out_dir: str | Path, *, title: str = "") -> dict[str, Path]:
    """Write trials.csv, pareto.csv, report.md, pareto.png and trials.json into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x, y = plot_axes(report["front_over"])
    paths = {
        "trials_csv": _write_csv(out / "trials.csv", report["header"], report["cells"]),
        "pareto_csv": _write_csv(out / "pareto.csv", report["front_header"], report["front_cells"]),
        "pareto_png": plot_front(rows, report["front"], out / "pareto.png", x=x, y=y,
                                 x_label=METRIC_TITLES.get(x, x), y_label=METRIC_TITLES.get(y, y),
                                 title=title or f"{y} vs {x}", label=_point_label,
                                 note=f"hypervolume {report['hypervolume']:.4g}" + (f"; {report['note']}"
                                                                                    if report["note"] else "")),
    }
    (out / "report.md").write_text(report["text"] + "\n")
    paths["report_md"] = out / "report.md"
    summary = {"trials": list(rows), "best": report["best"], "front": list(report["front"]),
               "savings": report["savings"], "objectives": report["objectives"], "front_over": report["front_over"],
               "hypervolume": report["hypervolume"], "reference": report["reference"], "note": report["note"]}
    (out / "trials.json").write_text(json.dumps(summary, indent=2, default=str))
    paths["trials_json"] = out / "trials.json"
    return paths
