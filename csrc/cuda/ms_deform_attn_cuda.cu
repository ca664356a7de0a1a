// CUDA backend of sdo::ms_deform_attn: argument checks, dtype dispatch and stream handling around
// the kernels in ms_deform_attn_kernels.cuh. Built by setup.py / `sdo ops build` only with a CUDA
// build of torch.
//
// No host synchronisation: spatial_shapes / level_start_index stay on the device (the kernels treat
// a level that does not fit in value as empty instead of checking on the host), so the op can be
// captured in a CUDA graph and does not stall the stream.
//
// SDO_MSDA_CUDA (read at every call; for benchmarks) tunes the kernels, e.g.
// "forward_inner=queries,backward_inner=heads,points_split=auto,half_grad=native":
//   forward_inner / backward_inner = queries | heads: which index of (query, head) varies fastest
//     between the items of a warp (queries: the dense encoder's neighbouring pixels share cache
//     lines; heads: atomics of one warp land on different rows). Defaults: queries / heads.
//   points_split = auto | 1 | 2 | 4 | ...: lane groups sharing one (query, head), each taking some
//     of its points (auto: more of them when there are few queries; capped so that it divides the
//     points per level and fits a warp).
//   half_grad = native | float32: for float16 / bfloat16 on sm_90+, accumulate grad_value in its
//     own dtype with paired atomics (native, the default; as grid_sample's backward does) or in a
//     float32 buffer cast at the end (float32; always used before sm_90).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../ms_deform_attn.h"
#include "ms_deform_attn_kernels.cuh"

namespace sdo {
namespace {

// at::Half / at::BFloat16 share the bit layout of CUDA's __half / __nv_bfloat16.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
const typename CudaType<T>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<T>::type*>(t.const_data_ptr<T>());
}
template <typename T>
typename CudaType<T>::type* cuda_mut_ptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<T>::type*>(t.mutable_data_ptr<T>());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ms_deform_attn: ", what, " failed: ", cudaGetErrorString(err));
}

