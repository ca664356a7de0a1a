"""The sweep's trials as report rows (orchestrator.sweep.report): Tune's experiment state, each trial's params,
and the GFLOPs of its model at one reference size."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from orchestrator.config import Config, get_value
from orchestrator.sweep.report import summarize_history, trial_status
from orchestrator.sweep.space import Axis, budget, trial_config
from orchestrator.sweep.trial import trial_run_name

# One image of this size is what the official benchmark (and the paper's GFLOPs column) counts.
PAPER_FLOPS_SIZE = (850, 1040)
MIN_FLOPS_SIDE = 128


def flops_size(cfg: Config) -> tuple[int, int]:
    """Reference image (h, w) for GFLOPs: the paper's 850x1040 for COCO-scale configs
    (val_scale >= 800), else a square of the config's validation scale, at least 128 pixels so
    that the stride-64 level is 2x2 (one image's 1x1 map cannot be group-normalised)."""
    if cfg.data.val_scale >= 800:
        return PAPER_FLOPS_SIZE
    side = max(cfg.data.val_scale, MIN_FLOPS_SIDE)
    return side, side


def model_gflops(cfg: Config, size: tuple[int, int], cache: dict) -> float:
    """GFLOPs of ``cfg``'s model on one image of ``size`` (model.flops); cached per model config."""
    model_cfg = dataclasses.replace(cfg.model, checkpoint=None,
                                    backbone=dataclasses.replace(cfg.model.backbone, weights=None))
    key = json.dumps(dataclasses.asdict(model_cfg), sort_keys=True)
    if key not in cache:
        from model.build import build_model
        from model.flops import count_flops

        network = build_model(model_cfg)
        cache[key] = float(count_flops(network, *size)["total_gflops"])
    return cache[key]


def _history(frame) -> list[dict]:
    if frame is None or len(frame) == 0:
        return []
    return frame.to_dict("records")


def collect_rows(cfg: Config, axes: list[Axis], experiment_path: Path, *, name: str,
                 flops_cache: dict | None = None) -> list[dict]:
    """One report row per trial of the Tune experiment at ``experiment_path``."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment_path), default_metric=cfg.sweep.metric, default_mode=cfg.sweep.mode)
    frames = analysis.trial_dataframes
    epochs, size, cache = budget(cfg), flops_size(cfg), {} if flops_cache is None else flops_cache
    shown = ["model.rho", "loss.enc_aux_coef", "loss.mask_prediction_coef", "loss.cls_coef", "loss.bbox_coef",
             "loss.giou_coef", *[a.key for a in axes]]
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        params = {k: trial.config[k] for k in (a.key for a in axes) if k in trial.config}
        trial_cfg = trial_config(cfg, params, epochs=epochs)
        summary = summarize_history(_history(frames.get(trial.trial_id)), cfg.sweep.metric, cfg.sweep.mode)
        rows.append({
            "trial": trial.trial_id,
            "run_name": trial_run_name(name, trial.trial_id),
            "status": trial_status(trial.status, summary["epochs"], epochs),
            "params": {k: get_value(trial_cfg, k) for k in dict.fromkeys(shown)},
            **summary,
            "gflops": model_gflops(trial_cfg, size, cache),
        })
    return rows


