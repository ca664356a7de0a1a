"""The `sdo` command line: the click app (``app``) and one module per command group."""
from orchestrator.cli.app import ErrorReportingGroup, main

__all__ = ["ErrorReportingGroup", "main"]
