"""`sdo sweep`: Ray Tune over rho and the loss weights."""
import click


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Sweep YAML (names a base config).")
def sweep(config_path: str) -> None:
    """Sweep rho and loss weights with Ray Tune (ASHA), tracked in MLflow."""
    raise click.UsageError("sdo sweep is not available in this build yet")
