"""A small Sparse DETR (rho 0.3, encoder aux loss, DAM loss) memorises 16 synthetic images.

End-to-end check that model, matcher, losses, post-processing and COCO evaluation fit together:
if any of them is wrong (boxes in the wrong format, labels off by one, a loss with the wrong sign,
gradients that do not reach a head) the detector cannot reach AP50 >= 0.9 on its own training images.
"""
import json

import numpy as np
import torch
from PIL import Image

from model.build import build
from model.optim import param_groups
from model.postprocess import PostProcess
from orchestrator.config import BackboneConfig, LossConfig, ModelConfig
from pipelines.coco_eval import evaluate, to_coco_predictions
from pipelines.synth import generate

NUM_IMAGES = 16
IMAGE_SIZE = 128
MAX_STEPS = 120
EVAL_FROM, EVAL_EVERY = 20, 5
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def load_batch(root):
    """The synthetic train split as one padded batch: images [N, 3, H, W], mask [N, H, W], targets, COCO gt."""
    gt = json.loads((root / "annotations" / "instances_train.json").read_text())
    height = max(im["height"] for im in gt["images"])
    width = max(im["width"] for im in gt["images"])
    images = torch.zeros(len(gt["images"]), 3, height, width)
    mask = torch.ones(len(gt["images"]), height, width, dtype=torch.bool)
    targets = []
    for i, im in enumerate(gt["images"]):
        pixels = np.array(Image.open(root / "train" / im["file_name"]).convert("RGB"))
        h, w = pixels.shape[:2]
        images[i, :, :h, :w] = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - MEAN) / STD
        mask[i, :h, :w] = False
        anns = [a for a in gt["annotations"] if a["image_id"] == im["id"]]
        boxes = torch.tensor([[(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h] for x, y, bw, bh in
                              (a["bbox"] for a in anns)], dtype=torch.float32).reshape(-1, 4)
        targets.append({"labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64), "boxes": boxes,
                        "image_id": im["id"], "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w])})
    return images, mask, targets, gt


def small_config():
    return ModelConfig(
        backbone=BackboneConfig(name="resnet18", weights=None, train=True), num_classes=6, hidden_dim=64, nheads=4,
        enc_layers=2, dec_layers=2, dim_feedforward=128, dropout=0.0, num_queries=30, rho=0.3,
        use_enc_aux_loss=True, eff_query_init=True, eff_specific_head=True)


def test_small_sparse_detr_overfits_synthetic_images(tmp_path):
    generate(tmp_path / "synth", NUM_IMAGES, 0, size=IMAGE_SIZE, seed=0)
    images, mask, targets, gt = load_batch(tmp_path / "synth")
    torch.manual_seed(0)
    model, criterion = build(small_config(), LossConfig())
    postprocess = PostProcess()
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, lr_backbone=1e-4, lr_linear_proj_mult=0.1),
                                  weight_decay=1e-4)
    orig_sizes = torch.stack([t["orig_size"] for t in targets])
    image_ids = [t["image_id"] for t in targets]
    history = []
    for step in range(1, MAX_STEPS + 1):
        losses = criterion(model(images, mask), targets)
        loss = sum(losses[k] * criterion.weight_dict[k] for k in losses)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        if step >= EVAL_FROM and step % EVAL_EVERY == 0:
            model.eval()
            with torch.no_grad():
                results = postprocess(model(images, mask), orig_sizes)
            model.train()
            metrics = evaluate(to_coco_predictions(results, image_ids), gt)
            history.append((step, round(loss.item(), 3), round(metrics["AP50"], 3), round(metrics["AP"], 3)))
            if metrics["AP50"] >= 0.9:
                break
    print("step, loss, AP50, AP:", history)
    assert "loss_mask_prediction" in losses and "loss_ce_enc_0" in losses
    assert history[-1][2] >= 0.9, history
