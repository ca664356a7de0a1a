"""Alias of ``python -m orchestrator.cluster.jobs``, the Ray Job entry point of a training.

Jobs submitted and manifests rendered before the orchestrator/ layout change run
``python -m orchestrator.launch``; keep this until none of those remain.
"""
import sys

from orchestrator.cluster.jobs import job_main

if __name__ == "__main__":
    sys.exit(job_main())
