"""`sdo sweep`: Ray Tune over rho and the loss weights."""

import click


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Sweep YAML: a training config (usually `base: ...`) with a `sweep:` section.")
@click.option("--cluster", default=None, help="local | http(s)://HEAD:8265 (Ray Jobs) | KubeRay spec *.yaml")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable).")
@click.option("--name", default=None, help="Sweep name (default: the config file's name + UTC time); results in "
              "<train.storage_path>/sweeps/<name>.")
@click.option("--resume", is_flag=True, help="Continue the interrupted sweep of that name (finished trials are kept).")
@click.option("--resume-if-exists", is_flag=True,
              help="Continue the sweep --name if train.storage_path holds it, else start it (what a retried RayJob runs).")
@click.option("--image", default=None, help="Kubernetes only: the image of the head, the workers and the submitter "
                                            "[default: cluster.image, else the cluster spec's].")
@click.option("--dry-run", is_flag=True, help="Check the config and space and print what would run; start nothing.")
def sweep(config_path: str, cluster: str, overrides: tuple, name: str, resume: bool, resume_if_exists: bool,
          image: str | None, dry_run: bool) -> None:
    """Sweep rho and loss weights with Ray Tune (ASHA), tracked in MLflow.

    Every trial is a full `sdo launch` training (a Ray Train TorchTrainer) nested as an MLflow child
    run of the sweep's parent run. At the end a table of trials and the Pareto front of AP vs GFLOPs
    are printed and logged to the parent run.

    With `sweep.objectives` (e.g. AP max and latency_ms or gflops min) the search and the early stopping
    (MO-ASHA) weigh every objective, and the report's front is over all of them.

    Exit status: 0 all trials ended (completed or stopped early), 1 some trial failed (or more than
    sweep.max_failures did, which ends the sweep), 130 interrupted (continue with --resume), 2 bad config,
    search space or objective.
    """
    from orchestrator.cli.launch import check_local_resume, load_with_image
    from orchestrator.run.directory import default_name
    from orchestrator.sweep.runs import STATE_FILE
    from orchestrator.sweep.tuner import sweep_dir, sweep_on

    if (resume or resume_if_exists) and not name:
        raise click.UsageError("--resume needs the --name of the sweep to continue (so does --resume-if-exists)")
    if resume and resume_if_exists:
        raise click.UsageError("--resume and --resume-if-exists exclude each other")
    cfg = load_with_image(config_path, overrides, image, cluster)
    if resume_if_exists:
        check_local_resume(cfg, cluster)
        resume = (sweep_dir(cfg, name) / STATE_FILE).is_file()
    result = sweep_on(cfg, name=name or default_name(config_path), cluster=cluster, resume=resume, dry_run=dry_run,
                 echo=click.echo)
    if isinstance(result, dict):
        if result["interrupted"]:
            raise SystemExit(130)
        if result["failed"]:
            raise SystemExit(1)
        return
    if result:
        raise SystemExit(result)
