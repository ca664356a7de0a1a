"""`sdo ops ...`: build the native ms_deform_attn op and tell what is built."""
import click


@click.group()
def ops() -> None:
    """Native deformable-attention op: build, status."""