// Read once per process, before any CUDA graph capture can be running.
int compute_capability_major(int device) {
  static std::once_flag once;
  static std::vector<int> majors;
  std::call_once(once, [] {
    int count = 0;
    check_launch(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    majors.assign(count, 0);
    for (int i = 0; i < count; ++i) {
      check_launch(cudaDeviceGetAttribute(&majors[i], cudaDevAttrComputeCapabilityMajor, i), "cudaDeviceGetAttribute");
    }
  });
  return majors.at(device);
}

struct Tuning {
  bool forward_heads_inner = false;
  bool backward_heads_inner = true;
  int points_split = 0;  // 0: automatic
  bool half_grad_native = true;
};

Tuning read_tuning() {
  Tuning tuning;
  const char* text = std::getenv("SDO_MSDA_CUDA");
  if (text == nullptr) return tuning;
  std::stringstream entries(text);
  std::string entry;
  while (std::getline(entries, entry, ',')) {
    if (entry.empty()) continue;
    const auto eq = entry.find('=');
    const std::string key = entry.substr(0, eq), value = eq == std::string::npos ? "" : entry.substr(eq + 1);
    if ((key == "forward_inner" || key == "backward_inner") && (value == "queries" || value == "heads")) {
      (key == "forward_inner" ? tuning.forward_heads_inner : tuning.backward_heads_inner) = value == "heads";
    } else if (key == "points_split" && (value == "auto" || value == "1" || value == "2" || value == "4" ||
                                         value == "8" || value == "16" || value == "32")) {
      tuning.points_split = value == "auto" ? 0 : std::stoi(value);
    } else if (key == "half_grad" && (value == "native" || value == "float32")) {
      tuning.half_grad_native = value == "native";
    } else {
      sdo::throw_value_error("SDO_MSDA_CUDA: unknown setting '" + entry +
                             "' (forward_inner|backward_inner=queries|heads, points_split=auto|1|2|4|..|32, "
                             "half_grad=native|float32)");
    }
  }
  return tuning;
}

// The level table of a block lives in shared memory (see stage_levels).
void check_levels_fit_shared_memory(const Dims& d) {
  if (d.L > 1024) sdo::throw_value_error("ms_deform_attn: the CUDA kernels take at most 1024 levels, got " +
                                         std::to_string(d.L));
}

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                        const at::Tensor& attn_weight, int64_t im2col_step) {
  const auto in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step,
                                 at::kCUDA);
  const c10::cuda::CUDAGuard guard(value.device());
  const Dims& d = in.dims;
  check_levels_fit_shared_memory(d);
  const Tuning tuning = read_tuning();
  auto output = at::empty({d.B, d.Q, d.H * d.D}, in.value.options());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using cuda_t = typename CudaType<scalar_t>::type;
    check_launch(cuda::launch_forward<cuda_t, acc_t>(
                     cuda_ptr<scalar_t>(in.value), in.spatial_shapes.const_data_ptr<int64_t>(),
                     in.level_start_index.const_data_ptr<int64_t>(), in.sampling_loc.const_data_ptr<acc_t>(),
                     in.attn_weight.const_data_ptr<acc_t>(), cuda_mut_ptr<scalar_t>(output), d,
                     tuning.forward_heads_inner, tuning.points_split, stream),
                 "forward kernel");
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
    int64_t im2col_step) {
  const auto in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step,
                                 at::kCUDA);
  const auto grad = prepare_grad_output(grad_output, in);
  const c10::cuda::CUDAGuard guard(value.device());
  const Dims& d = in.dims;
  check_levels_fit_shared_memory(d);
  const Tuning tuning = read_tuning();
  const auto acc = acc_dtype(value.scalar_type());
  auto grad_loc = at::empty(in.sampling_loc.sizes(), in.sampling_loc.options());
  auto grad_attn = at::empty(in.attn_weight.sizes(), in.attn_weight.options());
  at::Tensor grad_value;
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool sm90 = compute_capability_major(value.device().index()) >= 9;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using cuda_t = typename CudaType<scalar_t>::type;
    auto launch = [&](auto* grad_value_ptr) {
      check_launch(cuda::launch_backward<cuda_t, acc_t>(
                       cuda_ptr<scalar_t>(grad), cuda_ptr<scalar_t>(in.value),
                       in.spatial_shapes.const_data_ptr<int64_t>(), in.level_start_index.const_data_ptr<int64_t>(),
                       in.sampling_loc.const_data_ptr<acc_t>(), in.attn_weight.const_data_ptr<acc_t>(),
                       grad_value_ptr, grad_loc.mutable_data_ptr<acc_t>(), grad_attn.mutable_data_ptr<acc_t>(), d,
                       tuning.backward_heads_inner, tuning.points_split, stream),
                   "backward kernel");
    };
    if constexpr (std::is_same_v<cuda_t, acc_t>) {
      grad_value = at::zeros(value.sizes(), value.options());
      launch(grad_value.mutable_data_ptr<acc_t>());
    } else {
      const bool native = tuning.half_grad_native && sm90 &&
                          cuda::half_accumulation_possible<cuda_t>(d, in.value.const_data_ptr(), grad.const_data_ptr());
      if (native) {
        grad_value = at::zeros(value.sizes(), value.options());
        launch(cuda_mut_ptr<scalar_t>(grad_value));
      } else {
        grad_value = at::empty(value.sizes(), value.options());
        auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc));
        launch(grad_value_acc.mutable_data_ptr<acc_t>());
        check_launch(cuda::launch_cast<cuda_t, acc_t>(grad_value_acc.const_data_ptr<acc_t>(),
                                                      cuda_mut_ptr<scalar_t>(grad_value), grad_value.numel(), stream),
                     "grad_value cast");
      }
    }
  });
  return {grad_value, grad_loc.to(sampling_loc.scalar_type()), grad_attn.to(attn_weight.scalar_type())};
}

}  // namespace
}  // namespace sdo

TORCH_LIBRARY_IMPL(sdo, CUDA, m) {
  m.impl("ms_deform_attn", &sdo::forward_cuda);
  m.impl("ms_deform_attn_backward", &sdo::backward_cuda);
}
