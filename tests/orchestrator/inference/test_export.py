"""`sdo export`: ONNX (standard operators) run by onnxruntime on CPU and a torch.export program with the
native op, each compared with eager PyTorch at two image sizes from one --dynamic file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from model.build import build_model
from model.ms_deform_attn import native_available
from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.inference.export import export, load_program

SIZES = ((128, 160), (96, 136))  # (H, W): one exported file serves both
TOLERANCE = 1e-4


def tiny_cfg(tmp_path, rho: float):
    values = {"model": {"backbone": {"name": "resnet18"}, "num_classes": 6, "hidden_dim": 32, "nheads": 2,
                        "enc_layers": 2, "dec_layers": 2, "dim_feedforward": 64, "num_queries": 20, "enc_n_points": 2,
                        "dec_n_points": 2, "rho": rho, "use_enc_aux_loss": rho > 0, "eff_query_init": rho > 0,
                        "eff_specific_head": rho > 0}}
    path = tmp_path / f"rho{rho}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path, load_config(path)


def detector(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # random, non-degenerate class scores so that top-k selections are well separated
        for head in model.class_embed:
            head.bias.normal_(0, 1)
    return model


def eager(model, images):
    with torch.no_grad():
        out = model(images, torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool))
    return out["pred_logits"].numpy(), out["pred_boxes"].numpy()


def _images(height, width, seed):
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rho", [0.1])  # the sparse path; dense exports the same layers minus the top-k (70 s more of CI)
def test_onnx_in_onnxruntime_matches_eager(tmp_path, rho):
    ort = pytest.importorskip("onnxruntime", reason="the [export] extra (onnx, onnxruntime, onnxscript)")
    path, cfg = tiny_cfg(tmp_path, rho)
    model = detector(cfg)
    out = tmp_path / "sdo.onnx"
    if rho > 0:  # through the CLI, from an sdo-style checkpoint file
        torch.save({"model": model.state_dict(), "epoch": 0}, tmp_path / "ckpt.pt")
        result = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "ckpt.pt"), "--config", str(path),
                                           "--format", "onnx", "--out", str(out), "--dynamic"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout.strip().splitlines()[-1])
    else:
        report = export(model, "onnx", out, height=SIZES[0][0], width=SIZES[0][1], dynamic=True)
    assert report["bytes"] == out.stat().st_size > 0

    import onnx

    graph = onnx.load(str(out)).graph
    op_types = {node.op_type for node in graph.node}
    assert "GridSample" in op_types or any("GridSample" in str(f) for f in onnx.load(str(out)).functions)
    assert all(node.domain in ("", "ai.onnx", "pkg.onnxscript.torch_lib.common") for node in graph.node)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for seed, (height, width) in enumerate(SIZES):
        images = _images(height, width, seed)
        logits, boxes = session.run(["pred_logits", "pred_boxes"], {"images": images.numpy()})
        expected_logits, expected_boxes = eager(model, images)
        assert logits.shape == expected_logits.shape and boxes.shape == expected_boxes.shape
        np.testing.assert_allclose(logits, expected_logits, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(boxes, expected_boxes, atol=TOLERANCE, rtol=0)


@pytest.mark.skipif(not native_available("cpu"), reason="the native op is not built (sdo ops build)")
def test_torch_export_keeps_the_native_op_and_runs_after_load(tmp_path):
    _, cfg = tiny_cfg(tmp_path, 0.1)
    model = detector(cfg)
    out = tmp_path / "sdo.pt2"
    export(model, "torch-export", out, height=SIZES[0][0], width=SIZES[0][1], dynamic=True)
    program = load_program(out)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "sdo.ms_deform_attn.default" in targets
    assert not any("grid_sampler" in t for t in targets)
    loaded = program.module()
    for seed, (height, width) in enumerate(SIZES):
        images = torch.cat([_images(height, width, seed), _images(height, width, seed + 10)])  # batch 2
        with torch.no_grad():
            logits, boxes = loaded(images)
        expected_logits, expected_boxes = eager(model, images)
        np.testing.assert_allclose(logits.numpy(), expected_logits, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(boxes.numpy(), expected_boxes, atol=TOLERANCE, rtol=0)


def test_bad_export_requests_exit_2(tmp_path):
    path, cfg = tiny_cfg(tmp_path, 0.0)
    torch.save({"model": build_model(cfg.model).state_dict()}, tmp_path / "ckpt.pt")
    for model, extra, expected in ((tmp_path / "ckpt.pt", ["--height", "32"], "--height 32"),
                                   (tmp_path / "absent.pt", [], "absent.pt: no such checkpoint")):
        args = ["export", "--model", str(model), "--config", str(path), "--format", "onnx",
                "--out", str(tmp_path / "m.onnx"), *extra]
        result = CliRunner().invoke(main, args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], result.output
