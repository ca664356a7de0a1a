"""`sdo bench ops --quick`: the JSON's shape and native == reference inside it (no timing asserts)."""
import json

from click.testing import CliRunner

from orchestrator.bench.ops import level_shapes, sparse_detr_cases
from orchestrator.cli import main


def test_sparse_detr_shapes():
    assert level_shapes(800, 1216) == ((100, 152), (50, 76), (25, 38), (13, 19))
    dense, sparse, decoder = sparse_detr_cases()
    assert dense.len_in == dense.len_q == 20197
    assert sparse.len_q == 2020 and decoder.len_q == 300
    assert dense.n_heads * dense.head_dim == 256 and dense.batch == 2 and dense.n_points == 4


def test_bench_ops_quick_json(native_op, tmp_path):
    out = tmp_path / "ops.json"
    result = CliRunner().invoke(main, ["bench", "ops", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads(out.read_text())
    assert report["benchmark"] == "ops" and report["quick"] is True and report["repeat"] == 1
    assert [case["name"] for case in report["cpu"]] == ["encoder_dense", "encoder_rho0.1", "decoder"]
    for case in report["cpu"]:
        for impl in ("native", "reference"):
            timings = case[impl]
            assert timings["forward_ms"] > 0 and timings["forward_backward_ms"] > 0
            assert timings["peak_mem_mib"] is not None
        assert set(case["speedup"]) == {"forward", "forward_backward"}
        diffs = case["native_vs_reference"]
        assert set(diffs) == {"output", "grad_value", "grad_sampling_loc", "grad_attn_weight"}
        assert diffs["output"]["max_abs"] <= 1e-5
        for name in ("output", "grad_value", "grad_attn_weight"):
            assert diffs[name]["max_rel"] <= 1e-5, name
        # Location gradients may differ only at isolated points on a pixel edge (a kink).
        assert diffs["grad_sampling_loc"]["mismatch_fraction"] <= 1e-4
    assert report["goal"]["min_cpu_forward_backward_speedup"] == min(c["speedup"]["forward_backward"]
                                                                     for c in report["cpu"])


def test_bench_ops_rejects_bad_repeat():
    result = CliRunner().invoke(main, ["bench", "ops", "--quick", "--repeat", "0"])
    assert result.exit_code == 2 and "repeat" in result.output
