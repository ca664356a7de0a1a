"""`sdo launch`: train Sparse DETR where --cluster says (and the options `sdo sweep` shares)."""
from __future__ import annotations

import click

from orchestrator.config import cluster_kind, load_config


def check_local_resume(cfg, cluster: str | None) -> None:
    """``--resume-if-exists`` looks at train.storage_path from where it runs: the RayJob's own command uses it."""
    if cluster_kind(cluster or cfg.cluster.address) != "local":
        raise click.UsageError("--resume-if-exists is decided where the storage is, i.e. inside the job: on "
                               "--cluster *.yaml sdo adds it to the RayJob's command when cluster.backoff_limit > 0")


def run_exists(cfg, name: str) -> bool:
    """Whether train.storage_path holds the run ``name`` (its sdo_run.json): a retried RayJob then resumes it."""
    from orchestrator.run.lifecycle import find_run

    return find_run(cfg, name) is not None


def load_with_image(config_path: str, overrides: tuple, image: str | None, cluster: str | None):
    """The config, with ``--image`` as the override ``cluster.image`` (one image for the head, the workers and
    the submitter; validated with the rest, once)."""
    cfg = load_config(config_path, [*overrides, *([f"cluster.image={image}"] if image is not None else [])])
    if image is not None and cluster_kind(cluster or cfg.cluster.address) != "kubernetes":
        raise click.UsageError("--image applies to --cluster *.yaml (KubeRay) only; local and Ray Jobs runs use "
                               "the image of the running cluster")
    return cfg


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Experiment YAML.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable).")
@click.option("--cluster", default=None,
              help="local (embedded Ray) | http(s)://HEAD:8265 (Ray Jobs API) | KubeRay spec *.yaml "
                   "[default: cluster.address of the config]")
@click.option("--name", default=None, help="Run name: <storage_path>/<name> and the MLflow run name "
                                           "[default: <config stem>-<UTC time>].")
@click.option("--resume", is_flag=True, help="Continue the stopped run --name from its latest checkpoint.")
@click.option("--resume-if-exists", is_flag=True,
              help="Continue the run --name if train.storage_path holds it, else start it (what a retried "
                   "RayJob runs).")
@click.option("--image", default=None, help="Kubernetes only: the image of the head, the workers and the submitter "
                                            "[default: cluster.image, else the cluster spec's].")
@click.option("--dry-run", is_flag=True, help="Print what would be run or submitted, run nothing.")
def launch(config_path: str, overrides: tuple, cluster: str | None, name: str | None, resume: bool,
           resume_if_exists: bool, image: str | None, dry_run: bool) -> None:
    """Train Sparse DETR on Ray Train (embedded locally, a Ray cluster, or Kubernetes)."""
    from orchestrator.cluster.dispatch import train_on
    from orchestrator.run.directory import default_name

    cfg = load_with_image(config_path, overrides, image, cluster)
    if (resume or resume_if_exists) and not name:
        raise click.UsageError("--resume needs the --name of the run to continue (so does --resume-if-exists)")
    if resume and resume_if_exists:
        raise click.UsageError("--resume and --resume-if-exists exclude each other")
    if resume_if_exists:
        check_local_resume(cfg, cluster)
        resume = run_exists(cfg, name)
    result = train_on(cfg, cluster=cluster, name=name or default_name(config_path), resume=resume,
                        dry_run=dry_run, echo=click.echo)
    if isinstance(result, int) and result != 0:
        raise SystemExit(result)
