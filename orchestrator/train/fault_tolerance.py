"""What a Ray Train run does on a failure or a Ctrl-C (the classes themselves: orchestrator.run.errors).

- A worker group that fails with a permanent error (bad data, config, checkpoint, a NaN loss) is not
  restarted: the run fails at once and the driver re-raises the worker's own error, so the CLI's last
  line names the cause. Anything else (a worker or node lost, a collective timeout) goes to Ray's
  default policy, which restarts the group from the latest checkpoint up to ``train.max_failures``.
- Ctrl-C on the driver asks the workers to stop at their next logged step with a checkpoint (no partial
  files, nothing logged twice); a second Ctrl-C aborts the workers at once; a third raises.
  Ray Train's own SIGINT handler (a "graceful abort" that kills the workers mid-checkpoint) is not used.
"""
from __future__ import annotations

import signal
import sys

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy
from ray.train.v2.api.exceptions import WorkerGroupError

from orchestrator.run.directory import request_stop
from orchestrator.run.errors import is_permanent
from orchestrator.run.storage import location


class PermanentErrorsFail(FailurePolicy):
    """Ray's policy, except that a worker group failing with a permanent error is never restarted."""

    def __init__(self, default: FailurePolicy):
        super().__init__(default.failure_config)
        self.default = default

    def make_decision(self, training_failed_error) -> FailureDecision:
        if isinstance(training_failed_error, WorkerGroupError) and any(
                is_permanent(error) for error in training_failed_error.worker_failures.values()):
            return FailureDecision.RAISE
        return self.default.make_decision(training_failed_error)


class SdoTorchTrainer(TorchTrainer):
    """A TorchTrainer with sdo's failure policy and Ctrl-C (see the module doc)."""

    def __init__(self, *args, run_dir, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_dir = location(run_dir)
        self.interrupts = 0

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = PermanentErrorsFail(controller_init_kwargs["failure_policy"])
        return super()._initialize_and_run_controller(**controller_init_kwargs)

    def _register_sigint_handler(self, controller) -> None:
        def on_sigint(signum, frame):
            self.interrupts += 1
            if self.interrupts == 1:
                request_stop(self.run_dir)
                print("sdo: stopping at the next logged step with a checkpoint (Ctrl-C again to abort now)",
                      file=sys.stderr, flush=True)
            elif self.interrupts == 2:
                print("sdo: aborting the workers", file=sys.stderr, flush=True)
                controller.abort.remote()
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)


def worker_error(error: BaseException) -> BaseException:
    """The error a failed fit should surface: a worker group's root cause (permanent first), else ``error``."""
    from orchestrator.run.errors import root_cause

    if isinstance(error, WorkerGroupError):
        return root_cause(error.worker_failures) or error
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, WorkerGroupError):
        return root_cause(error.cause.worker_failures) or error
    return error
