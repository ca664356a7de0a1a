// Multi-scale deformable attention (Zhu et al., Deformable DETR) as the op `sdo::ms_deform_attn`.
//
// Shapes (B batch, S value tokens over all levels, H heads, D channels per head, L levels,
// P points per level and head, Q queries):
//   value             [B, S, H, D]        float64 / float32 / bfloat16 / float16
//   spatial_shapes    [L, 2]  int64       (H_l, W_l) of every level
//   level_start_index [L]     int64       first token of every level in S
//   sampling_loc      [B, Q, H, L, P, 2]  (x, y) in [0, 1] of the level, align_corners=False
//   attn_weight       [B, Q, H, L, P]
//   output            [B, Q, H * D]       dtype of value
// Sampling locations and attention weights are computed in the accumulation type of value
// (float32 for the 16-bit types) so that a bfloat16 model does not lose sub-pixel positions.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <string>
#include <tuple>

#include "ms_deform_attn_bilinear.h"

namespace sdo {

// Accumulation type: float for float32/bfloat16/float16, double for float64.
inline at::ScalarType acc_dtype(at::ScalarType value_dtype) {
  return value_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Raises ValueError in Python. Built without the C++ backtrace that TORCH_CHECK_VALUE records: an
// input error needs none, and unwinding the stack inside the op has crashed a process (torch 2.11
// on a GPU machine, see tests/ops/test_ops_forward.py::test_bad_input_raises_value_error_naming_it).
[[noreturn]] inline void throw_value_error(std::string message) {
  throw c10::ValueError(std::move(message), {});
}

#define SDO_CHECK_VALUE(cond, ...)                                    \
  do {                                                                \
    if (!(cond)) ::sdo::throw_value_error(::c10::str(__VA_ARGS__));   \
  } while (false)

// Checks every argument and names the culprit; `device_type` is the backend being called. Ranks
// come first: no size() is read before the rank of its tensor is known.
inline void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                         const at::Tensor& attn_weight, int64_t im2col_step,
                         at::DeviceType device_type) {
  SDO_CHECK_VALUE(value.dim() == 4, "ms_deform_attn: value must be [B, S, H, D], got ", value.sizes());
  SDO_CHECK_VALUE(sampling_loc.dim() == 6 && sampling_loc.size(5) == 2,
                  "ms_deform_attn: sampling_loc must be [B, Q, H, L, P, 2], got ", sampling_loc.sizes());
  SDO_CHECK_VALUE(attn_weight.dim() == 5, "ms_deform_attn: attn_weight must be [B, Q, H, L, P], got ",
                  attn_weight.sizes());
  const int64_t B = value.size(0), H = value.size(2);
  const int64_t L = sampling_loc.size(3);
  SDO_CHECK_VALUE(sampling_loc.size(0) == B && sampling_loc.size(2) == H,
                  "ms_deform_attn: sampling_loc ", sampling_loc.sizes(), " does not match value ",
                  value.sizes(), " in batch or heads");
  SDO_CHECK_VALUE(attn_weight.sizes() == sampling_loc.sizes().slice(0, 5),
                  "ms_deform_attn: attn_weight ", attn_weight.sizes(), " does not match sampling_loc ",
                  sampling_loc.sizes());
  SDO_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == L && spatial_shapes.size(1) == 2,
                  "ms_deform_attn: spatial_shapes must be [L=", L, ", 2], got ", spatial_shapes.sizes());
  SDO_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == L,
                  "ms_deform_attn: level_start_index must be [L=", L, "], got ", level_start_index.sizes());
  SDO_CHECK_VALUE(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
                  "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  SDO_CHECK_VALUE(at::isFloatingType(value.scalar_type()), "ms_deform_attn: value must be floating point, got ",
                  value.scalar_type());
  SDO_CHECK_VALUE(at::isFloatingType(sampling_loc.scalar_type()) && at::isFloatingType(attn_weight.scalar_type()),
                  "ms_deform_attn: sampling_loc and attn_weight must be floating point");
  SDO_CHECK_VALUE(im2col_step > 0, "ms_deform_attn: im2col_step must be positive, got ", im2col_step);
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &sampling_loc, &attn_weight}) {
    SDO_CHECK_VALUE(t->device().type() == device_type, "ms_deform_attn: all tensors must be on ",
                    device_type, ", got one on ", t->device());
  }
  SDO_CHECK_VALUE(spatial_shapes.device() == value.device() && sampling_loc.device() == value.device() &&
                  attn_weight.device() == value.device() && level_start_index.device() == value.device(),
                  "ms_deform_attn: all tensors must be on the same device as value (", value.device(), ")");
}

// Checks that every level lies inside S (host tensors).
inline void check_levels(const at::Tensor& spatial_shapes_cpu, const at::Tensor& level_start_index_cpu,
                         int64_t S) {
  auto shapes = spatial_shapes_cpu.accessor<int64_t, 2>();
  auto starts = level_start_index_cpu.accessor<int64_t, 1>();
  for (int64_t l = 0; l < spatial_shapes_cpu.size(0); ++l) {
    SDO_CHECK_VALUE(shapes[l][0] > 0 && shapes[l][1] > 0, "ms_deform_attn: spatial_shapes[", l,
                    "] must be positive, got (", shapes[l][0], ", ", shapes[l][1], ")");
    const int64_t room = S - starts[l];  // tokens from the level's start to the end of S
    SDO_CHECK_VALUE(starts[l] >= 0 && room >= shapes[l][0] && shapes[l][1] <= room / shapes[l][0],
                    "ms_deform_attn: level ", l, " (start ", starts[l], ", ", shapes[l][0], "x", shapes[l][1],
                    ") exceeds value's S=", S);
  }
}

// The op's inputs after the checks: contiguous, locations and weights in the accumulation type.
struct OpInputs {
  at::Tensor value, spatial_shapes, level_start_index, sampling_loc, attn_weight;
  Dims dims;
};

// check_levels_on_host: check the level table on the host (for CUDA tensors a device-to-host copy,
// which synchronises the stream). The CPU kernel and the default CUDA kernels need it; the vector
// CUDA kernels (SDO_MSDA_CUDA=kernel=vector) check it themselves and treat a level that does not
// fit in value as empty.
inline OpInputs prepare_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                               const at::Tensor& attn_weight, int64_t im2col_step, at::DeviceType device_type,
                               bool check_levels_on_host = true) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step, device_type);
  if (check_levels_on_host) check_levels(spatial_shapes.cpu(), level_start_index.cpu(), value.size(1));
  const auto acc = acc_dtype(value.scalar_type());
  return {value.contiguous(),
          spatial_shapes.contiguous(),
          level_start_index.contiguous(),
          sampling_loc.to(acc).contiguous(),
          attn_weight.to(acc).contiguous(),
          Dims{value.size(0), value.size(1), value.size(2), value.size(3), sampling_loc.size(1),
               sampling_loc.size(3), sampling_loc.size(4)}};
}

// grad_output [B, Q, H * D] (any layout) in value's dtype, contiguous.
inline at::Tensor prepare_grad_output(const at::Tensor& grad_output, const OpInputs& in) {
  const Dims& d = in.dims;
  SDO_CHECK_VALUE(grad_output.numel() == d.B * d.Q * d.H * d.D, "ms_deform_attn_backward: grad_output ",
                  grad_output.sizes(), " does not match [B, Q, H * D] = [", d.B, ", ", d.Q, ", ", d.H * d.D, "]");
  return grad_output.to(in.value.scalar_type()).contiguous();
}

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                      const at::Tensor& attn_weight, int64_t im2col_step);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
    int64_t im2col_step);

}  // namespace sdo
