"""Pareto fronts of a sweep's trials over several objectives (AP up, GFLOPs or latency down, ...).

A row is a trial's dict (orchestrator.sweep.report); an objective names one of its keys and whether more
(``max``) or less (``min``) is better. Rows missing an objective's value (a trial that failed or never
evaluated) take no part. Everything here is plain arithmetic on rows, tested by hand:

- dominance: a is no worse on every objective and better on one;
- non-dominated sorting (NSGA-II): rank 1 is the front, rank 2 the front once rank 1 is removed, ...;
- crowding distance (NSGA-II): how far a row's neighbours on its front are, per objective range;
- hypervolume: the volume the front dominates up to a reference point (larger is better).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # "max" | "min"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def cost(self, value: float) -> float:
        """The value as a cost to minimise (a ``max`` objective negated)."""
        return -value if self.mode == "max" else value


# The front every sweep reports when it optimises one metric: accuracy against compute.
AP_VS_GFLOPS = (Objective("AP", "max"), Objective("gflops", "min"))


def _number(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def scored(rows: Sequence[dict], objectives: Sequence[Objective]) -> list[dict]:
    """The rows with a finite value for every objective."""
    return [r for r in rows if all(_number(r.get(o.metric)) is not None for o in objectives)]


def dominates(a: dict, b: dict, objectives: Sequence[Objective] = AP_VS_GFLOPS) -> bool:
    """``a`` is at least as good as ``b`` on every objective and better on one."""
    costs_a = [o.cost(float(a[o.metric])) for o in objectives]
    costs_b = [o.cost(float(b[o.metric])) for o in objectives]
    return all(x <= y for x, y in zip(costs_a, costs_b)) and any(x < y for x, y in zip(costs_a, costs_b))


def nondominated_ranks(rows: Sequence[dict], objectives: Sequence[Objective] = AP_VS_GFLOPS) -> dict[int, int]:
    """id(row) -> its non-domination rank (1 = on the front) for the scored rows."""
    remaining = scored(rows, objectives)
    ranks, rank = {}, 1
    while remaining:
        front = [r for r in remaining if not any(dominates(o, r, objectives) for o in remaining if o is not r)]
        for r in front:
            ranks[id(r)] = rank
        remaining = [r for r in remaining if id(r) not in ranks]
        rank += 1
    return ranks


def crowding_distances(front: Sequence[dict], objectives: Sequence[Objective]) -> dict[int, float]:
    """id(row) -> NSGA-II crowding distance within ``front`` (its ends: infinity)."""
    distance = {id(r): 0.0 for r in front}
    if len(front) <= 2:
        return {key: math.inf for key in distance}
    for o in objectives:
        ordered = sorted(front, key=lambda r: float(r[o.metric]))
        low, high = float(ordered[0][o.metric]), float(ordered[-1][o.metric])
        distance[id(ordered[0])] = distance[id(ordered[-1])] = math.inf
        if high == low:
            continue
        for before, row, after in zip(ordered, ordered[1:], ordered[2:]):
            distance[id(row)] += (float(after[o.metric]) - float(before[o.metric])) / (high - low)
    return distance


def promotion_order(rows: Sequence[dict], objectives: Sequence[Objective]) -> list[dict]:
    """Scored rows best first: by non-domination rank, then by crowding distance (MO-ASHA's ranking,
    Schmucker et al. 2021, with NSGA-II's tie-break), then by the first objective."""
    ranks = nondominated_ranks(rows, objectives)
    crowding: dict[int, float] = {}
    for rank in set(ranks.values()):
        crowding.update(crowding_distances([r for r in rows if ranks.get(id(r)) == rank], objectives))
    first = objectives[0]
    return sorted((r for r in rows if id(r) in ranks),
                  key=lambda r: (ranks[id(r)], -crowding[id(r)], first.cost(float(r[first.metric]))))


def pareto_front(rows: Sequence[dict], objectives: Sequence[Objective] = AP_VS_GFLOPS) -> list[dict]:
    """Rows not dominated by any other scored row. Ties (the same values) are all kept.
    Sorted by the last objective's cost, then the first's (for AP vs GFLOPs: cheapest first)."""
    ranks = nondominated_ranks(rows, objectives)
    front = [r for r in rows if ranks.get(id(r)) == 1]
    return sorted(front, key=lambda r: tuple(o.cost(float(r[o.metric])) for o in (*objectives[::-1],)))


def reference_point(rows: Sequence[dict], objectives: Sequence[Objective], margin: float = 0.1) -> list[float]:
    """The hypervolume's reference, as costs: each objective's worst scored value moved out by ``margin`` of its
    range (so that the front's extreme points count too), an AP-like ``max`` objective never past 0."""
    ref = []
    for o in objectives:
        costs = [o.cost(float(r[o.metric])) for r in scored(rows, objectives)]
        if not costs:
            ref.append(0.0)
            continue
        worst, span = max(costs), max(costs) - min(costs)
        point = worst + margin * (span or abs(worst) or 1.0)
        ref.append(min(point, 0.0) if o.mode == "max" and worst <= 0 else point)
    return ref


def _volume(points: list[tuple[float, ...]], ref: Sequence[float]) -> float:
    """Volume dominated by ``points`` (costs) up to ``ref``: slices along the first axis, recursively."""
    points = [p for p in points if all(x < r for x, r in zip(p, ref))]
    if not points:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in points)
    points.sort()
    total = 0.0
    for i, point in enumerate(points):
        upper = points[i + 1][0] if i + 1 < len(points) else ref[0]
        if upper > point[0]:
            total += (upper - point[0]) * _volume([p[1:] for p in points[:i + 1]], ref[1:])
    return total


def hypervolume(rows: Sequence[dict], objectives: Sequence[Objective], reference: Sequence[float]) -> float:
    """Hypervolume of the scored ``rows`` against ``reference`` (costs, see :func:`reference_point`)."""
    points = [tuple(o.cost(float(r[o.metric])) for o in objectives) for r in scored(rows, objectives)]
    return _volume(points, list(reference))


def plot_front(rows: Sequence[dict], front: Sequence[dict], path: str | Path, *, x: str = "gflops",
               y: str = "AP", x_label: str = "GFLOPs", y_label: str = "AP", label=lambda row: str(row.get("trial", "")),
               title: str = "", note: str = "") -> Path:
    """Scatter of every scored trial (``x`` against ``y``), the front as a step line, each point labelled
    ``label(row)``, ``note`` under the axes; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shown = [r for r in rows if _number(r.get(x)) is not None and _number(r.get(y)) is not None]
    line = sorted((r for r in front if r in shown), key=lambda r: float(r[x]))
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.scatter([r[x] for r in shown], [r[y] for r in shown], color="0.6", label="trials", zorder=2)
    if line:
        ax.plot([r[x] for r in line], [r[y] for r in line], "o-", color="tab:red", drawstyle="steps-post",
                label="Pareto front", zorder=3)
    for r in shown:
        ax.annotate(label(r), (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title or f"{y_label} vs {x_label}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
