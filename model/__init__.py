"""Sparse DETR in plain PyTorch (imports only torch, numpy, scipy)."""
from model.build import build

__all__ = ["build"]
