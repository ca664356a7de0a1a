"""The worker's building blocks without Ray: optimiser groups, lr scaling, one train step."""
from __future__ import annotations

import math

import pytest
import torch
from train_helpers import make_shards, tiny_config

from orchestrator.bench.train import _extend, _summary
from orchestrator.train.step import (
    autocast_dtype,
    make_optimizer,
    scaled_learning_rates,
    train_step,
)

VARIANTS = {
    "sparse": [],
    "dense_two_stage": ["model.rho=0", "model.use_enc_aux_loss=false", "model.eff_query_init=false",
                        "model.eff_specific_head=false"],
    "one_stage": ["model.rho=0", "model.use_enc_aux_loss=false", "model.eff_query_init=false",
                  "model.eff_specific_head=false", "model.two_stage=false", "model.with_box_refine=false"],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    shards = make_shards(root, num_train=4, num_val=2, size=64)
    path, _ = tiny_config(root / "tiny.yaml", shards, root / "runs")
    from pipelines.loader import make_loader

    loader = make_loader(str(shards["train"]), train=True, batch_size=2, scales=(64,), max_size=64,
                         random_crop=False, shuffle_buffer=0)
    return path, next(iter(loader))


def _build(path, overrides):
    from model import build
    from orchestrator.config import load_config

    cfg = load_config(path, overrides)
    torch.manual_seed(0)
    model, criterion = build(cfg.model, cfg.loss)
    optimizer, scheduler = make_optimizer(cfg, model, world_size=1)
    return model, criterion, optimizer, scheduler


def test_lr_scaling_follows_the_official_square_root_rule(tmp_path):
    from orchestrator.config import load_config

    cfg = load_config(None, ["data.batch_size=4", "train.lr=2e-4", "train.lr_backbone=2e-5"])
    assert scaled_learning_rates(cfg, world_size=8) == pytest.approx((2e-4 * math.sqrt(2), 2e-5 * math.sqrt(2)))
    cfg.train.scale_lr = False
    assert scaled_learning_rates(cfg, world_size=8) == (2e-4, 2e-5)
    assert autocast_dtype(cfg, torch.device("cpu")) is None  # CPU always trains in fp32


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_optimizer_groups_and_step_lr(setup):
    model, _, optimizer, scheduler = _build(setup[0], ["train.lr_drop=2", "train.scale_lr=false"])
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"main": 2e-4, "backbone": 2e-5, "linear_proj": 2e-5})
    grouped = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert grouped == sum(p.numel() for p in model.parameters() if p.requires_grad)
    for _ in range(2):  # two epochs (no optimiser step needed to move the schedule)
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_trainable_parameter_gets_a_gradient(setup, variant):
    """Why DDP runs with find_unused_parameters=False in every configuration."""
    path, batch = setup
    model, criterion, optimizer, _ = _build(path, VARIANTS[variant])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    values = train_step(model, criterion, optimizer, scaler, batch, torch.device("cpu"), None, 0.1)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert values["loss"] == pytest.approx(sum(v for k, v in values.items() if k != "loss"), rel=1e-5)
    if variant == "sparse":
        assert "loss_mask_prediction" in values and "loss_ce_enc_0" in values


def test_train_steps_fit_one_batch(setup):
    path, batch = setup
    model, criterion, optimizer, _ = _build(path, ["train.lr=1e-3", "train.scale_lr=false"])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [train_step(model, criterion, optimizer, scaler, batch, torch.device("cpu"), None, 0.1)["loss"]
              for _ in range(8)]
    assert losses[-1] < 0.9 * losses[0], losses


def test_bench_summary_takes_the_slowest_rank():
    pooled: list[list[float]] = []
    _extend(pooled, [[1.0, 3.0], [2.0, 2.0]])
    _extend(pooled, [[1.0], [4.0]])
    summary = _summary(pooled)
    assert summary["per_rank_median_s"] == [1.0, 2.0]
    assert summary["median_step_s"] == 2.0
    assert summary["mean_step_s"] == 2.6667
    assert summary["steps"] == 3


def test_optimizer_is_fused_also_after_loading_an_unfused_state(setup):
    """Checkpoints written before AdamW was fused carry fused=None and host step counts: loading one must
    leave the optimizer fused, and a step after it must give what the unfused optimizer gives."""
    model, _, optimizer, _ = _build(setup[0], [])
    assert all(g["fused"] for g in optimizer.param_groups)
    unfused = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in optimizer.param_groups],
                                weight_decay=1e-4, foreach=False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01) if p.requires_grad else None
    unfused.step()
    optimizer.load_state_dict(unfused.state_dict())
    assert all(g["fused"] and g["foreach"] is None for g in optimizer.param_groups)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    after_fused = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.data.copy_(start[n])
    unfused.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(after_fused[n], p.detach(), rtol=1e-6, atol=1e-8)
