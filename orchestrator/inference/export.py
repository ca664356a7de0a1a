"""`sdo export`: the detector as an ONNX graph or a torch.export ExportedProgram.

Both take whole, unpadded ImageNet-normalised images [B, 3, H, W] (model.inference.Detector) and
return (pred_logits [B, Q, C], pred_boxes [B, Q, 4] sigmoid cxcywh); `sdo predict`'s PostProcess
turns them into boxes in pixels.

ONNX: the deformable attention is exported as standard ONNX operators, from the pure-PyTorch
reference (per level: GridSample, opset >= 16, then a weighted sum), not as a custom-domain op.
Standard operators run in every ONNX runtime (onnxruntime on CPU and GPU, TensorRT >= 8.6, OpenVINO)
with nothing to compile or register there; a custom op would need its own kernel library built for
each runtime and platform. The reference gives the same numbers as the native op (tests prove it).

torch.export: the native op stays one node, ``sdo::ms_deform_attn`` (its fake kernel gives the
shapes), so the program keeps the fast kernel and loads wherever sdo's ops are built.

--dynamic: one file for every image size (and batch size for torch.export): H and W stay symbolic.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

FORMATS = ("onnx", "torch-export")
ONNX_OPSET = 18
MIN_SIDE = 65  # the coarsest level (stride 64) needs more than one token per side (GroupNorm)
MAX_SIDE = 4096


def _dynamic_shapes(batch: bool):
    height = torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE)
    width = torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    dims = {2: height, 3: width}
    if batch:
        dims[0] = torch.export.Dim("batch", min=1, max=64)
    return {"images": dims}


def _check_size(height: int, width: int) -> None:
    for name, side in (("--height", height), ("--width", width)):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(f"{name} {side}: must be in [{MIN_SIDE}, {MAX_SIDE}]")


def export(detector: torch.nn.Module, fmt: str, out: str | Path, *, height: int = 640, width: int = 800,
           dynamic: bool = False) -> dict:
    """Export ``detector`` (a SparseDETR) -> {'format', 'path', 'bytes', 'seconds', 'dynamic', 'height', 'width'}.

    ``height`` x ``width`` is the fixed input size, or the example size with ``dynamic``.
    """
    from model.inference import Detector

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")
    _check_size(height, width)
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out}: is a directory, expected a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    module = Detector(detector).eval()
    # a batch of 2 lets torch.export keep the batch size symbolic (it specialises sizes 0 and 1)
    batch = 2 if dynamic and fmt == "torch-export" else 1
    example = (torch.randn(batch, 3, height, width),)
    started = time.perf_counter()
    with torch.no_grad():
        if fmt == "onnx":
            _export_onnx(module, example, out, dynamic)
        else:
            _export_program(module, example, out, dynamic)
    return {"format": fmt, "path": str(out), "bytes": out.stat().st_size, "seconds": time.perf_counter() - started,
            "dynamic": dynamic, "height": height, "width": width}


def _export_onnx(module, example, out: Path, dynamic: bool) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise ValueError("--format onnx needs onnx and onnxscript: pip install 'sdo[export]'") from None
    from model.ms_deform_attn import reference_only

    with reference_only():  # standard ONNX operators (see the module doc)
        program = torch.onnx.export(module, example, dynamo=True, input_names=["images"],
                                    output_names=["pred_logits", "pred_boxes"], opset_version=ONNX_OPSET,
                                    dynamic_shapes=_dynamic_shapes(batch=False) if dynamic else None,
                                    optimize=True, verbose=False)
    program.save(str(out))


def _export_program(module, example, out: Path, dynamic: bool) -> None:
    from model.ms_deform_attn import native_available

    if not native_available("cpu"):
        raise ValueError("--format torch-export keeps the native sdo::ms_deform_attn op, which is not built here; "
                         "run `sdo ops build` (or `pip install -e .`) first")
    program = torch.export.export(module, example, dynamic_shapes=_dynamic_shapes(batch=True) if dynamic else None,
                                  strict=False)
    torch.export.save(program, str(out))


def load_program(path: str | Path):
    """torch.export.load with sdo's op registered first -> ExportedProgram."""
    import model.ms_deform_attn  # noqa: F401  (registers sdo::ms_deform_attn and its fake kernel)

    return torch.export.load(str(path))
