"""`sdo ui`: the MLflow UI of the embedded store."""
from __future__ import annotations

import time
from pathlib import Path

import click


@click.command()
@click.option("--storage", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="train.storage_path whose embedded MLflow store to show.")
@click.option("--port", default=5000, show_default=True, type=int, help="Port on 127.0.0.1.")
def ui(storage: str, port: int) -> None:
    """Start the MLflow UI on 127.0.0.1 for the embedded store."""
    from orchestrator.run.errors import sigterm_as_interrupt
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
