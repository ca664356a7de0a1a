"""Ray Job entry point of a whole sweep: ``python -m orchestrator.sweep --name N [--resume]``."""
import sys

from orchestrator.sweep.tuner import job_main

sys.exit(job_main())
