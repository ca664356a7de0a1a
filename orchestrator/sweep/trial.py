"""One trial of a sweep: a Tune function trainable that runs `sdo launch`'s training on the trial's config.

A trial is a real distributed training (orchestrator.train.driver.run_training) with its own
checkpoints, fault tolerance and MLflow child run; a ``TuneReportCallback`` hands its epoch reports
to Tune, each with the cost of the trial's model (``gflops``, and ``latency_ms`` / ``latency_ms_b4`` where
latency is measured: orchestrator.sweep.objectives), so that the scheduler and the search can weigh it.
The trial process itself reserves no CPU: its trainer's workers take the cluster's CPUs/GPUs, and the
latency is measured by a task that asks for what one of those workers has. A trial logs no MLflow Model:
the sweep logs those of the trials it keeps when it ends.
"""
from __future__ import annotations

from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.config import Config, from_dict
from orchestrator.run.identity import RunIdentity
from orchestrator.sweep.space import trial_config

LATENCY_METRICS = {"latency_ms": "model/latency_ms", "latency_ms_b4": "model/latency_ms_b4"}  # report -> MLflow


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
    'tracking_uri', 'trials_dir', 'latency': whether to measure it}. A trial restarted by ``--resume`` finds
    its run directory and continues its MLflow run and its latest checkpoint instead of starting a second run.
    """
    from ray import tune

    from orchestrator.run.lifecycle import open_run
    from orchestrator.train.driver import run_training

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(from_dict(setup["cfg"]), params, epochs=setup["epochs"],
                       parent_run_id=setup["parent_run_id"], tracking_uri=setup["tracking_uri"])
    cfg.train.storage_path = setup["trials_dir"]
    name = trial_run_name(setup["name"], trial_id)
    run = open_run(cfg, name=name, resume=take_up(cfg, name))
    cost = model_cost(cfg, run, latency=setup.get("latency", False))
    run_training(cfg, run, extra_callbacks=[EpochReports(cost)], command="sweep", log_model=False)


def take_up(cfg: Config, name: str) -> bool:
    """Whether the trial's run was opened before (a restarted trial continues it). A run directory without its
    ``sdo_run.json`` is what a driver killed while the trial opened its run leaves: nothing was trained there
    (training starts after the identity is saved), so it is cleared and the run opened afresh."""
    from orchestrator.run.directory import run_dir
    from orchestrator.run.lifecycle import find_run
    from orchestrator.run.storage import remove_tree

    if find_run(cfg, name) is not None:
        return True
    remove_tree(run_dir(cfg, name))
    return False


def model_cost(cfg: Config, run: RunIdentity, *, latency: bool) -> dict:
    """{'gflops' (one 850x1040 image), and with ``latency`` 'latency_ms', 'latency_ms_b4'} of the trial's model.

    Latency is measured once per trial, by a Ray task holding what one of the trial's workers holds (a GPU
    with ``train.use_gpu``), at ``sweep.latency_size``; it is logged to the trial's MLflow run (``model/latency_ms``,
    ``model/latency_ms_b4``, tags ``sdo.latency_device`` and ``sdo.latency_size``) and read back from there
    when the trial is resumed.
    """
    from orchestrator.train.cost import reference_gflops

    cost = {"gflops": reference_gflops(cfg.model)}
    if not latency:
        return cost
    logger = run.logger()
    logged = logger.client.get_run(run.run_id).data.metrics
    if all(key in logged for key in LATENCY_METRICS.values()):
        return {**cost, **{name: logged[key] for name, key in LATENCY_METRICS.items()}}
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from orchestrator.train.cost import latency as measure

    # outside the trial's own placement group (which holds no CPU): where one of its workers would go
    resources = {"num_cpus": cfg.train.cpus_per_worker, "num_gpus": 1 if cfg.train.use_gpu else 0,
                 "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None)}
    task = ray.remote(measure).options(**resources)
    measured = ray.get(task.remote(cfg.model, tuple(cfg.sweep.latency_size),
                                   "cuda" if cfg.train.use_gpu else "cpu"))
    logger.metrics({key: measured[name] for name, key in LATENCY_METRICS.items()}, step=0)
    logger.tags({"sdo.latency_device": measured["device"], "sdo.latency_size": measured["size"]})
    return {**cost, **{name: measured[name] for name in LATENCY_METRICS}}


class EpochReports(TuneReportCallback):
    """Forward the reports of completed epochs (and a restored, finished trial's final one), not the
    mid-epoch checkpoint reports: those carry no new metrics and would count as epochs for ASHA. Each
    forwarded report carries ``cost``, the model's (see :func:`model_cost`)."""

    def __init__(self, cost: dict | None = None):
        super().__init__()
        self.cost = dict(cost or {})

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and not metrics[0].get("epoch_end", True):
            return
        super().after_report(run_context, [{**metrics[0], **self.cost}, *metrics[1:]] if metrics else metrics,
                             checkpoint)
