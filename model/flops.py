"""FLOP counting that reproduces the official Sparse DETR benchmark (fvcore) with torch's FlopCounterMode.

The paper's GFLOPs column comes from fvcore's per-operator handles, which count one multiply-add as
one FLOP and also count normalisations and grid sampling. torch.utils.flop_counter counts a
multiply-add as two FLOPs and ignores normalisations, so torch's own formulas are halved and the
other operators get fvcore's formulas here. The official benchmark ran the deformable attention on
its pure-PyTorch path, where the only counted operator is grid_sample (4 FLOPs per sampled value,
fvcore's bilinear estimate); the native op gets that same formula, so both paths count alike.
"""
from math import prod

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten

# torch operator -> fvcore operator name (the names in the official per-operator breakdown)
_TORCH_COUNTED = {
    aten.convolution: "conv", aten._convolution: "conv", aten.cudnn_convolution: "conv",
    aten.convolution_overrideable: "conv", aten._slow_conv2d_forward: "conv",
    aten.mm: "linear", aten.addmm: "linear",
    aten.bmm: "bmm", aten.baddbmm: "bmm",
    aten._scaled_dot_product_efficient_attention: "bmm", aten._scaled_dot_product_flash_attention: "bmm",
    aten._scaled_dot_product_cudnn_attention: "bmm",
    aten._flash_attention_forward: "bmm", aten._efficient_attention_forward: "bmm",
}


def _norm_flops(input_shape, weight_shape) -> int:
    """fvcore's norm handle: 5 FLOPs per element with an affine transform, 4 without."""
    return prod(input_shape) * (5 if weight_shape is not None else 4)


def _layer_norm_flop(input_shape, normalized_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return _norm_flops(input_shape, weight_shape)


def _group_norm_flop(input_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return _norm_flops(input_shape, weight_shape)


def _grid_sampler_flop(input_shape, grid_shape, *args, out_shape=None, **kwargs) -> int:
    """fvcore counts grid_sample as bilinear: 4 FLOPs per output element [N, C, H_out, W_out]."""
    return 4 * prod(out_shape)


def _cpu_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Scaled dot-product attention [B, H, L, E] on CPU: the two batched matmuls, in multiply-adds."""
    batch, heads, len_q, dim_qk = query_shape
    len_k, dim_v = key_shape[-2], value_shape[-1]
    return batch * heads * len_q * len_k * (dim_qk + dim_v)


def ms_deform_attn_flop(value_shape, spatial_shapes_shape, level_start_index_shape, sampling_locations_shape,
                        attention_weights_shape, *args, out_shape=None, **kwargs) -> int:
    """The deformable-attention op as the official benchmark counts it.

    value [B, S, n_heads, head_dim]; sampling_locations [B, Len_q, n_heads, L, P, 2]: one bilinear
    grid_sample per level over [B * n_heads, head_dim, Len_q, P] outputs, 4 FLOPs each.
    """
    batch, _, n_heads, head_dim = value_shape
    _, len_q, _, n_levels, n_points, _ = sampling_locations_shape
    return 4 * batch * n_heads * head_dim * len_q * n_levels * n_points


def _native_op_packet():
    """torch.ops.sdo.ms_deform_attn when the native library is loaded, else None."""
    try:
        return torch.ops.sdo.ms_deform_attn
    except (AttributeError, RuntimeError):
        return None


def fvcore_formulas() -> tuple[dict, dict]:
    """(custom_mapping for FlopCounterMode, torch operator -> fvcore name) for the extra operators."""
    extra = {
        aten.native_layer_norm: (_layer_norm_flop, "layer_norm"),
        aten.native_group_norm: (_group_norm_flop, "group_norm"),
        aten.grid_sampler_2d: (_grid_sampler_flop, "grid_sampler"),
        aten._scaled_dot_product_flash_attention_for_cpu: (_cpu_attention_flop, "bmm"),
    }
    native = _native_op_packet()
    if native is not None:
        extra[native] = (ms_deform_attn_flop, "grid_sampler")
    mapping = {op: formula for op, (formula, _) in extra.items()}
    names = {op: name for op, (_, name) in extra.items()}
    return mapping, names


@torch.no_grad()
def count_flops(model: torch.nn.Module, height: int, width: int, device="cpu") -> dict:
    """GFLOPs of one forward pass on a single random 3 x height x width image, in eval mode.

    Returns {'total_gflops': float, 'by_operator': {fvcore operator name: gflops}}. Element-wise
    operators are not counted, nor is nearest upsampling of the padding masks (fvcore: 2e-5 GFLOPs
    at 850x1040), which torch decomposes into plain indexing.
    """
    if height < 32 or width < 32:
        raise ValueError(f"count_flops: image must be at least 32x32, got {height}x{width}")
    was_training = model.training
    model.eval()
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.zeros(1, height, width, dtype=torch.bool, device=device)
    custom_mapping, extra_names = fvcore_formulas()
    counter = FlopCounterMode(display=False, custom_mapping=custom_mapping)
    try:
        with counter:
            model(images, mask)
    finally:
        model.train(was_training)

    by_operator: dict[str, float] = {}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        if op in extra_names:
            name, fvcore_flops = extra_names[op], flops
        else:
            # torch counts a multiply-add as 2 FLOPs, fvcore as 1
            name, fvcore_flops = _TORCH_COUNTED.get(op, str(op)), flops / 2
        by_operator[name] = by_operator.get(name, 0.0) + fvcore_flops / 1e9
    return {"total_gflops": sum(by_operator.values()), "by_operator": by_operator}


# The official benchmark's counts at one random 3x850x1040 image (kakaobrain/sparse-detr
# util/benchmark.py, fvcore, eval mode): what `sdo bench flops` is compared against.
OFFICIAL_GFLOPS_850x1040 = {
    "deformable_topk_bbr": 177.37,
    "sparse_rho0.1": 111.19,
    "sparse_rho0.2": 120.50,
    "sparse_rho0.3": 129.81,
    "sparse_rho0.5": 148.43,
}


def official_model_settings(name: str) -> dict:
    """ModelConfig fields of the official R50 configs named in OFFICIAL_GFLOPS_850x1040.

    'deformable_topk_bbr' is Deformable DETR with two-stage top-k queries and box refinement;
    'sparse_rhoR' is Sparse DETR (encoder aux loss, eff_query_init, eff_specific_head) at keep ratio R.
    """
    common = {"num_classes": 91, "two_stage": True, "with_box_refine": True, "aux_loss": True}
    if name == "deformable_topk_bbr":
        return {**common, "rho": 0.0, "use_enc_aux_loss": False, "eff_query_init": False, "eff_specific_head": False}
    if name.startswith("sparse_rho"):
        try:
            rho = float(name[len("sparse_rho"):])
        except ValueError:
            rho = -1.0
        if 0 < rho <= 1:
            return {**common, "rho": rho, "use_enc_aux_loss": True, "eff_query_init": True, "eff_specific_head": True}
    raise ValueError(f"unknown flops config {name!r}: use 'deformable_topk_bbr' or 'sparse_rho<R>' with 0 < R <= 1")
