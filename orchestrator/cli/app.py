"""`sdo` command line: a thin layer over library functions.

Library code raises; this module turns exceptions into one line on stderr and an exit code:
2 for bad input (config, CLI, data, cluster spec), 1 for a failure while running.
"""
from __future__ import annotations

import sys
import traceback

import click

from orchestrator.cli import bench, data, eval, export, launch, ops, predict, sweep, ui
from orchestrator.run.errors import RunInterrupted

# Exceptions that mean "the user gave us something wrong" -> exit code 2.
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, KeyError)


def _message(err: BaseException) -> str:
    text = str(err) if not isinstance(err, KeyError) else (err.args[0] if err.args else "")
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


class ErrorReportingGroup(click.Group):
    """Runs the command; library exceptions become `sdo: error: ...` and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt as err:
            # RunInterrupted says how to resume: "interrupted; continue with sdo launch --name N --resume"
            click.echo(f"sdo: {err}" if isinstance(err, RunInterrupted) else "sdo: interrupted", err=True)
            sys.exit(130)
        except Exception as err:  # noqa: BLE001 - the CLI is the one place that reports everything
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            code = 2 if isinstance(err, BAD_INPUT) else 1
            kind = "error" if code == 2 else "failed"
            click.echo(f"sdo: {kind}: {_message(err)}", err=True)
            sys.exit(code)


@click.group(cls=ErrorReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """sdo - the Sparse DETR orchestrator: train, sweep and evaluate Sparse DETR on Ray + MLflow."""
    from orchestrator.train.console import set_verbose

    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    set_verbose(verbose)


main.add_command(launch.launch)
main.add_command(eval.eval_cmd)
main.add_command(ui.ui)
main.add_command(sweep.sweep)
main.add_command(data.data)
main.add_command(bench.bench)
main.add_command(ops.ops)
main.add_command(predict.predict)
main.add_command(export.export_cmd)

