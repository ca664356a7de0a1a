"""What an evaluation pass shows besides COCO AP, taken from the same forward passes.

- ``dam_recall``: per val image, the fraction of its DAM-target tokens (where the decoder's
  cross-attention looks) that the scoring network selected (what the sparse encoder updates),
  averaged over all val images of all ranks (padding images excluded). 1 means the scoring
  network has learnt the decoder's saliency exactly; a random selection scores about rho.
- Prediction pictures (``eval.pred_images``) and DAM pictures (``eval.dam_images``) of the first
  val images of rank 0, written under ``<out_dir>/predictions`` and ``<out_dir>/dam``.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from orchestrator.train.evaluation import image_id


def _to_xyxy_pixels(boxes: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """[N, 4] normalised cxcywh of an image of size (h, w) -> [N, 4] absolute xyxy pixels."""
    from model.box_ops import box_cxcywh_to_xyxy

    height, width = size.tolist()
    return box_cxcywh_to_xyxy(boxes.float().cpu()) * torch.tensor([width, height, width, height], dtype=torch.float32)


class EvalDiagnostics:
    """An ``observe`` callback for `evaluation.predict`; ``draw`` only on the rank that logs."""

    def __init__(self, out_dir: Path, *, epoch: int, draw: bool, pred_images: int, dam_images: int,
                 categories: Mapping[int, str], score_threshold: float = 0.2, rho: float = 0.0):
        self.out_dir, self.epoch, self.rho = Path(out_dir), epoch, rho
        self.pred_wanted = pred_images if draw else 0
        self.dam_wanted = dam_images if draw and rho > 0 else 0
        self.names, self.score_threshold = dict(categories), score_threshold
        self.recall_sum, self.recall_count = 0.0, 0
        self.pictures: list[Path] = []
        self._preds_drawn = self._dams_drawn = 0

    def __call__(self, images, mask, targets, outputs, results) -> None:
        from model.dam import dam_recall, dam_target

        real = [b for b, t in enumerate(targets) if image_id(t) >= 0]  # negative ids pad the last val batch
        target = None
        if "backbone_topk_proposals" in outputs:
            target = dam_target(outputs)
            recall = dam_recall(outputs, target).cpu()
            self.recall_sum += float(recall[real].sum())
            self.recall_count += len(real)
        for b in real:
            if self._preds_drawn < self.pred_wanted:
                self._prediction_picture(images[b], mask[b], targets[b], results[b])
            if target is not None and self._dams_drawn < self.dam_wanted:
                self._dam_picture(images[b], mask[b], targets[b], outputs, target, b)

    def _prediction_picture(self, image, mask, target, result) -> None:
        from orchestrator.train import plots

        size = target["size"].cpu()
        # results are in original pixels: back to the resized image the model saw
        scale = (size.float() / target["orig_size"].cpu().float()).flip(0).repeat(2)
        number = image_id(target)
        self.pictures.append(plots.prediction_picture(
            image.cpu(), mask.cpu(), _to_xyxy_pixels(target["boxes"], size), target["labels"].cpu(),
            result["boxes"] * scale, result["labels"], result["scores"], self.names,
            self.out_dir / "predictions" / f"epoch_{self.epoch:04d}" / f"image{number}.png",
            title=f"epoch {self.epoch}, image {number}", score_threshold=self.score_threshold))
        self._preds_drawn += 1

    def _dam_picture(self, image, mask, target, outputs, dam_targets, b) -> None:
        from orchestrator.train import plots

        kept = int(outputs["sparse_token_nums"][b])  # [B, K] rows are padded to the batch's largest K
        num_tokens = dam_targets.shape[1]
        selected = plots.selected_token_values(outputs["backbone_topk_proposals"][b, :kept], num_tokens)
        valid = ~outputs["mask_flatten"][b].cpu()
        number = image_id(target)
        self.pictures.append(plots.dam_picture(
            image.cpu(), mask.cpu(), selected * valid, dam_targets[b].cpu() * valid,
            outputs["spatial_shapes"].cpu(), outputs["level_start_index"].cpu(),
            self.out_dir / "dam" / f"epoch_{self.epoch:04d}" / f"dam_image{number}.png",
            title=f"epoch {self.epoch}, image {number}, rho={self.rho}",
            boxes=_to_xyxy_pixels(target["boxes"], target["size"].cpu()), valid=valid))
        self._dams_drawn += 1
