"""One measure of cost: GFLOPs counted once per model config (kept on disk), and eval latency as `sdo bench model`
times it, on a tiny model (no timing asserts)."""
from __future__ import annotations

import json

import pytest
import torch

from model.build import build_model
from model.flops import count_flops
from orchestrator.config import BackboneConfig, ModelConfig
from orchestrator.train import cost

TINY = ModelConfig(backbone=BackboneConfig(name="resnet18", weights="imagenet"), hidden_dim=32, nheads=2,
                   enc_layers=1, dec_layers=1, dim_feedforward=64, num_queries=10, enc_n_points=2, dec_n_points=2,
                   rho=0.3, checkpoint="ignored.pth")


def test_gflops_are_counted_once_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("SDO_CACHE", str(tmp_path))
    torch.manual_seed(0)
    expected = count_flops(build_model(cost.bare_model_config(TINY)), 128, 160)["total_gflops"]
    assert cost.reference_gflops(TINY, size=(128, 160)) == pytest.approx(expected)
    (stored,) = (tmp_path / "gflops").glob("*.json")
    assert json.loads(stored.read_text()) == {"gflops": pytest.approx(expected), "size": "128x160"}
    stored.write_text(json.dumps({"gflops": 1.5, "size": "128x160"}))  # the second call reads, not recounts
    assert cost.reference_gflops(TINY, size=(128, 160)) == 1.5
    # weights do not change the cost, another rho or size does
    assert cost.reference_gflops(cost.bare_model_config(TINY), size=(128, 160)) == 1.5
    other = ModelConfig(**{**TINY.__dict__, "rho": 0.1})
    assert cost.reference_gflops(other, size=(128, 160)) < expected
    assert cost.FLOPS_SIZE == (850, 1040) and cost.size_name(cost.FLOPS_SIZE) == "850x1040"


def test_latency_names_the_device_and_times_batch_1_and_4():
    measured = cost.latency(TINY, size=(64, 96), device="cpu", iters=2)
    assert set(measured) == {"latency_ms", "latency_ms_b4", "device", "size"}
    assert measured["latency_ms"] > 0 and measured["latency_ms_b4"] > 0
    assert measured["device"].startswith("cpu (") and measured["size"] == "64x96"
