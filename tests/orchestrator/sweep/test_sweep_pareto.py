"""Several objectives on hand-made rows: non-domination ranks, crowding distance, hypervolume, MO-ASHA's
promotion order, and which objectives a sweep optimises (latency without a GPU: GFLOPs stand in)."""
from __future__ import annotations

import math

import pytest

from orchestrator.config import Config, ConfigError, set_value
from orchestrator.sweep.objectives import front_objectives, resolved
from orchestrator.sweep.pareto import (
    Objective,
    crowding_distances,
    hypervolume,
    nondominated_ranks,
    promotion_order,
    reference_point,
)

AP, GF, MS = Objective("AP", "max"), Objective("gflops", "min"), Objective("latency_ms", "min")


def _r(trial, ap, gflops, ms=None):
    return {"trial": trial, "AP": ap, "gflops": gflops, "latency_ms": ms}


def test_ranks_peel_fronts_one_after_another():
    rows = [_r("a", 0.5, 10), _r("b", 0.4, 5), _r("c", 0.3, 8), _r("d", 0.2, 9), _r("e", None, 1)]
    ranks = nondominated_ranks(rows, [AP, GF])
    # a and b trade AP for GFLOPs; c is beaten by b; d by c; e never evaluated
    assert [ranks.get(id(r)) for r in rows] == [1, 1, 2, 3, None]


def test_crowding_distance_by_hand():
    front = [_r("a", 0.1, 1), _r("b", 0.2, 2), _r("c", 0.4, 3), _r("d", 0.5, 6)]
    distance = crowding_distances(front, [AP, GF])
    # inner points: (next - previous) / range per objective, summed; ends are infinite
    assert distance[id(front[0])] == distance[id(front[3])] == math.inf
    assert distance[id(front[1])] == pytest.approx((0.4 - 0.1) / 0.4 + (3 - 1) / 5)
    assert distance[id(front[2])] == pytest.approx((0.5 - 0.2) / 0.4 + (6 - 2) / 5)


def test_promotion_order_rank_then_crowding():
    rows = [_r("a", 0.1, 1), _r("b", 0.2, 2), _r("c", 0.4, 3), _r("d", 0.5, 6), _r("x", 0.15, 2.5)]
    order = [r["trial"] for r in promotion_order(rows, [AP, GF])]
    # rank 1: a, b, c, d (x is dominated by b); the ends first (by AP), then c (more room) before b
    assert order == ["d", "a", "c", "b", "x"]


def test_hypervolume_two_and_three_objectives_by_hand():
    rows = [_r("a", 0.5, 10, 4.0), _r("b", 0.4, 5, 6.0)]
    # 2-D, reference AP 0, 12 GFLOPs: b's box [5, 12] x [0, 0.4] plus a's extra [10, 12] x [0.4, 0.5]
    assert hypervolume(rows, [AP, GF], [0.0, 12.0]) == pytest.approx(7 * 0.4 + 2 * 0.1)
    # 3-D, reference latency 8 ms: union of two boxes = sum - intersection
    box_a, box_b = 0.5 * 2 * 4, 0.4 * 7 * 2
    overlap = 0.4 * 2 * 2
    assert hypervolume(rows, [AP, GF, MS], [0.0, 12.0, 8.0]) == pytest.approx(box_a + box_b - overlap)
    # a dominated point adds nothing; a point beyond the reference counts nothing
    assert hypervolume([*rows, _r("c", 0.3, 11, 7.0), _r("z", 0.9, 20, 1.0)], [AP, GF, MS],
                       [0.0, 12.0, 8.0]) == pytest.approx(box_a + box_b - overlap)
    assert reference_point(rows, [AP, GF]) == pytest.approx([-(0.4 - 0.01), 10 + 0.5])


def _cfg(**sweep) -> Config:
    cfg = Config()
    for key, value in sweep.items():
        set_value(cfg, f"sweep.{key}", value)
    return cfg


def test_objectives_resolved_latency_needs_a_gpu_or_always():
    both = [{"metric": "AP", "mode": "max"}, {"metric": "latency_ms", "mode": "min"}]
    objectives, note = resolved(_cfg(objectives=both))  # CPU trials (train.use_gpu false), latency auto
    assert objectives == [AP, GF]
    assert note == "latency_ms not measured (the trials train without a GPU): GFLOPs at 850x1040 stand in for it"
    assert resolved(_cfg(objectives=both, latency="always")) == ([AP, MS], "")
    gpu = _cfg(objectives=both)
    gpu.train.use_gpu = True
    assert resolved(gpu) == ([AP, MS], "")
    three = [*both, {"metric": "gflops", "mode": "min"}]
    assert resolved(_cfg(objectives=three, latency="off"))[0] == [AP, GF]  # GFLOPs once
    assert resolved(_cfg()) == ([AP], "")  # metric/mode alone
    assert front_objectives([AP]) == [AP, GF] and front_objectives([GF]) == [AP, GF]
    assert front_objectives([AP, MS]) == [AP, MS]
    with pytest.raises(ConfigError, match=r"sweep.objectives\[0\].metric='val/AP': no trial reports it"):
        resolved(_cfg(objectives=[{"metric": "val/AP", "mode": "max"}]))
