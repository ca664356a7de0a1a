"""`sdo export`: trained weights as ONNX or a torch.export ExportedProgram."""
from __future__ import annotations

import json

import click


@click.command("export")
@click.option("--model", "model_spec", required=True,
              help="Weights: a checkpoint file or directory, an official file, runs:/<id>/model or models:/<name>/<v>.")
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "torch-export"]), help="What to write.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to write (.onnx / .pt2).")
@click.option("--height", default=640, show_default=True, type=int, help="Input height (the example's with --dynamic).")
@click.option("--width", default=800, show_default=True, type=int, help="Input width (the example's with --dynamic).")
@click.option("--dynamic", is_flag=True, help="One file for every image size (65..4096 px a side).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Experiment YAML of the architecture [default: the config saved with the weights].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable).")
@click.option("--tracking-uri", default=None, help="MLflow store of runs:/ and models:/ URIs.")
def export_cmd(model_spec: str, fmt: str, out: str, height: int, width: int, dynamic: bool, config_path: str | None,
               overrides: tuple, tracking_uri: str | None) -> None:
    """Export a detector: images [B, 3, H, W] -> (pred_logits, pred_boxes)."""
    from orchestrator.inference.export import export
    from orchestrator.inference.source import load_detector

    detector, _ = load_detector(model_spec, config_path, overrides, tracking_uri)
    click.echo(json.dumps(export(detector, fmt, out, height=height, width=width, dynamic=dynamic)))
