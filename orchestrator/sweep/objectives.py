"""What a sweep optimises: ``sweep.objectives`` (several, a Pareto front) or ``sweep.metric`` / ``sweep.mode``.

Each trial reports, with every epoch: the evaluation (AP, AP50, ..., dam_recall), the training means
(loss and its terms, img_per_s, epoch_time) and the cost of its model: ``gflops`` (one 850x1040 image,
orchestrator.train.cost) and, where it is measured, ``latency_ms`` / ``latency_ms_b4`` (eval, batch 1 / 4).
Latency is measured where a trial trains on a GPU (``sweep.latency: auto``), on any device with ``always``,
never with ``off``; when it is not, a latency objective is replaced by GFLOPs, and the report says so.
"""
from __future__ import annotations

from orchestrator.config import Config, ConfigError
from orchestrator.sweep.pareto import Objective
from orchestrator.train.evaluation import EVAL_KEYS

COST_METRICS = ("gflops", "latency_ms", "latency_ms_b4")
LATENCY_METRICS = ("latency_ms", "latency_ms_b4")
TRAINING_METRICS = ("img_per_s", "epoch_time", "loss")


def reported(metric: str) -> bool:
    """Whether every trial reports ``metric`` (loss terms: any ``loss*``)."""
    return metric in (*EVAL_KEYS, *TRAINING_METRICS, *COST_METRICS) or metric.startswith("loss_")


def declared(cfg: Config) -> list[Objective]:
    """The objectives as written: ``sweep.objectives``, else [sweep.metric / sweep.mode]. Raises ConfigError
    naming the key of a metric that no trial reports."""
    s = cfg.sweep
    if not s.objectives:
        if not reported(s.metric):
            raise ConfigError(f"sweep.metric={s.metric!r}: no trial reports it (known: {', '.join(_known())})")
        return [Objective(s.metric, s.mode)]
    out = []
    for i, item in enumerate(s.objectives):
        if not reported(item["metric"]):
            raise ConfigError(f"sweep.objectives[{i}].metric={item['metric']!r}: no trial reports it "
                              f"(known: {', '.join(_known())})")
        out.append(Objective(item["metric"], item["mode"]))
    return out


def _known() -> list[str]:
    return [*EVAL_KEYS, *TRAINING_METRICS, "loss_*", *COST_METRICS]


def latency_measured(cfg: Config) -> bool:
    """Whether trials measure their latency: ``sweep.latency`` always, or auto on GPU workers."""
    return cfg.sweep.latency == "always" or (cfg.sweep.latency == "auto" and cfg.train.use_gpu)


def resolved(cfg: Config) -> tuple[list[Objective], str]:
    """(the objectives the sweep optimises, a note for the report): a latency objective without measured latency
    becomes GFLOPs (min), once."""
    objectives, note = [], ""
    for o in declared(cfg):
        if o.metric in LATENCY_METRICS and not latency_measured(cfg):
            why = "sweep.latency=off" if cfg.sweep.latency == "off" else "the trials train without a GPU"
            note = f"{o.metric} not measured ({why}): GFLOPs at 850x1040 stand in for it"
            o = Objective("gflops", "min")
        if o.metric not in (x.metric for x in objectives):
            objectives.append(o)
    return objectives, note


def front_objectives(objectives: list[Objective]) -> list[Objective]:
    """What the report's Pareto front is drawn over: the objectives, or for one objective that objective against
    GFLOPs (accuracy for the compute, the paper's question)."""
    if len(objectives) > 1:
        return list(objectives)
    if objectives[0].metric == "gflops":
        return [Objective("AP", "max"), objectives[0]]
    return [objectives[0], Objective("gflops", "min")]
