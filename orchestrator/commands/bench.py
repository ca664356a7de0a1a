"""`sdo bench ...`: benchmarks that print JSON (ops, data, train, flops)."""
import click


@click.group()
def bench() -> None:
    """Benchmarks; each prints one JSON document (and writes it with --out)."""
