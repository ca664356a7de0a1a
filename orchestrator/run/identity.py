"""Who a run is: its name, where it lives, and which MLflow run records it (``sdo_run.json``).

The driver opens a run (orchestrator.run.lifecycle) and everything downstream — the Ray Train
workers, the finishing driver, a sweep's report — receives this one frozen value. Only this module
writes ``sdo_run.json``; a restart or ``--resume`` reads it back, so the run keeps its MLflow run.
A sweep's parent run has the same identity, saved as ``sdo_sweep.json`` in the sweep's folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from orchestrator.run.directory import write_json_atomic
from orchestrator.run.storage import location

RUN_STATE_FILE = "sdo_run.json"


@dataclass(frozen=True)
class RunIdentity:
    """A run's identity. ``directory``: ``<storage>/<name>``, a local folder or an ``s3://`` / ``gs://`` prefix.
    ``tracking_uri`` / ``run_id`` None: a run that nothing tracks (trained without MLflow, e.g. on a bare GPU box)."""

    name: str
    directory: str
    storage: str
    tracking_uri: str | None = None
    experiment_id: str | None = None
    run_id: str | None = None

    @property
    def tracked(self) -> bool:
        return self.run_id is not None

    @property
    def url(self) -> str | None:
        """The MLflow UI's page of the run (Model-training view)."""
        if not self.tracked:
            return None
        from orchestrator.run.tracking import run_url

        return run_url(self.tracking_uri, self.experiment_id, self.run_id)

    def location(self):
        """The run directory as a Path or a RemotePath (the same calls serve both)."""
        return location(self.directory)

    def logger(self, *, exactly_once: bool = False, grouped: bool = False):
        """The RunLogger of this run's MLflow run (see tracking.RunLogger for the flags); None when untracked.
        The one place a RunLogger is made from a run."""
        if not self.tracked:
            return None
        from orchestrator.run.tracking import RunLogger

        return RunLogger(self.tracking_uri, self.run_id, exactly_once=exactly_once, grouped=grouped)

    def to_json(self) -> dict:
        return {"name": self.name, "run_dir": self.directory, "storage": self.storage,
                "tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id,
                "mlflow_run_id": self.run_id, "run_url": self.url}

    @classmethod
    def from_json(cls, values: dict) -> RunIdentity:
        """Read what :meth:`to_json` wrote (also the files of sdo < 0.4: no ``storage``; sweeps said ``sweep_dir``)."""
        directory = values.get("run_dir") or values["sweep_dir"]
        storage = values.get("storage") or str(location(directory).parent)
        return cls(name=values["name"], directory=str(directory), storage=str(storage),
                   tracking_uri=values.get("tracking_uri"), experiment_id=values.get("experiment_id"),
                   run_id=values.get("mlflow_run_id"))


def read_identity(directory, file: str = RUN_STATE_FILE) -> RunIdentity | None:
    """The identity saved in ``directory`` (``sdo_run.json``, or ``file``), or None when there is none."""
    path = location(directory) / file
    if not path.is_file():
        return None
    return RunIdentity.from_json(json.loads(path.read_text()))


def write_identity(identity: RunIdentity, file: str = RUN_STATE_FILE) -> None:
    write_json_atomic(identity.location() / file, identity.to_json())
