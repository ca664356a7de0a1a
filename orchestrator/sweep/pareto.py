"""Pareto front of accuracy vs compute: the trials no other trial beats on both at once."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def dominates(a: dict, b: dict, *, cost: str = "gflops", gain: str = "AP") -> bool:
    """``a`` is at least as cheap and as accurate as ``b``, and strictly better on one of them."""
    return (a[cost] <= b[cost] and a[gain] >= b[gain]) and (a[cost] < b[cost] or a[gain] > b[gain])


def pareto_front(rows: Sequence[dict], *, cost: str = "gflops", gain: str = "AP") -> list[dict]:
    """Rows not dominated by any other row (lower ``cost`` and higher ``gain`` are better).

    Rows missing either value (a trial that never evaluated, a model whose FLOPs are unknown) are
    left out. Ties (same cost and gain) are all kept. Result sorted by cost, then gain descending.
    """
    scored = [r for r in rows if _number(r.get(cost)) is not None and _number(r.get(gain)) is not None]
    front = [r for r in scored if not any(dominates(o, r, cost=cost, gain=gain) for o in scored if o is not r)]
    return sorted(front, key=lambda r: (float(r[cost]), -float(r[gain])))


def plot_front(rows: Sequence[dict], front: Sequence[dict], path: str | Path, *, cost: str = "gflops",
               gain: str = "AP", cost_label: str = "GFLOPs", gain_label: str = "AP", label=lambda row: str(row.get("trial", "")),
               title: str = "") -> Path:
    """Scatter of every trial, the front as a step line, each point labelled ``label(row)``; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scored = [r for r in rows if _number(r.get(cost)) is not None and _number(r.get(gain)) is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([r[cost] for r in scored], [r[gain] for r in scored], color="0.6", label="trials", zorder=2)
    if front:
        ax.plot([r[cost] for r in front], [r[gain] for r in front], "o-", color="tab:red", drawstyle="steps-post",
                label="Pareto front", zorder=3)
    for r in scored:
        ax.annotate(label(r), (r[cost], r[gain]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.set_xlabel(cost_label)
    ax.set_ylabel(gain_label)
    ax.set_title(title or f"{gain_label} vs {cost_label}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
