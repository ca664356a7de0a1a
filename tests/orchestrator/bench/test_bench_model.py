"""`sdo bench model` on a tiny detector: the JSON's cells, their FPS arithmetic and GFLOPs (no timing asserts)."""
import json

import pytest
from click.testing import CliRunner

from model.flops import count_flops
from orchestrator.bench import model as bench_model
from orchestrator.cli import main

TINY = {"hidden_dim": 32, "nheads": 4, "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 64, "num_queries": 10,
        "enc_n_points": 2, "dec_n_points": 2}


def test_cells_fps_ratios_and_gflops(native_op):
    report = bench_model.run(height=64, width=96, rhos=(0.0, 0.5), batch_sizes=(1, 2), ops=("native", "reference"),
                             modes=("eager",), dtypes=("fp32",), warmup=1, iters=2, backbone="resnet18",
                             model_overrides=TINY, progress=False)
    json.dumps(report)  # JSON-able as it is
    assert report["benchmark"] == "model" and report["skipped"] == []
    assert report["config"]["settings"] == ["native-eager-fp32", "reference-eager-fp32"]
    cells = {(c["setting"], c["rho"], c["batch"]): c for c in report["cells"]}
    # the base at both batch sizes, the reference-op contrast at the first only
    assert sorted(cells) == sorted([("native-eager-fp32", r, b) for r in (0.0, 0.5) for b in (1, 2)]
                                   + [("reference-eager-fp32", r, 1) for r in (0.0, 0.5)])
    for (setting, rho, batch), cell in cells.items():
        assert cell["fps"] > 0 and cell["timed_iters"] == 2
        assert cell["fps"] * cell["seconds_per_image"] == pytest.approx(1.0, rel=2e-3)
        dense = cells[(setting, 0.0, batch)]
        assert cell["vs_dense"] == pytest.approx(cell["fps"] / dense["fps"], rel=2e-3)
        assert cell["gflops"] == report["gflops"][f"{rho:g}"]
    for rho in (0.0, 0.5):
        counted = count_flops(bench_model.build(rho, "resnet18", "cpu", **TINY), 64, 96)["total_gflops"]
        assert report["gflops"][f"{rho:g}"] == round(counted, 2)


def test_settings_are_the_base_and_one_axis_at_a_time():
    names = [s.name for s in bench_model.settings_for(("native", "reference"), ("eager", "compile"), ("fp32", "bf16"),
                                                      cross=False)]
    assert names == ["native-eager-fp32", "reference-eager-fp32", "native-compile-fp32", "native-eager-bf16"]
    assert len(bench_model.settings_for(("native", "reference"), ("eager", "compile"), ("fp32", "bf16"), cross=True)) == 8


def test_default_plan_measures_the_base_everywhere_and_each_contrast_where_it_answers():
    settings = bench_model.settings_for(("native", "reference"), ("eager", "compile"), ("fp32", "bf16"), cross=False)
    rhos, batches = (0.0, 0.1, 0.2, 0.3, 0.5), (1, 4)
    plan = {(s.name, r, b) for s, r, b in bench_model.plan_cells(settings, rhos, batches, cross=False)}
    assert {(n, r, b) for n, r, b in plan if n == "native-eager-fp32"} == {("native-eager-fp32", r, b)
                                                                           for r in rhos for b in batches}
    for contrast in ("reference-eager-fp32", "native-eager-bf16"):
        assert {(r, b) for n, r, b in plan if n == contrast} == {(r, 1) for r in rhos}
    assert {(r, b) for n, r, b in plan if n == "native-compile-fp32"} == {(0.0, 1), (0.1, 1)}
    assert len(bench_model.plan_cells(settings, rhos, batches, cross=True)) == 4 * 5 * 2


def test_compile_payback_arithmetic():
    cells = [{"op": "native", "dtype": "fp32", "rho": 0.1, "batch": 1, "mode": "eager", "seconds_per_image": 2.0},
             {"op": "native", "dtype": "fp32", "rho": 0.1, "batch": 1, "mode": "compile", "seconds_per_image": 1.5,
              "compile_seconds": 50.0}]
    bench_model.add_compile_payback(cells)
    assert cells[1]["break_even_images"] == 100 and cells[1]["speedup_vs_eager"] == pytest.approx(4 / 3, rel=1e-3)


@pytest.mark.parametrize("args, culprit", [(["--rhos", "0,1.5"], "--rhos"), (["--batch-sizes", "0"], "--batch-sizes"),
                                           (["--modes", "eager,jit"], "--modes")])
def test_bad_options_exit_2_naming_the_option(args, culprit):
    result = CliRunner().invoke(main, ["bench", "model", *args])
    assert result.exit_code == 2 and culprit in result.output
