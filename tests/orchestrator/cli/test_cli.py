"""The `sdo` CLI frame: commands listed, --help everywhere, one-line errors with exit codes."""
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from orchestrator.cli import ErrorReportingGroup, main

ROOT = Path(__file__).resolve().parents[3]
COMMANDS = ["launch", "sweep", "eval", "predict", "export", "data", "bench", "ops", "ui"]


def test_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f"  {name} " in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_console_script_reports_unknown_override_with_exit_2():
    """The issue's acceptance check, through the installed console script."""
    sdo = Path(sys.executable).with_name("sdo")
    proc = subprocess.run([str(sdo), "launch", "--config", "configs/demo.yaml", "--set", "train.epochz=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "train.epochz" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def _group_with(exc: Exception) -> click.Group:
    @click.group(cls=ErrorReportingGroup)
    @click.option("--verbose", is_flag=True)
    @click.pass_context
    def root(ctx, verbose):
        ctx.ensure_object(dict)
        ctx.obj["verbose"] = verbose

    @root.command()
    def boom():
        raise exc

    return root


@pytest.mark.parametrize(
    "exc, code",
    [
        (ValueError("data.batch_size=0: must be >= 1"), 2),
        (FileNotFoundError("shards not found: /nowhere"), 2),
        (RuntimeError("worker group failed"), 1),
        (OSError("disk full"), 1),
    ],
)
def test_library_exceptions_become_one_line_and_exit_code(exc, code):
    result = CliRunner().invoke(_group_with(exc), ["boom"])
    assert result.exit_code == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(exc).splitlines()[0] in lines[0]
    assert "Traceback" not in result.stderr


def test_verbose_shows_the_traceback():
    result = CliRunner().invoke(_group_with(RuntimeError("deep failure")), ["--verbose", "boom"])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "deep failure" in result.stderr


def test_missing_config_file_is_bad_input():
    result = CliRunner().invoke(main, ["launch", "--config", "no/such.yaml"])
    assert result.exit_code == 2
    assert "no/such.yaml" in result.stderr
