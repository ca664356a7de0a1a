"""One trial of a sweep: a Tune function trainable that runs `sdo launch`'s training on the trial's config.

A trial is a real distributed training (orchestrator.train.driver.run_training) with its own
checkpoints, fault tolerance and MLflow child run; a ``TuneReportCallback`` hands its epoch reports
to Tune. The trial process itself reserves no CPU: its trainer's workers take the cluster's CPUs/GPUs.
"""
from __future__ import annotations

from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.config import from_dict
from orchestrator.sweep.space import trial_config


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """The Ray Train run (and MLflow child run) name of one trial."""
    return f"{sweep_name}-{trial_id}"


def trial_resources():
    """What the trial process itself holds: no CPU (its TorchTrainer's workers need them), 1 MiB of
    memory only because a Tune resource request may not be empty."""
    from ray.tune import PlacementGroupFactory

    return PlacementGroupFactory([{"CPU": 0, "memory": 1 << 20}])


def run_trial(params: dict, *, setup: dict) -> None:
    """The Tune function trainable: train one trial's config with `sdo launch`'s TorchTrainer.

    ``setup``: {'cfg': the sweep's preflighted config dict, 'name': sweep name, 'epochs', 'parent_run_id',
    'tracking_uri', 'trials_dir'}. A trial restarted by ``--resume`` finds its run directory and
    continues its MLflow run and its latest checkpoint instead of starting a second run.
    """
    from ray import tune

    from orchestrator.run.lifecycle import find_run, open_run
    from orchestrator.train.driver import run_training

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(from_dict(setup["cfg"]), params, epochs=setup["epochs"],
                       parent_run_id=setup["parent_run_id"], tracking_uri=setup["tracking_uri"])
    cfg.train.storage_path = setup["trials_dir"]
    name = trial_run_name(setup["name"], trial_id)
    run = open_run(cfg, name=name, resume=find_run(cfg, name) is not None)
    run_training(cfg, run, extra_callbacks=[EpochReports()], command="sweep")


class EpochReports(TuneReportCallback):
    """Forward the reports of completed epochs (and a restored, finished trial's final one), not the
    mid-epoch checkpoint reports: those carry no new metrics and would count as epochs for ASHA."""

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and not metrics[0].get("epoch_end", True):
            return
        super().after_report(run_context, metrics, checkpoint)
