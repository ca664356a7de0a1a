"""Trial schedulers of a sweep: ASHA over completed epochs (early stopping), or FIFO (none)."""
from __future__ import annotations

from orchestrator.config import Config, ConfigError
from orchestrator.sweep.space import budget

EPOCHS_DONE = "epochs_done"


def _with_epochs_done(result: dict) -> dict:
    """ASHA's time attribute: sdo's own count of completed epochs, which the training reports (and which a
    trial resumed from its checkpoint continues); results without it count their 0-based 'epoch' + 1."""
    if EPOCHS_DONE in result or "epoch" not in result:
        return result
    return {**result, EPOCHS_DONE: result["epoch"] + 1}


def _asha_class():
    from ray.tune.schedulers import ASHAScheduler

    class EpochASHA(ASHAScheduler):
        """ASHA over completed epochs that never stops a trial on its last epoch.

        A rung at ``m`` judges a trial after its m-th epoch. Stopping on the final epoch saves
        nothing and would kill the trial before it closes its MLflow run and keeps its best
        checkpoint, so the final report only records the trial's rung value (as a completion).
        """

        def __init__(self, *, budget: int, **kwargs):
            super().__init__(time_attr=EPOCHS_DONE, max_t=budget, stop_last_trials=False, **kwargs)
            self.budget = budget

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            result = _with_epochs_done(result)
            if result.get(EPOCHS_DONE, 0) >= self.budget:
                return self.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
            super().on_trial_complete(tune_controller, trial, _with_epochs_done(result))

    return EpochASHA


def make_scheduler(cfg: Config):
    """ASHA on ``sweep.metric`` over completed epochs (rungs at grace_period * reduction_factor**k), or FIFO."""
    from ray.tune.schedulers import FIFOScheduler

    s = cfg.sweep
    if s.scheduler == "fifo":
        return FIFOScheduler()
    epochs = budget(cfg)
    if s.grace_period >= epochs:
        raise ConfigError(f"sweep.grace_period={s.grace_period}: must be < the per-trial budget of {epochs} epochs "
                          "(sweep.max_epochs or train.epochs) for ASHA to stop anything")
    return _asha_class()(budget=epochs, grace_period=s.grace_period, reduction_factor=s.reduction_factor)
