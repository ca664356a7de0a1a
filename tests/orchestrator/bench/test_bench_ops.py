"""`sdo bench ops --quick`: the JSON's shape and native == reference inside it (no timing asserts)."""
import json
import os

import pytest
import torch
from click.testing import CliRunner

from model import ms_deform_attn as msda
from orchestrator.bench.ops import cuda_kernel, level_shapes, sparse_detr_cases
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
    assert {case["kernel"] for case in report["cpu"]} == {"cpu"} and "cuda_kernels" not in report
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


def test_bench_ops_rejects_bad_dtypes_and_missing_gpu(native_op):
    result = CliRunner().invoke(main, ["bench", "ops", "--quick", "--dtypes", "float32,int8"])
    assert result.exit_code == 2 and "--dtypes" in result.output
    result = CliRunner().invoke(main, ["bench", "ops", "--quick", "--kernels", "channel,warp"])
    assert result.exit_code == 2 and "--kernels" in result.output
    if not (torch.cuda.is_available() and msda.native_available("cuda")):
        result = CliRunner().invoke(main, ["bench", "ops", "--quick", "--device", "cuda"])
        assert result.exit_code == 2 and "--device cuda" in result.output


def test_cuda_kernel_appends_to_the_tuning_settings(monkeypatch):
    # The op reads SDO_MSDA_CUDA at every call, the last setting winning: the bench appends its kernel.
    monkeypatch.delenv("SDO_MSDA_CUDA", raising=False)
    with cuda_kernel("channel"):
        assert os.environ["SDO_MSDA_CUDA"] == "kernel=channel"
    assert "SDO_MSDA_CUDA" not in os.environ
    monkeypatch.setenv("SDO_MSDA_CUDA", "kernel=channel,points_split=2")
    with pytest.raises(RuntimeError, match="inside"), cuda_kernel("vector"):
        assert os.environ["SDO_MSDA_CUDA"] == "kernel=channel,points_split=2,kernel=vector"
        raise RuntimeError("inside")
    assert os.environ["SDO_MSDA_CUDA"] == "kernel=channel,points_split=2"
    with cuda_kernel(None):
        assert os.environ["SDO_MSDA_CUDA"] == "kernel=channel,points_split=2"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_bench_ops_cuda_dtypes_json(native_op):
    result = CliRunner().invoke(main, ["bench", "ops", "--quick", "--device", "cuda", "--dtypes",
                                       "float32,bfloat16,float16"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "cpu" not in report and "goal" not in report and report["cuda_dtypes"] == ["float32", "bfloat16", "float16"]
    assert report["cuda_kernels"] == ["channel", "vector"]
    runs = [(case["name"], case["dtype"], case["kernel"]) for case in report["cuda"]]
    assert runs == [(name, dtype, kernel) for dtype in ("float32", "bfloat16", "float16")
                    for name in ("encoder_dense", "encoder_rho0.1", "decoder") for kernel in ("channel", "vector")]
    speedups = report["cuda_vector_over_channel"]
    assert [(s["name"], s["dtype"]) for s in speedups] == list(dict.fromkeys(run[:2] for run in runs))
    assert all(s["forward"] > 0 and s["forward_backward"] > 0 for s in speedups)
    for case in report["cuda"]:
        assert case["native"]["forward_backward_ms"] > 0 and case["native"]["peak_mem_mib"] > 0
        tolerance = 1e-5 if case["dtype"] == "float32" else 5e-2  # the reference rounds too
        assert case["native_vs_reference"]["output"]["max_rel"] <= tolerance
