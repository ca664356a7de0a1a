"""`sdo launch`, `sdo eval`, `sdo ui`: train, evaluate, browse runs."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from orchestrator.config import cluster_kind, load_config, validate


def check_local_resume(cfg, cluster: str | None) -> None:
    """``--resume-if-exists`` looks at train.storage_path from where it runs: the RayJob's own command uses it."""
    if cluster_kind(cluster or cfg.cluster.address) != "local":
        raise click.UsageError("--resume-if-exists is decided where the storage is, i.e. inside the job: on "
                               "--cluster *.yaml sdo adds it to the RayJob's command when cluster.backoff_limit > 0")


def run_exists(cfg, name: str) -> bool:
    """Whether train.storage_path holds the run ``name`` (its sdo_run.json): a retried RayJob then resumes it."""
    from orchestrator.run.lifecycle import run_info

    return run_info(cfg, name) is not None


def apply_image(cfg, image: str | None, cluster: str | None) -> None:
    """``--image`` is ``cluster.image``: one image for the head, the workers and the submitter."""
    if image is None:
        return
    if cluster_kind(cluster or cfg.cluster.address) != "kubernetes":
        raise click.UsageError("--image applies to --cluster *.yaml (KubeRay) only; local and Ray Jobs runs use "
                               "the image of the running cluster")
    cfg.cluster.image = image
    validate(cfg)


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
    from orchestrator.cluster.launch import launch as run_launch
    from orchestrator.run.directory import default_name

    cfg = load_config(config_path, overrides)
    apply_image(cfg, image, cluster)
    if (resume or resume_if_exists) and not name:
        raise click.UsageError("--resume needs the --name of the run to continue (so does --resume-if-exists)")
    if resume and resume_if_exists:
        raise click.UsageError("--resume and --resume-if-exists exclude each other")
    if resume_if_exists:
        check_local_resume(cfg, cluster)
        resume = run_exists(cfg, name)
    result = run_launch(cfg, cluster=cluster, name=name or default_name(config_path), resume=resume,
                        dry_run=dry_run, echo=click.echo)
    if isinstance(result, int) and result != 0:
        raise SystemExit(result)


@click.command("eval")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Experiment YAML.")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=True),
              help="sdo checkpoint (directory or checkpoint.pt) or an official {'model': ...} file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable).")
@click.option("--max-batches", type=int, default=None, help="Evaluate only the first N validation batches.")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the model [default: when the images evaluated pay for the compile time, "
                   "see orchestrator.train.evaluation.COMPILE_PAYS_AFTER_IMAGES].")
@click.option("--fast/--exact", default=True, show_default=True,
              help="On a GPU, fast: bf16 autocast on batches padded to multiples of 32 px and, when compiled, CUDA "
                   "graphs; exact: float32 at each batch's own size (the numbers of a training-time eval).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the metrics JSON here.")
def eval_cmd(config_path: str, checkpoint: str, overrides: tuple, max_batches: int | None, compile_: bool | None,
             fast: bool, out: str | None) -> None:
    """COCO-evaluate a checkpoint (sdo or official) on the validation shards."""
    from orchestrator.train.evaluation import evaluate_checkpoint

    cfg = load_config(config_path, overrides)
    metrics = evaluate_checkpoint(cfg, checkpoint, max_batches=max_batches, compile=compile_, fast=fast)
    text = json.dumps(metrics, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    click.echo(text)


@click.command()
@click.option("--storage", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="train.storage_path whose embedded MLflow store to show.")
@click.option("--port", default=5000, show_default=True, type=int, help="Port on 127.0.0.1.")
def ui(storage: str, port: int) -> None:
    """Start the MLflow UI on 127.0.0.1 for the embedded store."""
    from orchestrator.run.failures import sigterm_as_interrupt
    from orchestrator.run.tracking import start_ui, stop_ui, ui_urls

    process = start_ui(Path(storage), port=port)
    click.echo(f"sdo: MLflow UI at http://127.0.0.1:{port} (Ctrl-C stops it)")
    for name, url in ui_urls(Path(storage), port):
        click.echo(f"sdo: experiment {name}: {url}")
    try:
        with sigterm_as_interrupt():  # SIGTERM stops the UI's processes too
            while process.poll() is None:
                time.sleep(0.5)
    except KeyboardInterrupt:
        return
    finally:
        stop_ui(process)
    if process.returncode:
        raise RuntimeError(f"mlflow ui exited with status {process.returncode}")

