"""Small building blocks shared by the transformer and the detection heads."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Plain multi-layer perceptron (ReLU between layers), the box head of DETR.

    forward(x [..., input_dim]) -> [..., output_dim]
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + hidden, hidden + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


def inverse_sigmoid(x, eps: float = 1e-5):
    """logit(x), clamped so that boxes touching 0 or 1 stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    """n independent deep copies (same initial values)."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])
