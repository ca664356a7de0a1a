"""Optimizer parameter groups as in the official main.py."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def _matches(name: str, keywords: Sequence[str]) -> bool:
    return any(k in name for k in keywords)


def param_groups(model: nn.Module, lr: float, lr_backbone: float, lr_linear_proj_mult: float,
                 linear_proj_names: Sequence[str] = ("reference_points", "sampling_offsets"),
                 backbone_names: Sequence[str] = ("backbone.0",)) -> list[dict]:
    """Three AdamW groups of trainable parameters (shared heads counted once):
    everything else at `lr`, the backbone at `lr_backbone`, and the sampling-offset /
    reference-point projections at `lr * lr_linear_proj_mult` (they move the sampling points,
    which is unstable at the full rate). Each group also carries a 'name' for logging."""
    main, backbone, linear_proj = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _matches(name, backbone_names):
            backbone.append(param)
        elif _matches(name, linear_proj_names):
            linear_proj.append(param)
        else:
            main.append(param)
    return [
        {"params": main, "lr": lr, "name": "main"},
        {"params": backbone, "lr": lr_backbone, "name": "backbone"},
        {"params": linear_proj, "lr": lr * lr_linear_proj_mult, "name": "linear_proj"},
    ]
