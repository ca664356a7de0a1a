"""Trial schedulers of a sweep: ASHA over completed epochs (early stopping) on one objective, its
multi-objective form MO-ASHA on several, or FIFO (none)."""
from __future__ import annotations

import math

from orchestrator.config import Config, ConfigError
from orchestrator.sweep.pareto import Objective, dominates, promotion_order
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


def rungs(budget: int, grace_period: int, reduction_factor: int) -> list[int]:
    """Epoch milestones where ASHA judges a trial: grace_period * reduction_factor**k, below the budget."""
    out, milestone = [], grace_period
    while milestone < budget:
        out.append(milestone)
        milestone *= reduction_factor
    return out


def _mo_asha_class():
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class MultiObjectiveASHA(FIFOScheduler):
        """Asynchronous successive halving over several objectives (MO-ASHA, Schmucker et al. 2021).

        At each rung (after epoch m of ``rungs``) a trial is ranked against every trial that reached the rung
        before it: by non-domination rank, then crowding distance (pareto.promotion_order). It goes on when
        it is among the best ceil(n / reduction_factor) of the n trials there, or when no trial there
        dominates it, so that a cheap model the front needs is not stopped for its AP alone. Trials that do
        not report every objective are never stopped; nor is a trial on its last epoch (see EpochASHA).
        """

        def __init__(self, *, objectives: list[Objective], budget: int, grace_period: int, reduction_factor: int):
            super().__init__()
            self.objectives, self.budget, self.reduction_factor = list(objectives), budget, reduction_factor
            self.rungs = {m: {} for m in rungs(budget, grace_period, reduction_factor)}  # epoch -> {trial: values}

        def set_search_properties(self, metric, mode, **spec) -> bool:
            return True  # the objectives came with the constructor; Tune's single metric is not used

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            result = _with_epochs_done(result)
            done = result.get(EPOCHS_DONE, 0)
            values = {o.metric: result.get(o.metric) for o in self.objectives}
            if done >= self.budget or any(not isinstance(v, (int, float)) or math.isnan(v) for v in values.values()):
                return TrialScheduler.CONTINUE
            for milestone in sorted(self.rungs, reverse=True):
                recorded = self.rungs[milestone]
                if done < milestone or trial.trial_id in recorded:
                    continue
                recorded[trial.trial_id] = {"trial": trial.trial_id, **values}
                return TrialScheduler.CONTINUE if self.promoted(trial.trial_id, recorded) else TrialScheduler.STOP
            return TrialScheduler.CONTINUE

        def promoted(self, trial_id: str, recorded: dict[str, dict]) -> bool:
            rows = list(recorded.values())
            mine = recorded[trial_id]
            if not any(dominates(other, mine, self.objectives) for other in rows if other is not mine):
                return True
            keep = math.ceil(len(rows) / self.reduction_factor)
            return any(row is mine for row in promotion_order(rows, self.objectives)[:keep])

        def debug_string(self) -> str:
            return "MO-ASHA: " + ", ".join(f"epoch {m}: {len(r)} trials" for m, r in sorted(self.rungs.items()))

    return MultiObjectiveASHA


def make_scheduler(cfg: Config, objectives: list[Objective] | None = None):
    """ASHA on the one objective (``sweep.metric``) over completed epochs (rungs at grace_period *
    reduction_factor**k), MO-ASHA on several, or FIFO."""
    from ray.tune.schedulers import FIFOScheduler

    s = cfg.sweep
    if s.scheduler == "fifo":
        return FIFOScheduler()
    epochs = budget(cfg)
    if s.grace_period >= epochs:
        raise ConfigError(f"sweep.grace_period={s.grace_period}: must be < the per-trial budget of {epochs} epochs "
                          "(sweep.max_epochs or train.epochs) for ASHA to stop anything")
    if objectives is not None and len(objectives) > 1:
        return _mo_asha_class()(objectives=objectives, budget=epochs, grace_period=s.grace_period,
                                reduction_factor=s.reduction_factor)
    return _asha_class()(budget=epochs, grace_period=s.grace_period, reduction_factor=s.reduction_factor)
