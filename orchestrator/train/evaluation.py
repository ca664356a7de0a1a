"""COCO evaluation of a model over validation shards: per-rank predictions, gathered on rank 0.

Used by the training loop (every ``eval.every`` epochs, under Ray Train) and by `sdo eval`
(one process, no Ray).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
EVAL_KEYS = (*AP_KEYS, "dam_recall")  # what an evaluation measures (val/* in MLflow, stepped by epoch)


def to_device(images: torch.Tensor, mask: torch.Tensor, targets: list[dict], device: torch.device):
    """Move a loader batch to ``device`` (target tensors too; ints such as image_id stay as they are);
    uint8 pixels [B, 3, H, W] become the model's float32 input there (normalised after the copy:
    a quarter of the bytes cross to the device)."""
    from pipelines.transforms import normalize_batch

    moved = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalize_batch(images, mask)
    return images, mask, moved


# `sdo bench model --rhos 0.1 --batch-sizes 1 --modes eager,compile` (R50, 850 x 1040, 2-core CPU):
# compiling took 92.5 s and saved 0.50 s per image (2.28 -> 1.78 s, 1.28x), paid back after 185 images.
# Inference over fewer images stays eager by default. Every new padded image size may compile again, so
# this is the least a workload must be.
COMPILE_PAYS_AFTER_IMAGES = 185
# On an H200 (issue 23: eager 35 FPS, compiled 65 FPS at batch 1, compile 41 s) compiling saves 13 ms an
# image and pays back after ~3000 images (COCO val has 5000).
COMPILE_PAYS_AFTER_IMAGES_GPU = 3000


def inference_module(model: torch.nn.Module, *, compile: bool | None, images: int,
                     fast: bool = False) -> torch.nn.Module:
    """``model`` itself, or ``torch.compile(model)`` when ``compile`` is True, or when it is None (auto) and
    ``images`` (the workload) reach COMPILE_PAYS_AFTER_IMAGES (_GPU on a GPU), so the compile time is paid
    back. ``fast`` on a GPU: model.inference.FastDetector (bf16, batches padded to multiples of 32 px),
    compiled with CUDA graphs (torch.compile mode reduce-overhead)."""
    gpu = next(model.parameters(), torch.empty(0)).device.type == "cuda"
    pays_after = COMPILE_PAYS_AFTER_IMAGES_GPU if gpu else COMPILE_PAYS_AFTER_IMAGES
    wanted = images >= pays_after if compile is None else compile
    if fast and gpu:
        from model.inference import FastDetector

        model = FastDetector(model)
    fast = fast and gpu
    log.info("inference over %d images: %s%s", images, "torch.compile" if wanted else "eager",
             " (bf16, CUDA graphs)" if fast and wanted else " (bf16)" if fast else "")
    if not wanted:
        return model
    return torch.compile(model, mode="reduce-overhead") if fast else torch.compile(model)


def image_id(target: dict) -> int:
    value = target["image_id"]
    return int(value.item() if torch.is_tensor(value) else value)


@torch.no_grad()
def predict(model: torch.nn.Module, postprocess, loader, device: torch.device, *, autocast_dtype=None,
            max_batches: int | None = None, observe=None) -> list[dict]:
    """COCO-format predictions of this process's share of ``loader``.

    -> [{'image_id', 'category_id', 'bbox' [x, y, w, h], 'score'}], boxes in original image pixels.
    ``observe(images, mask, targets, outputs, results)``, when given, sees every batch's forward pass
    (results: PostProcess's per-image dicts on the CPU, original pixels), so that diagnostics such as
    `dam_recall` and pictures cost no second pass.
    """
    from pipelines.coco_eval import to_coco_predictions

    was_training = model.training
    model.eval()
    predictions: list[dict] = []
    try:
        for index, (images, mask, targets) in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            images, mask, targets = to_device(images, mask, targets, device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                outputs = model(images, mask)
            orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
            results = postprocess(outputs, orig_sizes)
            results = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in r.items()} for r in results]
            if observe is not None:
                observe(images, mask, targets, outputs, results)
            predictions.extend(to_coco_predictions(results, [image_id(t) for t in targets]))
    finally:
        model.train(was_training)
    return predictions


def gather_predictions(predictions: list[dict]) -> list[dict] | None:
    """All ranks' predictions on rank 0 (None elsewhere); the identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return predictions
    gathered: list = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(predictions, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    return [p for part in gathered for p in part]


def broadcast(value):
    """Rank 0's ``value`` on every rank (the identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def coco_metrics(predictions: list[dict], ground_truth: dict) -> dict[str, float]:
    """pycocotools AP/AR of ``predictions`` against the shards' ground truth (all 0 without predictions:
    an untrained model may score nothing at all, which is a result, not an error)."""
    from pipelines.coco_eval import evaluate

    if not predictions:
        return {k: 0.0 for k in AP_KEYS}
    return {k: float(v) for k, v in evaluate(predictions, ground_truth).items()}


def write_eval_json(path: Path, metrics: dict, *, epoch: int | None, num_predictions: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"epoch": epoch, "num_predictions": num_predictions, "metrics": metrics}, indent=2))
    return path


def evaluate_checkpoint(cfg, checkpoint: str, *, max_batches: int | None = None,
                        compile: bool | None = None, fast: bool = True) -> dict[str, float]:
    """`sdo eval`: load weights (an sdo or official checkpoint file or directory, or a runs:/ or models:/
    MLflow URI on the config's tracking store) strictly into the configured model, COCO-evaluate it
    on ``data.val_shards`` in this process (GPU when there is one) -> AP/AR metrics. ``compile``: see
    `inference_module` (None = when the validation set is large enough to pay for it); ``fast``: see
    `inference_module` (False: float32 at each batch's own size, the numbers of a training-time eval)."""
    from model.postprocess import PostProcess
    from orchestrator.run.tracking import tracking_uri
    from orchestrator.run.weights import build_detector, read_weights
    from pipelines.loader import make_loader

    model = build_detector(cfg, read_weights(checkpoint, tracking_uri(cfg)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    d = cfg.data
    loader = make_loader(d.val_shards, train=False, batch_size=d.batch_size, num_workers=d.num_workers,
                         shuffle_buffer=0, max_size=d.max_size, val_scale=d.val_scale)
    images = loader.num_samples if max_batches is None else min(loader.num_samples, max_batches * d.batch_size)
    model = inference_module(model, compile=compile, images=images, fast=fast)
    predictions = predict(model, PostProcess(cfg.eval.max_dets), loader, device, max_batches=max_batches)
    gt = loader.ground_truth()  # the samples the loader really decoded: one parser for predictions and truth
    if max_batches is not None:  # score only the images that were predicted
        seen = {p["image_id"] for p in predictions}
        gt = {**gt, "images": [i for i in gt["images"] if i["id"] in seen],
              "annotations": [a for a in gt["annotations"] if a["image_id"] in seen]}
    return coco_metrics(predictions, gt)
