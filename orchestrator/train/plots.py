"""PNG plots logged to MLflow: loss curves, AP per epoch, and DAM pictures.

A DAM picture shows one validation image three times: as it is, with the tokens the scoring
network selected (top-rho, what the sparse encoder updates), and with the DAM target (the tokens
the decoder's cross-attention actually looks at). Each multi-scale level is a grid over the padded
image; a token is drawn as its cell, levels are overlaid so a coarse token covers a larger area.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

History = Mapping[str, Sequence[tuple[int, float]]]


def loss_curves(history: History, path: Path, keys: Sequence[str] = ("loss", "loss_ce", "loss_bbox", "loss_giou",
                                                                      "loss_mask_prediction")) -> Path:
    """Training losses against the global step: per-step values (every ``train.log_every`` steps) as
    lines, epoch means (``epoch_<key>``) as dots; only keys present in ``history`` are drawn."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for index, key in enumerate(keys):
        colour = f"C{index}"
        if history.get(key):
            steps, values = zip(*history[key])
            ax.plot(steps, values, color=colour, label=key)
        if history.get(f"epoch_{key}"):
            steps, values = zip(*history[f"epoch_{key}"])
            ax.plot(steps, values, "o--", color=colour, label=f"{key} (epoch mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (weighted)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("training losses")
    return _save(fig, path)


def ap_per_epoch(history: History, epochs: Sequence[tuple[int, float]], path: Path,
                 keys: Sequence[str] = ("AP", "AP50", "AP75")) -> Path:
    """COCO AP metrics against the epoch; ``epochs`` maps the metrics' steps to epochs ([(step, epoch)])."""
    step_to_epoch = {step: epoch for step, epoch in epochs}
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(step_to_epoch.get(step, step), value) for step, value in history.get(key, ())]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("COCO metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("validation AP per epoch")
    return _save(fig, path)


def token_map(token_values: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
              size: tuple[int, int]) -> torch.Tensor:
    """Flattened multi-level token values [S] -> [H, W] map: every level upsampled (nearest) to
    ``size`` and averaged, so a pixel's value says on how many levels its token is on."""
    levels = []
    for (h, w), start in zip(spatial_shapes.tolist(), level_start_index.tolist()):
        grid = token_values[start:start + h * w].float().reshape(1, 1, h, w)
        levels.append(F.interpolate(grid, size=size, mode="nearest")[0, 0])
    return torch.stack(levels).mean(0)


def selected_token_values(topk_proposals: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[K] token indices -> [S] binary indicator."""
    values = torch.zeros(num_tokens)
    values[topk_proposals.long().cpu()] = 1.0
    return values


def denormalise(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] ImageNet-normalised -> [H, W, 3] in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def dam_picture(image: torch.Tensor, mask: torch.Tensor, selected: torch.Tensor, target: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, path: Path, title: str = "") -> Path:
    """One image with its selected tokens and DAM target overlaid.

    image [3, H, W] normalised; mask [H, W] bool (True = padding); selected [S] and target [S] in
    {0, 1} over the flattened token grid of the padded image (spatial_shapes [L, 2], level_start_index [L]).
    """
    height, width = image.shape[-2:]
    valid_h = int((~mask.bool()).any(1).sum())
    valid_w = int((~mask.bool()).any(0).sum())
    rgb = denormalise(image)[:valid_h, :valid_w]
    panels = [("image", None),
              (f"selected tokens ({int(selected.sum())})", token_map(selected, spatial_shapes, level_start_index, (height, width))),
              (f"DAM target ({int(target.sum())})", token_map(target, spatial_shapes, level_start_index, (height, width)))]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (name, overlay) in zip(axes, panels):
        ax.imshow(rgb)
        if overlay is not None:
            ax.imshow(overlay[:valid_h, :valid_w].numpy(), cmap="inferno", alpha=0.55, vmin=0, vmax=1)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
