import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model.build import build_model
from model.flops import (
    OFFICIAL_GFLOPS_850x1040,
    count_flops,
    fvcore_formulas,
    ms_deform_attn_flop,
    official_model_settings,
)
from model.ms_deform_attn import ms_deform_attn_reference, native_available
from orchestrator.config import BackboneConfig, ModelConfig


class Toy(nn.Module):
    """One of every operator fvcore counts in Sparse DETR."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.group_norm = nn.GroupNorm(8, 32)
        self.layer_norm = nn.LayerNorm(32)
        self.linear = nn.Linear(32, 16)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, images, mask):
        features = self.group_norm(self.conv(images))  # [1, 32, H/2, W/2]
        tokens = self.layer_norm(features.flatten(2).transpose(1, 2))
        attended = self.attention(tokens + 1, tokens + 1, tokens, need_weights=False)[0]
        grid = torch.zeros(1, 5, 7, 2)
        sampled = F.grid_sample(features, grid, align_corners=False)  # [1, 32, 5, 7]
        return self.linear(attended), sampled


def test_counts_follow_fvcore_conventions():
    counted = count_flops(Toy(), 64, 48)
    tokens = 32 * 24
    expected = {
        "conv": 32 * 3 * 9 * tokens,                          # multiply-adds, no bias
        "group_norm": 5 * 32 * tokens,                        # 5 per element with affine
        "layer_norm": 5 * 32 * tokens,
        "linear": 4 * tokens * 32 * 32 + tokens * 32 * 16,    # q, k, v, out projections + linear
        "bmm": 2 * tokens * tokens * 32,                      # q k^T and attention x v
        "grid_sampler": 4 * 32 * 5 * 7,                       # 4 per sampled value
    }
    assert counted["by_operator"].keys() == expected.keys()
    for op, flops in expected.items():
        assert counted["by_operator"][op] == pytest.approx(flops / 1e9, rel=1e-9), op
    assert counted["total_gflops"] == pytest.approx(sum(expected.values()) / 1e9)


def deform_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[6, 8], [3, 4]])
    start = torch.tensor([0, 48])
    value = torch.randn(2, 60, 4, 8, generator=g)
    locations = torch.rand(2, 10, 4, 2, 3, 2, generator=g)
    weights = torch.rand(2, 10, 4, 2, 3, generator=g)
    return value, shapes, start, locations, weights


def flops_of(fn, *args):
    mapping, _ = fvcore_formulas()
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn(*args)
    return counter.get_total_flops()


def test_reference_deformable_attention_counts_as_the_official_benchmark():
    expected = 4 * 2 * 10 * 4 * 8 * 2 * 3  # 4 x B x Len_q x n_heads x head_dim x L x P
    assert flops_of(ms_deform_attn_reference, *deform_inputs(), 64) == expected
    assert ms_deform_attn_flop([2, 60, 4, 8], [2, 2], [2], [2, 10, 4, 2, 3, 2], [2, 10, 4, 2, 3]) == expected


@pytest.mark.skipif(not native_available("cpu"), reason="native sdo::ms_deform_attn not built for CPU")
def test_native_deformable_attention_counts_like_the_reference():
    args = deform_inputs()
    assert flops_of(torch.ops.sdo.ms_deform_attn, *args, 64) == flops_of(ms_deform_attn_reference, *args, 64)


def test_r50_sparse_rho01_matches_official_counter_at_850x1040():
    name = "sparse_rho0.1"
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=BackboneConfig(name="resnet50"), **official_model_settings(name)))
    counted = count_flops(model, 850, 1040)
    # the official per-operator figures (fvcore, kakaobrain/sparse-detr util/benchmark.py)
    official = {"conv": 77.325, "group_norm": 0.024, "linear": 33.245, "layer_norm": 0.107,
                "grid_sampler": 0.212, "bmm": 0.276}
    assert counted["total_gflops"] == pytest.approx(OFFICIAL_GFLOPS_850x1040[name], rel=0.02)
    for op, gflops in official.items():
        assert counted["by_operator"][op] == pytest.approx(gflops, rel=0.02, abs=2e-3), op


def test_unknown_flops_config_is_rejected():
    with pytest.raises(ValueError, match="sparse_rho"):
        official_model_settings("sparse_rho2")
    with pytest.raises(ValueError, match="32x32"):
        count_flops(Toy(), 16, 64)


def test_bench_flops_command_prints_and_writes_json(tmp_path):
    import json

    from click.testing import CliRunner

    from orchestrator.cli import main

    out = tmp_path / "flops.json"
    args = ["bench", "flops", "--configs", "sparse_rho0.3", "--backbone", "resnet18", "--height", "64",
            "--width", "96", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    entry = report["configs"]["sparse_rho0.3"]
    assert entry["gflops"] == pytest.approx(sum(entry["by_operator"].values()), abs=0.05)
    assert entry["by_operator"]["conv"] > 0 and entry["by_operator"]["grid_sampler"] > 0
    assert "ratio" not in entry  # the official figures are for R50 at 850x1040 only

    bad = CliRunner().invoke(main, ["bench", "flops", "--configs", "sparse_rho7"])
    assert bad.exit_code == 2 and "sparse_rho7" in bad.output
