"""A fixed-batch overfit per precision: does training in bf16 learn what float32 learns?

The recipe's model (by default R50 Sparse DETR rho 0.1, random weights) and training step
(`orchestrator.train.step.train_step`: fused AdamW, gradient clipping, autocast in bf16) train on one
batch of synthetic images (`pipelines.synth`: shapes of five classes on textured backgrounds) for a
fixed number of steps, from the same initial weights in every precision. Reported per precision: the
loss every `log_every` steps, the seconds per step, and the COCO AP / AP50 of the model on that very
batch at the end (eval mode, the same precision; pycocotools).
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from orchestrator.bench.train_device import DEFAULT_CONFIG, matmul_precision

PRECISIONS = ("fp32", "tf32", "bf16")
# a higher rate than the recipe's 2e-4: 150 steps must take a random-weight detector to memorising its batch
OVERRIDES = ("train.lr=5e-4", "train.lr_backbone=1e-4", "train.scale_lr=false", "model.dropout=0.0")


def load_synthetic(root: Path, num_images: int, size: int, seed: int = 0):
    """`num_images` synthetic images written by pipelines.synth and read back as the loader's batch:
    (images uint8 [N, 3, H, W], mask [N, H, W], targets, COCO ground truth)."""
    import numpy as np
    import torch
    from PIL import Image

    from pipelines.synth import generate

    generate(root, num_images, 0, size=size, seed=seed)
    gt = json.loads((root / "annotations" / "instances_train.json").read_text())
    height = max(im["height"] for im in gt["images"])
    width = max(im["width"] for im in gt["images"])
    images = torch.zeros(len(gt["images"]), 3, height, width, dtype=torch.uint8)
    mask = torch.ones(len(gt["images"]), height, width, dtype=torch.bool)
    targets = []
    for i, image in enumerate(gt["images"]):
        pixels = np.array(Image.open(root / "train" / image["file_name"]).convert("RGB"))
        h, w = pixels.shape[:2]
        images[i, :, :h, :w] = torch.from_numpy(pixels).permute(2, 0, 1)
        mask[i, :h, :w] = False
        boxes = [a["bbox"] for a in gt["annotations"] if a["image_id"] == image["id"]]
        labels = [a["category_id"] for a in gt["annotations"] if a["image_id"] == image["id"]]
        targets.append({
            "labels": torch.tensor(labels, dtype=torch.int64),
            "boxes": torch.tensor([[(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h] for x, y, bw, bh in boxes],
                                  dtype=torch.float32).reshape(-1, 4),
            "image_id": image["id"], "orig_size": torch.tensor([h, w])})
    return images, mask, targets, gt


def overfit(precision: str, batch, gt, *, device, config_path: str, overrides: tuple[str, ...], steps: int,
            log_every: int) -> dict:
    """Train from seed 0 on `batch` for `steps` steps in `precision` -> loss curve, step time, AP on the batch."""
    import torch

    from model.build import build_model
    from model.criterion import build_criterion
    from model.postprocess import PostProcess
    from orchestrator.config import load_config
    from orchestrator.train.evaluation import to_device
    from orchestrator.train.step import make_optimizer, train_step
    from pipelines.coco_eval import evaluate, to_coco_predictions

    cfg = load_config(config_path, [*OVERRIDES, f"data.batch_size={batch[0].shape[0]}", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    criterion = build_criterion(cfg.model, cfg.loss).to(device)
    optimizer, _ = make_optimizer(cfg, model, world_size=1)
    amp = torch.bfloat16 if precision == "bf16" else None
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    curve, times = [], []
    with matmul_precision(precision == "tf32"):
        for step in range(1, steps + 1):
            started = time.perf_counter()
            values = train_step(model, criterion, optimizer, scaler, batch, device, amp, cfg.train.clip_max_norm)
            times.append(time.perf_counter() - started)  # train_step reads its loss: the step is done
            if step == 1 or step % log_every == 0 or step == steps:
                curve.append([step, round(values["loss"], 4)])
        model.eval()
        images, mask, _ = to_device(batch[0], batch[1], [], device)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            outputs = model(images, mask)
        sizes = torch.stack([t["orig_size"] for t in batch[2]]).to(device)
        results = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in r.items()}
                   for r in PostProcess(cfg.eval.max_dets)(outputs, sizes)]
    metrics = evaluate(to_coco_predictions(results, [t["image_id"] for t in batch[2]]), gt)
    return {"precision": precision, "loss_curve": curve, "median_step_s": round(statistics.median(times), 4),
            "AP50": round(float(metrics["AP50"]), 4), "AP": round(float(metrics["AP"]), 4)}


def run(*, device: str, precisions=("fp32", "bf16"), steps: int = 150, num_images: int = 8, size: int = 160,
        config_path: str = DEFAULT_CONFIG, overrides: tuple[str, ...] = (), log_every: int = 10) -> dict:
    """Every precision on the same batch -> JSON-ready report; a precision that fails is reported with its
    error and the others still run."""
    import torch

    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"overfit precisions: unknown {unknown}; known: {list(PRECISIONS)}")
    device = torch.device(device)
    report = {"benchmark": "overfit", "device": str(device), "steps": steps, "images": num_images, "size": size,
              "config": config_path, "overrides": [*OVERRIDES, *overrides], "runs": []}
    with tempfile.TemporaryDirectory(prefix="sdo-overfit-") as tmp:
        *batch, gt = load_synthetic(Path(tmp) / "synth", num_images, size)
    report["boxes"] = len(gt["annotations"])
    for precision in precisions:
        try:
            entry = overfit(precision, tuple(batch), gt, device=device, config_path=config_path, overrides=overrides,
                            steps=steps, log_every=log_every)
        except Exception as err:  # noqa: BLE001 - one failing precision is a result; the others still run
            entry = {"precision": precision, "error": f"{type(err).__name__}: {err}"[:500]}
        report["runs"].append(entry)
    return report
