"""`sdo predict`: detect objects in image files with trained weights."""
from __future__ import annotations

import json

import click


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model_spec", required=True,
              help="Weights: a checkpoint file or directory, an official file, runs:/<id>/model or models:/<name>/<v>.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for detections.json (COCO format) and pictures/.")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Experiment YAML of the architecture [default: the config saved with the weights; "
                   "needed for official checkpoints].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable).")
@click.option("--score-threshold", default=0.3, show_default=True, type=float,
              help="Keep detections scoring at least this (0 keeps the top eval.max_dets of every image).")
@click.option("--batch-size", default=1, show_default=True, type=int, help="Images per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N")
@click.option("--classes", "classes_source", default=None,
              help="Shard directory or index.json naming the classes [default: the shards of the weights' config].")
@click.option("--tracking-uri", default=None,
              help="MLflow store of runs:/ and models:/ URIs [default: the config's, $MLFLOW_TRACKING_URI, "
                   "or ./runs/mlflow].")
@click.option("--no-pictures", is_flag=True, help="Write detections.json only.")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the model [default: when the images pay for the compile time, "
                   "see orchestrator.train.evaluation.COMPILE_PAYS_AFTER_IMAGES].")
@click.option("--fast/--exact", default=True, show_default=True,
              help="On a GPU, fast: bf16 autocast on batches padded to multiples of 32 px and, when compiled, CUDA "
                   "graphs; exact: float32 at each batch's own size (the numbers of a training-time eval).")
def predict(inputs: tuple, model_spec: str, out_dir: str, config_path: str | None, overrides: tuple,
            score_threshold: float, batch_size: int, device: str, classes_source: str | None,
            tracking_uri: str | None, no_pictures: bool, compile_: bool | None, fast: bool) -> None:
    """Detect objects in IMAGE_OR_DIR... and write COCO-format detections and pictures to --out."""
    import torch

    from orchestrator.inference.predict import class_names
    from orchestrator.inference.predict import predict as run_predict
    from orchestrator.inference.source import load_detector

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here")
    model, cfg = load_detector(model_spec, config_path, overrides, tracking_uri)
    report = run_predict(model, cfg, inputs, out_dir, names=class_names(cfg, classes_source),
                         score_threshold=score_threshold, batch_size=batch_size, device=device,
                         pictures=not no_pictures, compile=compile_, fast=fast)
    click.echo(json.dumps({"out_dir": report.out_dir, "images": report.images, "detections": report.detections,
                           "skipped": report.skipped}))
    if report.skipped:
        click.echo(f"sdo: skipped {report.skipped} unreadable file(s), e.g. {report.skipped_files[0]}", err=True)
