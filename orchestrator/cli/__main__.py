"""``python -m orchestrator.cli``: the same as the `sdo` console script."""
from orchestrator.cli.app import main

main()
