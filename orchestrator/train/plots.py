"""PNG plots logged to MLflow: loss curves, AP per epoch, prediction pictures and DAM pictures.

A prediction picture shows one validation image with its ground-truth boxes (dashed, white) and the
detections above a score threshold (solid, one colour per class), each labelled with class and score.

A DAM picture shows one validation image three times: as it is, with the tokens the scoring
network selected (top-rho, what the sparse encoder updates), and with the DAM target (the tokens
the decoder's cross-attention actually looks at), the ground-truth boxes on each. Each multi-scale
level is a grid over the padded image; a token is drawn as its cell and the levels are averaged, so
the colour bar reads "fraction of levels whose token here is on". Panel titles count the tokens on
per level (on / valid), and the figure title gives the image's dam_recall.
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
    """[3, H, W] uint8 pixels or ImageNet-normalised floats -> [H, W, 3] in [0, 1]."""
    if image.dtype == torch.uint8:
        return (image.cpu().float() / 255).permute(1, 2, 0).numpy()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def valid_extent(mask: torch.Tensor) -> tuple[int, int]:
    """mask [H, W] bool (True = padding) -> (valid height, valid width) of the image in its padded frame."""
    return int((~mask.bool()).any(1).sum()), int((~mask.bool()).any(0).sum())


def level_counts(values: torch.Tensor, valid: torch.Tensor, spatial_shapes: torch.Tensor,
                 level_start_index: torch.Tensor) -> list[tuple[int, int]]:
    """values [S] in {0, 1}, valid [S] bool -> [(tokens on, valid tokens)] per level."""
    counts = []
    for (h, w), start in zip(spatial_shapes.tolist(), level_start_index.tolist()):
        level = slice(start, start + h * w)
        counts.append((int((values[level] * valid[level]).sum()), int(valid[level].sum())))
    return counts


def _draw_boxes(ax, boxes, *, colour="white", style="--", labels=None) -> None:
    """boxes [N, 4] absolute xyxy pixels; labels: N strings or None."""
    for index, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=float).reshape(-1, 4)):
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linestyle=style,
                                   linewidth=1.5))
        if labels is not None:
            ax.text(x0, y0, labels[index], color="black", fontsize=7, va="bottom",
                    bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "edgecolor": "none"})


def dam_picture(image: torch.Tensor, mask: torch.Tensor, selected: torch.Tensor, target: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, path: Path, title: str = "",
                boxes: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> Path:
    """One image with its selected tokens and DAM target overlaid.

    image [3, H, W] (uint8 or normalised); mask [H, W] bool (True = padding); selected [S] and target [S]
    in {0, 1} over the flattened token grid of the padded image (spatial_shapes [L, 2], level_start_index
    [L]); boxes [N, 4] ground truth, absolute xyxy pixels of the padded frame; valid [S] bool, the
    image's unpadded tokens (all when None).
    """
    height, width = image.shape[-2:]
    valid_h, valid_w = valid_extent(mask)
    valid = torch.ones_like(selected, dtype=torch.bool) if valid is None else valid.bool()
    rgb = denormalise(image)[:valid_h, :valid_w]
    recall = float((selected * target).sum() / target.sum().clamp(min=1))

    def counts(values):
        return "  ".join(f"L{level} {on}/{total}" for level, (on, total)
                         in enumerate(level_counts(values, valid, spatial_shapes, level_start_index)))

    panels = [("image + ground truth", None),
              (f"selected tokens ({int(selected.sum())})\n{counts(selected)}",
               token_map(selected, spatial_shapes, level_start_index, (height, width))),
              (f"DAM target ({int(target.sum())})\n{counts(target)}",
               token_map(target, spatial_shapes, level_start_index, (height, width)))]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    shown = None
    for ax, (name, overlay) in zip(axes, panels):
        ax.imshow(rgb)
        if overlay is not None:
            shown = ax.imshow(overlay[:valid_h, :valid_w].numpy(), cmap="inferno", alpha=0.55, vmin=0, vmax=1)
        if boxes is not None:
            _draw_boxes(ax, boxes, colour="cyan")
        ax.set_xlim(-0.5, valid_w - 0.5)
        ax.set_ylim(valid_h - 0.5, -0.5)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    bar = fig.colorbar(shown, ax=list(axes), fraction=0.025, pad=0.01)
    bar.set_label(f"fraction of the {len(spatial_shapes)} levels whose token here is on", fontsize=8)
    fig.suptitle(f"{title}   dam_recall {recall:.2f} (target tokens that are selected)".strip(), fontsize=10)
    return _save(fig, path, tight=False)


def prediction_picture(image: torch.Tensor, mask: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                       boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, names: Mapping[int, str],
                       path: Path, title: str = "", score_threshold: float = 0.2, max_drawn: int = 10) -> Path:
    """One image with its ground truth and detections.

    image [3, H, W] (uint8 or normalised), mask [H, W] bool (True = padding); gt_boxes [N, 4] and boxes
    [K, 4] absolute xyxy pixels of the padded frame; gt_labels [N], labels [K], scores [K]; names:
    category id -> name. The ``max_drawn`` best detections scoring at least ``score_threshold`` are drawn.
    """
    valid_h, valid_w = valid_extent(mask)
    fig, ax = plt.subplots(figsize=(5.5, 5.5 * valid_h / max(valid_w, 1) + 0.6))
    ax.imshow(denormalise(image)[:valid_h, :valid_w])
    _draw_boxes(ax, gt_boxes, colour="white", style="--",
                labels=[f"gt {names.get(int(c), int(c))}" for c in gt_labels.tolist()])
    shown = scores.argsort(descending=True)[:max_drawn]
    shown = shown[scores[shown] >= score_threshold]
    for box, label, score in zip(boxes[shown].tolist(), labels[shown].tolist(), scores[shown].tolist()):
        _draw_boxes(ax, [box], colour=f"C{int(label) % 10}", style="-",
                    labels=[f"{names.get(int(label), int(label))} {score:.2f}"])
    ax.set_xlim(-0.5, valid_w - 0.5)
    ax.set_ylim(valid_h - 0.5, -0.5)
    ax.axis("off")
    ax.set_title(f"{title}\nground truth (dashed, {len(gt_labels)}) and the {len(shown)} best detections "
                 f"with score >= {score_threshold:g}".strip(), fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path, tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:  # tight_layout cannot place a colour bar shared by several axes
        fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
