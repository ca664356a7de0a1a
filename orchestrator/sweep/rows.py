"""The sweep's trials as report rows (orchestrator.sweep.report): Tune's experiment state, each trial's params,
the cost of its model (GFLOPs of one 850x1040 image, orchestrator.train.cost; latency where it was measured)
and, for a trial that failed, the cause."""
from __future__ import annotations

from orchestrator.config import Config, get_value
from orchestrator.sweep.objectives import COST_METRICS
from orchestrator.sweep.pareto import Objective
from orchestrator.sweep.report import summarize_history, trial_status
from orchestrator.sweep.space import Axis, budget, trial_config
from orchestrator.sweep.trial import trial_run_name
from orchestrator.train.cost import reference_gflops

SHOWN_KEYS = ("model.rho", "loss.enc_aux_coef", "loss.mask_prediction_coef", "loss.cls_coef", "loss.bbox_coef",
              "loss.giou_coef")


def _history(frame) -> list[dict]:
    if frame is None or len(frame) == 0:
        return []
    return frame.to_dict("records")


def error_cause(trial) -> str | None:
    """'<ErrorType>: <first line>' of the exception a failed Tune trial raised (the training's own error), or
    None when it did not fail."""
    try:
        error = trial.get_pickled_error()
    except Exception:  # noqa: BLE001 - an unreadable pickle falls back to the text trace
        error = None
    cause = getattr(error, "cause", None) or error
    if cause is not None:
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__
    try:
        trace = trial.get_error()
    except Exception:  # noqa: BLE001
        trace = None
    lines = [line.strip() for line in (trace or "").splitlines() if line.strip() and not line.startswith("Failure #")]
    return lines[-1] if lines else None


def collect_rows(cfg: Config, axes: list[Axis], analysis, *, name: str, objectives: list[Objective],
                 cut: frozenset = frozenset()) -> list[dict]:
    """One report row per trial of the Tune experiment ``analysis`` (an ExperimentAnalysis). ``cut``: ids of trials
    the sweep's failure limit ended before they finished (status 'cancelled')."""
    frames = analysis.trial_dataframes
    epochs = budget(cfg)
    # the objectives, and the cost a trial reports whatever it optimises (its best epoch: the first objective's)
    summarized = [*objectives, *[Objective(m, "min") for m in COST_METRICS if m not in {o.metric for o in objectives}]]
    shown = [*SHOWN_KEYS, *[a.key for a in axes]]
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        params = {k: trial.config[k] for k in (a.key for a in axes) if k in trial.config}
        trial_cfg = trial_config(cfg, params, epochs=epochs)
        summary = summarize_history(_history(frames.get(trial.trial_id)), summarized)
        status = trial_status(trial.status, summary["epochs"], epochs)
        if trial.trial_id in cut and status != "error":
            status = "cancelled"
        row = {
            "trial": trial.trial_id,
            "run_name": trial_run_name(name, trial.trial_id),
            "status": status,
            "params": {k: get_value(trial_cfg, k) for k in dict.fromkeys(shown)},
            **summary,
            # what the trial reported (its model's count at 850x1040), else counted here
            "gflops": summary.get("gflops") or reference_gflops(trial_cfg.model),
            "error": error_cause(trial) if status == "error" else None,
        }
        rows.append(row)
    return rows
