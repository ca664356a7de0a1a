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


def configure_tf32(cfg: Config, device: torch.device) -> bool:
    """float32 matmuls of a GPU run in TF32 (float32 accumulation; cuDNN convolutions already do by torch's
    default) unless ``train.tf32`` is false; -> whether TF32 matmuls are on. A process-wide switch."""
    if device.type != "cuda":
        return False
    enabled = cfg.train.tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    return enabled


def make_optimizer(cfg: Config, module: torch.nn.Module, world_size: int):
    """AdamW over the official parameter groups + StepLR dropping by 10 at ``train.lr_drop``.

    AdamW is fused (one kernel per step for all parameters; the default foreach AdamW took 9.5 ms of an
    H200 step) on CPU and CUDA parameters, also after loading a state saved by an unfused one."""
    from model.optim import param_groups

    lr, lr_backbone = scaled_learning_rates(cfg, world_size)
    groups = param_groups(module, lr, lr_backbone, cfg.train.lr_linear_proj_mult)
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.train.weight_decay, fused=fused or None)
    if fused:
        optimizer.register_load_state_dict_post_hook(_stay_fused)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, cfg.train.lr_drop)


def _stay_fused(optimizer: torch.optim.Optimizer) -> None:
    """A loaded state brings its own 'fused' flag (None from an unfused optimizer) and, then, step counts on
    the host: put both back as the fused kernel needs them."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(param.device, torch.float32)


def train_step(model, criterion, optimizer, scaler, batch, device: torch.device, amp_dtype: torch.dtype | None,
               clip_max_norm: float) -> dict[str, float]:
    """One optimisation step on ``batch`` = (images [B, 3, H, W], mask [B, H, W], targets)
    -> {'loss': weighted total, <each weighted loss term>: value}.

    The targets stay where the loader made them (the CPU): the criterion copies them to the device in one go.
    Under autocast the criterion casts what it scores to float32 itself (matching and losses run in
    fp32, as official AMP setups do)."""
    images, mask, targets = batch
    images, mask, _ = to_device(images, mask, [], device)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        outputs = model(images, mask)
    loss_dict = criterion(outputs, targets)
    names = [k for k in loss_dict if k in criterion.weight_dict]
    weights = torch.tensor([criterion.weight_dict[k] for k in names], dtype=torch.float32).to(device, non_blocking=True)
    weighted = torch.stack([loss_dict[k] for k in names]) * weights
    loss = weighted.sum()
    # one device->host copy for the whole report (after the matcher's, the device has little left to do)
    values = dict(zip(["loss", *names], torch.cat([loss[None], weighted]).detach().float().tolist()))
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
