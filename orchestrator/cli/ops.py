"""`sdo ops ...`: build the native ms_deform_attn op and tell what is built."""
import json

import click


@click.group()
def ops() -> None:
    """Native deformable-attention op: build, status."""


@ops.command("build")
@click.option("--cuda/--no-cuda", default=None,
              help="Compile the CUDA kernels too (default: when torch is a CUDA build and nvcc is found).")
@click.option("--force", is_flag=True, help="Delete the cached build first.")
@click.option("--verbose", is_flag=True, help="Show the compiler output.")
def build_command(cuda, force: bool, verbose: bool) -> None:
    """JIT-build the op (same sources and flags as setup.py), cached under $SDO_OPS_CACHE or ~/.cache/sdo/ops."""
    from orchestrator import ops_build

    click.echo(json.dumps(ops_build.build(cuda=cuda, force=force, verbose=verbose), indent=2))


@ops.command("status")
def status_command() -> None:
    """Print JSON: installed / JIT-built libraries and the implementation used per device."""
    from orchestrator import ops_build

    click.echo(json.dumps(ops_build.status(), indent=2))
