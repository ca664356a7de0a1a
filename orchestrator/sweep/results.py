"""Ray Train -> Tune: which of a trial's training reports become Tune results."""
from __future__ import annotations

from ray.tune.integration.ray_train import TuneReportCallback


class EpochReports(TuneReportCallback):
    """Forward the reports of completed epochs (and a restored, finished trial's final one), not the
    mid-epoch checkpoint reports: those carry no new metrics and would count as epochs for ASHA."""

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and not metrics[0].get("epoch_end", True):
            return
        super().after_report(run_context, metrics, checkpoint)
