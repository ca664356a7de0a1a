"""Multi-scale deformable attention (Deformable DETR) with a native op and a pure-PyTorch reference.

`ms_deform_attn(...)` runs the native op `torch.ops.sdo.ms_deform_attn` (csrc/, C++ on CPU,
CUDA on GPUs) when it is built for the tensor's device, else `ms_deform_attn_reference(...)`
(grid_sample; the official `ms_deform_attn_core_pytorch`). Both give the same numbers.

The native library is found, in this order: the `sdo_ops` extension module built by
`pip install -e .` (setup.py), then the JIT build of `sdo ops build` in `ops_cache_dir()`.
Autograd and the fake kernel (for torch.compile and FLOP counting) are registered here.
Set SDO_DISABLE_NATIVE_OPS=1 to force the reference.

Shapes:
    value                [B, S, n_heads, head_dim], S = sum_l H_l * W_l
    spatial_shapes       [L, 2] int64, (H_l, W_l)
    level_start_index    [L] int64, first token of every level
    sampling_locations   [B, Len_q, n_heads, L, P, 2], (x, y) normalised to [0, 1]
    attention_weights    [B, Len_q, n_heads, L, P]
    output               [B, Len_q, n_heads * head_dim]
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

OP_NAME = "sdo::ms_deform_attn"
BACKWARD_OP_NAME = "sdo::ms_deform_attn_backward"
LIBRARY_NAME = "sdo_ops"
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


class _NativeState:
    """Where the native library came from and which device types it has kernels for."""

    def __init__(self) -> None:
        self.source: str | None = None
        self.tried = False
        self.devices: frozenset = frozenset()
        self.python_registered = False
        self.logged: set = set()
        self.reference_only = False  # set by `reference_only()`


_state = _NativeState()


def ops_cache_dir() -> Path:
    """Root of the JIT builds: $SDO_OPS_CACHE, else ~/.cache/sdo/ops."""
    root = os.environ.get("SDO_OPS_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sdo" / "ops"


def jit_build_tag() -> str:
    """One JIT build per torch version, CUDA flavour and Python version (their ABIs differ)."""
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    torch_version = torch.__version__.split("+")[0]
    return f"torch{torch_version}-{flavour}-py{sys.version_info.major}{sys.version_info.minor}"


def jit_build_dir() -> Path:
    return ops_cache_dir() / jit_build_tag()


def jit_library_path() -> Path:
    return jit_build_dir() / f"{LIBRARY_NAME}.so"


def _op_registered() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(OP_NAME, "")
    except RuntimeError:
        return False
    return True


def _native_devices() -> frozenset:
    return frozenset(device for device, key in _DEVICE_KEYS.items()
                     if torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key))


def load_native(retry: bool = False) -> str | None:
    """Loads the native library (once) and registers autograd + fake kernels.

    Returns where the op came from (a file path, or "preloaded"), None when it is not built.
    `retry=True` looks again, e.g. after `sdo ops build` in this process.
    """
    if _state.source is not None or (_state.tried and not retry):
        return _state.source
    _state.tried = True
    if os.environ.get("SDO_DISABLE_NATIVE_OPS") == "1":
        return None
    if _op_registered():
        _state.source = _state.source or "preloaded"
    else:
        _state.source = _load_library()
    if _state.source is not None:
        _register_python_parts()
        _state.devices = _native_devices()
    return _state.source


def _load_library() -> str | None:
    try:
        module = importlib.import_module(LIBRARY_NAME)
        return getattr(module._C, "__file__", None) or LIBRARY_NAME
    except (ImportError, OSError) as err:
        if "undefined symbol" in str(err) or isinstance(err, OSError):  # built against another torch
            log.warning("ignoring the installed %s (%s); rebuild with `pip install -e .`", LIBRARY_NAME, err)
    path = jit_library_path()
    if path.is_file():
        try:
            torch.ops.load_library(str(path))
            return str(path)
        except OSError as err:
            log.warning("ignoring the JIT build %s (%s); rebuild with `sdo ops build`", path, err)
    return None


@contextlib.contextmanager
def reference_only():
    """Run the pure-PyTorch reference even where the native op is built (e.g. for an ONNX export, whose
    graph must consist of standard operators: grid_sample becomes ONNX GridSample)."""
    saved = _state.reference_only
    _state.reference_only = True
    try:
        yield
    finally:
        _state.reference_only = saved


def native_available(device: torch.device | str) -> bool:
    """True when the native op has a kernel for this device's type (cpu, cuda)."""
    return torch.device(device).type in _state.devices


def native_source() -> str | None:
    """Path of the loaded native library, None when the reference is used everywhere."""
    return _state.source


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                   im2col_step: int = 64, spatial_shape_list: list | None = None) -> torch.Tensor:
    """Multi-scale deformable attention, native when built for value's device. Shapes: module doc.

    spatial_shape_list: the (H_l, W_l) of spatial_shapes as Python (or symbolic) ints, when the caller
    has them: the reference then needs no device-to-host read, and exported graphs keep their sizes
    symbolic (see `reference_only`)."""
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    device_type = value.device.type
    if device_type in _state.devices and not _state.reference_only:
        _log_choice(device_type, "native sdo::ms_deform_attn")
        return torch.ops.sdo.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                            attention_weights, im2col_step)
    _log_choice(device_type, "pure-PyTorch reference (grid_sample)")
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights, im2col_step, spatial_shape_list)


