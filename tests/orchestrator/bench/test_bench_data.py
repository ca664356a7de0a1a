"""`sdo bench data --quick`: the JSON document has every figure, each a positive rate."""
import json

import pytest
from click.testing import CliRunner

from orchestrator.cli import main

LOADERS = ("bare_decode", "folder", "shard")


def test_bench_data_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "data", "--quick", "--modes", "decode", "--out", str(out)])
    # default storages: local disk and the same files over HTTP from 127.0.0.1
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["benchmark"] == "data" and report["config"]["quick"] is True
    assert report["config"]["images"] == 16 and report["config"]["workers"] == 1
    assert set(report["results"]) == {"local", "http"}
    for storage in ("local", "http"):
        decode = report["results"][storage]["decode"]
        for name in LOADERS:
            assert decode[f"{name}_img_per_s"] > 0
            assert len(decode["runs_img_per_s"][name]) == 1
        assert decode["shard_vs_folder"] == pytest.approx(decode["shard_img_per_s"] / decode["folder_img_per_s"],
                                                          rel=1e-2, abs=2e-3)
        assert decode["shard_vs_bare_decode"] == pytest.approx(
            decode["shard_img_per_s"] / decode["bare_decode_img_per_s"], rel=1e-2, abs=2e-3)
        assert report["goals"]["met"][storage]["decode"]["vs_folder"] == (decode["shard_vs_folder"] >= 1.3)
    assert set(report["machine"]["load_average_1_5_15min"]) == {"before", "after"}


def test_bench_data_rejects_unknown_choices():
    result = CliRunner().invoke(main, ["bench", "data", "--quick", "--modes", "fast"])
    assert result.exit_code == 2 and "--modes" in result.output
    result = CliRunner().invoke(main, ["bench", "data", "--quick", "--storage", "s3"])
    assert result.exit_code == 2 and "--storage" in result.output
