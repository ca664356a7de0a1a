"""`sdo bench demo`: did `just demo` learn, and how long did it take?

`just demo-check` runs `just demo` under a known run name and then this report: the AP curve of the
run (one point per evaluated epoch, from the run directory's ``eval/epoch_NNNN.json`` files, the same
numbers that reach MLflow), the wall time since the demo started (the Justfile's ``date``, so the
virtual-environment setup is excluded and data synthesis, sharding, Ray start-up and training are
included) and the machine's load (a demo on a machine shared with other work runs slower).
It fails when the final AP50 is below the bar or the wall time is over the budget.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def ap_curve(run_dir: Path) -> list[dict]:
    """[{'epoch', 'AP', 'AP50', 'dam_recall'?}] of every eval json under ``run_dir/eval``, by epoch."""
    files = sorted((Path(run_dir) / "eval").glob("epoch_*.json"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no eval/epoch_*.json (did the demo run finish an epoch?)")
    curve = []
    for file in files:
        record = json.loads(file.read_text())
        metrics = record["metrics"]
        point = {"epoch": record["epoch"], "AP": metrics["AP"], "AP50": metrics["AP50"]}
        if "dam_recall" in metrics:
            point["dam_recall"] = metrics["dam_recall"]
        curve.append(point)
    return sorted(curve, key=lambda point: point["epoch"])


def report(run_dir: Path, *, started_at: float | None, min_ap50: float, max_seconds: float | None,
           finished_at: float | None = None) -> dict:
    """The demo check's JSON document; ``passed`` is False when AP50 < ``min_ap50`` or the wall time
    (``finished_at`` - ``started_at``, both Unix seconds) is over ``max_seconds``."""
    curve = ap_curve(run_dir)
    finished_at = time.time() if finished_at is None else finished_at
    wall = None if started_at is None else finished_at - started_at
    final = curve[-1]
    failures = []
    if final["AP50"] < min_ap50:
        failures.append(f"final AP50 {final['AP50']:.3f} < {min_ap50}")
    if max_seconds is not None and wall is not None and wall > max_seconds:
        failures.append(f"wall time {wall:.0f} s > {max_seconds:.0f} s")
    return {
        "run_dir": str(run_dir),
        "final": final,
        "best_AP50": max(point["AP50"] for point in curve),
        "curve": curve,
        "wall_seconds": None if wall is None else round(wall, 1),
        "min_ap50": min_ap50,
        "max_seconds": max_seconds,
        "passed": not failures,
        "failures": failures,
        "machine": {"cpus": os.cpu_count(), "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
                    "processor": platform.processor() or platform.machine()},
    }


class DemoCheckFailed(RuntimeError):
    """The demo did not learn enough, or took too long (exit 1 after the JSON is written)."""
