"""Load weights: official Sparse DETR / Deformable DETR checkpoints and sdo checkpoints.

Both are `{'model': state_dict, ...}` files (official ones also hold the optimizer, the lr
scheduler, the epoch and the argparse namespace of the run). Loading is strict: a file whose
keys or shapes differ from the model's is rejected with a ValueError that lists the differences,
and the model is left untouched. `load_for_finetuning` (``model.init_from``) is strict too, except
that class heads of another size start afresh.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn


def _list(keys, limit: int = 12) -> str:
    """'N: a.b.* (n), c.d.e, ...' grouped by the first two name components, so long lists stay readable."""
    groups: dict[str, list] = {}
    for key in sorted(keys):
        groups.setdefault(".".join(key.split(".")[:2]), []).append(key)
    shown = [members[0] if len(members) == 1 else f"{prefix}.* ({len(members)})"
             for prefix, members in groups.items()]
    more = f", ... {len(shown) - limit} more groups" if len(shown) > limit else ""
    return f"{len(keys)}: {', '.join(shown[:limit])}{more}"


def read_checkpoint(path, source=None, map_location="cpu") -> dict:
    """Read a checkpoint file without executing arbitrary pickled code -> the loaded dict.

    ``source``: a binary file object to read instead of opening ``path`` (which then only names it).
    """
    if source is None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint: no such file {path}")
    try:
        # official files pickle their argparse.Namespace of arguments next to the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path if source is None else source, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint: cannot read {path}: {err}") from err
    if not isinstance(ckpt, dict):
        # a bad input file, reported like every other one (the CLI maps ValueError to exit 2)
        raise ValueError(f"checkpoint: {path} holds a {type(ckpt).__name__}, not a dict")  # noqa: TRY004
    return ckpt


def state_dict_of(ckpt: dict, path) -> dict:
    """The model state dict of a read checkpoint (its 'model' entry, or the dict itself), DDP prefix removed."""
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint: {path} has no 'model' state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from a DDP wrapper
    return state


def check_state_dict(model: nn.Module, state: dict, source: str) -> None:
    """Raise ValueError naming missing / unexpected / mis-shaped keys of `state` for `model`."""
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    wrong = {k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)}
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if wrong:
        shapes = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in sorted(wrong)[:8]]
        problems.append(f"wrong shapes: {', '.join(shapes)} ({len(wrong)})")
    if problems:
        raise ValueError(f"checkpoint: {source} does not fit the model: " + "; ".join(problems))


def load_official(model: nn.Module, path) -> dict:
    """Load an official `{'model': state_dict, ...}` file strictly.

    -> report {'path', 'num_tensors', 'num_parameters', 'epoch' (or None)}
    """
    ckpt = read_checkpoint(path)
    if "model" not in ckpt:
        raise ValueError(f"checkpoint: {path} has no 'model' entry (keys: {_list(ckpt.keys())})")
    return _load_strict(model, ckpt, path)


def load_weights(model: nn.Module, path) -> dict:
    """Load an sdo checkpoint ({'model': state_dict, ...}), an official one, or a bare state dict.

    -> the same report as load_official
    """
    return _load_strict(model, read_checkpoint(path), path)


def _load_strict(model: nn.Module, ckpt: dict, path) -> dict:
    """Checked, strict load of a read checkpoint -> the report of load_official / load_weights."""
    state = state_dict_of(ckpt, path)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return {
        "path": str(path),
        "num_tensors": len(state),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "epoch": ckpt.get("epoch") if "model" in ckpt else None,
    }


# Heads whose size follows the label set (num_classes) or the query count (num_queries without two-stage):
# a checkpoint trained on other classes cannot fill them, so fine-tuning starts them afresh. The class heads
# cover the decoder's, the two-stage proposal head and the encoder-aux heads, under all their alias names.
REINITIALISABLE = ("class_embed.", "transformer.decoder.class_embed.", "transformer.encoder.class_embed.",
                   "query_embed.weight")


def _reinitialisable(key: str) -> bool:
    return key.startswith(REINITIALISABLE)


def load_for_finetuning(model: nn.Module, state: dict, source: str) -> list[str]:
    """Load `state` (a checkpoint dict with a 'model' entry, or a bare state dict) into a freshly built `model` whose class count (or query count) may differ.

    Keys whose shapes differ and that belong to the class heads (or `query_embed`) keep the values the
    model was just built with, i.e. they are initialised exactly the way the model initialises them
    (the focal-loss prior on the class biases). Every other key must be present on both sides with
    the same shape; otherwise a ValueError lists the missing / unexpected / mis-shaped keys and the
    model is left untouched.

    -> the sorted list of re-initialised keys (empty when the checkpoint fits as it is)
    """
    state = state_dict_of(state, source)
    expected = model.state_dict()
    reinitialised = sorted(k for k in set(expected) & set(state)
                           if tuple(expected[k].shape) != tuple(state[k].shape) and _reinitialisable(k))
    merged = dict(state)
    for key in reinitialised:
        merged[key] = expected[key]
    check_state_dict(model, merged, source)
    model.load_state_dict(merged, strict=True)
    return reinitialised
