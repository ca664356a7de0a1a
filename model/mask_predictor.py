"""The scoring network of Sparse DETR (official name: MaskPredictor / `enc_mask_predictor`)."""
from __future__ import annotations

import torch
from torch import nn


class MaskPredictor(nn.Module):
    """Predicts per-token saliency from the projected backbone tokens.

    Half of the hidden features stay per token (local); the other half is averaged over the
    image's valid tokens (global context), broadcast back and concatenated before the MLP.

    forward(x [B, S, in_dim], padding_mask [B, S] bool (True = padding) or None) -> logits [B, S, 1]
    """

    def __init__(self, in_dim: int, h_dim: int):
        super().__init__()
        self.h_dim = h_dim
        self.layer1 = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, h_dim), nn.GELU())
        self.layer2 = nn.Sequential(
            nn.Linear(h_dim, h_dim // 2), nn.GELU(),
            nn.Linear(h_dim // 2, h_dim // 4), nn.GELU(),
            nn.Linear(h_dim // 4, 1),
        )

    def forward(self, x, padding_mask=None):
        z = self.layer1(x)
        z_local, z_global = torch.split(z, self.h_dim // 2, dim=-1)
        if padding_mask is None:
            z_global = z_global.mean(dim=1, keepdim=True)
        else:
            # the official code averages over padding as well; averaging over the valid tokens keeps
            # an image's scores independent of the padding its batch adds (same for unpadded images)
            valid = (~padding_mask).unsqueeze(-1).to(z_global.dtype)
            z_global = (z_global * valid).sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp(min=1)
        z = torch.cat([z_local, z_global.expand(-1, z_local.shape[1], -1)], dim=-1)
        return self.layer2(z)
