"""`sdo launch`, `sdo eval`, `sdo ui`: train, evaluate, browse runs."""
import click

from orchestrator.config import load_config


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Experiment YAML.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable).")
@click.option("--cluster", default=None, help="local | http(s)://HEAD:8265 | KubeRay spec *.yaml")
def launch(config_path: str, overrides: tuple, cluster: str | None) -> None:
    """Train Sparse DETR on Ray Train (embedded locally, a Ray cluster, or Kubernetes)."""
    load_config(config_path, overrides)
    raise click.UsageError("sdo launch is not available in this build yet")


@click.command("eval")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
def eval_cmd(config_path: str, checkpoint: str) -> None:
    """COCO-evaluate a checkpoint (sdo or official) on the validation shards."""
    raise click.UsageError("sdo eval is not available in this build yet")


@click.command()
def ui() -> None:
    """Start the MLflow UI on 127.0.0.1 for the embedded store."""
    raise click.UsageError("sdo ui is not available in this build yet")
