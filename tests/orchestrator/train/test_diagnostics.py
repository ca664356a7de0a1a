"""Evaluation diagnostics on a real tiny model and real val shards: dam_recall averages the real
(unpadded) val images, and the prediction and DAM pictures are written per epoch."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from train_helpers import make_shards, tiny_config

from model import build
from model.dam import dam_recall
from model.postprocess import PostProcess
from orchestrator.train import evaluation, plots
from orchestrator.train.diagnostics import EvalDiagnostics
from pipelines.loader import make_loader


def test_dam_recall_and_pictures_of_one_eval_pass(tmp_path):
    shards = make_shards(tmp_path, num_train=2, num_val=5, size=64)
    _, cfg = tiny_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs")
    torch.manual_seed(0)
    model, _ = build(cfg.model, cfg.loss)
    postprocess = PostProcess()
    loader = make_loader(shards["val"], train=False, batch_size=2, shuffle_buffer=0, max_size=96, val_scale=64)
    names = {c["id"]: c["name"] for c in loader.index["categories"]}
    diagnostics = EvalDiagnostics(tmp_path / "plots", epoch=3, draw=True, pred_images=2, dam_images=3,
                                  categories=names, rho=cfg.model.rho)
    recalls = []  # reference: dam_recall of each real image (5 images in batches of 2: the third is padded)

    def observe(images, mask, targets, outputs, results):
        recalls.extend(float(r) for r, t in zip(dam_recall(outputs), targets) if evaluation.image_id(t) >= 0)
        diagnostics(images, mask, targets, outputs, results)

    evaluation.predict(model, postprocess, loader, torch.device("cpu"), observe=observe)
    assert diagnostics.recall_count == len(recalls) == 5
    assert abs(diagnostics.recall_sum / diagnostics.recall_count - sum(recalls) / 5) < 1e-6

    written = sorted(p.relative_to(tmp_path / "plots").as_posix() for p in diagnostics.pictures)
    assert written == ["dam/epoch_0003/dam_image1.png", "dam/epoch_0003/dam_image2.png",
                       "dam/epoch_0003/dam_image3.png",
                       "predictions/epoch_0003/image1.png", "predictions/epoch_0003/image2.png"]
    for path in diagnostics.pictures:
        with Image.open(path) as picture:
            assert picture.format == "PNG" and min(picture.size) > 200


def test_pictures_take_uint8_images(tmp_path):
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    mask = torch.zeros(48, 64, dtype=torch.bool)
    mask[:, 56:] = True
    assert np.allclose(plots.denormalise(image), image.permute(1, 2, 0).numpy() / 255)
    boxes = torch.tensor([[4.0, 4.0, 30.0, 40.0]])
    path = plots.prediction_picture(image, mask, boxes, torch.tensor([2]), boxes + 1, torch.tensor([2]),
                                    torch.tensor([0.9]), {2: "ellipse"}, tmp_path / "p.png")
    assert Image.open(path).format == "PNG"
