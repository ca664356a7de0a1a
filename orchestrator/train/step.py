"""One optimisation step and what it needs: optimiser and schedule, mixed precision, cross-rank means."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from orchestrator.config import Config
from orchestrator.train.evaluation import to_device


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each value over all ranks (keys must be the same on every rank)."""
    if not values or not _distributed():
        return dict(values)
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    packed /= dist.get_world_size()
    return dict(zip(keys, packed.tolist()))


def all_reduce_sum(value: float, device: torch.device) -> float:
    if not _distributed():
        return value
    packed = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return float(packed.item())


def gather_rng_states() -> list[dict]:
    """Every rank's torch RNG state (CPU, and CUDA where used) -> one entry per rank, on every rank.

    Dropout draws from these, and each rank draws a different amount (its images differ in size), so
    an exact resume needs each rank's own state back, not rank 0's.
    """
    state = {"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None}
    if not _distributed():
        return [state]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rng_state(states: list[dict], rank: int, world_size: int) -> bool:
    """Put this rank's saved RNG state back -> whether it was (not when the world size changed)."""
    if len(states) != world_size:
        return False
    state = states[rank]
    torch.set_rng_state(state["cpu"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    return True


def scaled_learning_rates(cfg: Config, world_size: int) -> tuple[float, float]:
    """(lr, lr_backbone), multiplied by sqrt(global_batch / 16) when ``train.scale_lr`` (official recipe)."""
    factor = math.sqrt(cfg.data.batch_size * world_size / 16.0) if cfg.train.scale_lr else 1.0
    return cfg.train.lr * factor, cfg.train.lr_backbone * factor


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on GPU: bf16 (default) or fp16; CPU always trains in fp32."""
    if device.type != "cuda" or cfg.train.amp == "none":
        return None
    return torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16


def make_optimizer(cfg: Config, module: torch.nn.Module, world_size: int):
    """AdamW over the official parameter groups + StepLR dropping by 10 at ``train.lr_drop``."""
    from model.optim import param_groups

    lr, lr_backbone = scaled_learning_rates(cfg, world_size)
    groups = param_groups(module, lr, lr_backbone, cfg.train.lr_linear_proj_mult)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.train.weight_decay)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, cfg.train.lr_drop)


def to_float32(value):
    """Floating tensors of a (nested) model output -> float32; everything else unchanged."""
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    return value


def train_step(model, criterion, optimizer, scaler, batch, device: torch.device, amp_dtype: torch.dtype | None,
               clip_max_norm: float) -> dict[str, float]:
    """One optimisation step on ``batch`` = (images [B, 3, H, W], mask [B, H, W], targets)
    -> {'loss': weighted total, <each weighted loss term>: value}."""
    images, mask, targets = to_device(*batch, device)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        outputs = model(images, mask)
    if amp_dtype is not None:  # matching (scipy) and the losses run in fp32, as official AMP setups do
        outputs = to_float32(outputs)
    loss_dict = criterion(outputs, targets)
    weighted = {k: v * criterion.weight_dict[k] for k, v in loss_dict.items() if k in criterion.weight_dict}
    loss = sum(weighted.values())
    # one device->host copy for the whole report (the matcher already syncs once per step)
    values = dict(zip(["loss", *weighted], torch.stack([loss, *weighted.values()]).detach().float().tolist()))
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(f"loss is {values['loss']}: {values}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_max_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
    scaler.step(optimizer)
    scaler.update()
    return values