def check_inputs(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                 sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> None:
    """Raises ValueError naming the first argument whose rank, size or dtype does not fit (shapes: module
    doc). Ranks are checked before any size is read. The native op checks the same in C++ (and, on the
    CPU, that every level lies inside value); checking here first keeps the message the same for the
    reference and leaves no bad input to the C++ side."""
    def fail(name: str, expected: str, tensor: torch.Tensor) -> None:
        raise ValueError(f"ms_deform_attn: {name} must be {expected}, got shape {tuple(tensor.shape)}"
                         f" ({tensor.dtype})")

    if value.dim() != 4 or not value.is_floating_point():
        fail("value", "a floating-point [B, S, n_heads, head_dim] tensor", value)
    batch, _, n_heads, _ = value.shape
    if (sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2
            or not sampling_locations.is_floating_point()
            or sampling_locations.shape[0] != batch or sampling_locations.shape[2] != n_heads):
        fail("sampling_locations", f"a floating-point [B={batch}, Len_q, n_heads={n_heads}, L, P, 2] tensor",
             sampling_locations)
    if attention_weights.shape != sampling_locations.shape[:-1] or not attention_weights.is_floating_point():
        fail("attention_weights", f"a floating-point {list(sampling_locations.shape[:-1])} tensor", attention_weights)
    n_levels = sampling_locations.shape[3]
    if spatial_shapes.shape != (n_levels, 2) or spatial_shapes.dtype != torch.int64:
        fail("spatial_shapes", f"an int64 [L={n_levels}, 2] tensor", spatial_shapes)
    if level_start_index.shape != (n_levels,) or level_start_index.dtype != torch.int64:
        fail("level_start_index", f"an int64 [L={n_levels}] tensor", level_start_index)


def _log_choice(device_type: str, implementation: str) -> None:
    # Only eagerly: under torch.compile this folds away, so it adds no graph break.
    if torch.compiler.is_compiling() or device_type in _state.logged:
        return
    _state.logged.add(device_type)
    log.info("ms_deform_attn on %s: %s", device_type, implementation)


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                             sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                             im2col_step: int = 64, spatial_shape_list: list | None = None) -> torch.Tensor:
    """The official `ms_deform_attn_core_pytorch`: bilinear grid_sample per level, zero padding,
    align_corners=False. Levels are split by spatial_shapes (level_start_index must be their
    cumulative sum); im2col_step is accepted for the same signature. Shapes: module doc."""
    batch, _, n_heads, head_dim = value.shape
    _, len_q, _, n_levels, n_points, _ = sampling_locations.shape
    if spatial_shape_list is not None:
        shapes = [(h, w) for h, w in spatial_shape_list]
    else:
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_list = value.split([h * w for h, w in shapes], dim=1)
    sampling_grids = (2 * sampling_locations - 1).to(value.dtype)
    sampled = []
    for level, (height, width) in enumerate(shapes):
        # [B, H_l*W_l, n_heads, head_dim] -> [B*n_heads, head_dim, H_l, W_l]
        value_l = value_list[level].flatten(2).transpose(1, 2).reshape(batch * n_heads, head_dim, height, width)
        # [B, Len_q, n_heads, P, 2] -> [B*n_heads, Len_q, P, 2]
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # [B*n_heads, head_dim, Len_q, P]
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B, Len_q, n_heads, L, P] -> [B*n_heads, 1, Len_q, L*P]
    weights = attention_weights.to(value.dtype).transpose(1, 2).reshape(batch * n_heads, 1, len_q, n_levels * n_points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(batch, n_heads * head_dim, len_q)
    return output.transpose(1, 2).contiguous()


def _register_python_parts() -> None:
    """Fake kernels (shapes only, for torch.compile / FakeTensor / FLOP counting) and autograd."""
    if _state.python_registered:
        return
    _state.python_registered = True

    @torch.library.register_fake(OP_NAME)
    def _fake_forward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step):
        batch, _, n_heads, head_dim = value.shape
        return value.new_empty((batch, sampling_loc.shape[1], n_heads * head_dim))

    @torch.library.register_fake(BACKWARD_OP_NAME)
    def _fake_backward(grad_output, value, spatial_shapes, level_start_index, sampling_loc, attn_weight,
                       im2col_step):
        return value.new_empty(value.shape), sampling_loc.new_empty(sampling_loc.shape), \
            attn_weight.new_empty(attn_weight.shape)

    def setup_context(ctx, inputs, output):
        value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step = inputs
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight)
        ctx.im2col_step = im2col_step

    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_loc, attn_weight = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = torch.ops.sdo.ms_deform_attn_backward(
            grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_loc, attn_weight,
            ctx.im2col_step)
        return grad_value, None, None, grad_loc, grad_attn, None

    torch.library.register_autograd(OP_NAME, backward, setup_context=setup_context)


load_native()
