"""`sdo eval`: COCO AP of a checkpoint on the validation shards."""
from __future__ import annotations

import json
from pathlib import Path

import click

from orchestrator.config import load_config


@click.command("eval")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Experiment YAML.")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=True),
              help="sdo checkpoint (directory or checkpoint.pt) or an official {'model': ...} file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable).")
@click.option("--max-batches", type=int, default=None, help="Evaluate only the first N validation batches.")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the model [default: when the images evaluated pay for the compile time, "
                   "see orchestrator.train.evaluation.COMPILE_PAYS_AFTER_IMAGES].")
@click.option("--fast/--exact", default=False, show_default=True,
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
