// CUDA backend of sdo::ms_deform_attn: argument checks, dtype dispatch and stream handling around
// two sets of kernels. Built by setup.py / `sdo ops build` only with a CUDA build of torch.
//
// SDO_MSDA_CUDA (read at every call) picks the kernels and tunes the vector ones, e.g.
// "kernel=vector,forward_inner=queries,backward_inner=heads,points_split=auto,half_grad=native":
//   kernel = channel | vector:
//     channel (the default; ms_deform_attn_kernels.cuh): verified on a GPU. The level table is
//       checked on the host (a device-to-host copy per call, so no CUDA graph capture); grad_value
//       accumulates in float32 (float64 for float64).
//     vector (ms_deform_attn_vector_kernels.cuh): a lane group per (query, head) reading 16-byte
//       vectors; not yet run on a GPU. No host synchronisation: spatial_shapes / level_start_index
//       stay on the device (the kernels treat a level that does not fit in value as empty), so the op
//       can be captured in a CUDA graph and does not stall the stream.
//   The other settings apply to the vector kernels only:
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
#include "ms_deform_attn_vector_kernels.cuh"

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
  bool vector_kernel = false;  // kernel=vector; false: kernel=channel (the default)
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
    if (key == "kernel" && (value == "channel" || value == "vector")) {
      tuning.vector_kernel = value == "vector";
    } else if ((key == "forward_inner" || key == "backward_inner") && (value == "queries" || value == "heads")) {
      (key == "forward_inner" ? tuning.forward_heads_inner : tuning.backward_heads_inner) = value == "heads";
    } else if (key == "points_split" && (value == "auto" || value == "1" || value == "2" || value == "4" ||
                                         value == "8" || value == "16" || value == "32")) {
      tuning.points_split = value == "auto" ? 0 : std::stoi(value);
    } else if (key == "half_grad" && (value == "native" || value == "float32")) {
      tuning.half_grad_native = value == "native";
    } else {
      sdo::throw_value_error("SDO_MSDA_CUDA: unknown setting '" + entry +
                             "' (kernel=channel|vector, forward_inner|backward_inner=queries|heads, "
                             "points_split=auto|1|2|4|..|32, half_grad=native|float32)");
    }
  }
  return tuning;
}

// The vector kernels keep the level table of a block in shared memory (see stage_levels).
void check_levels_fit_shared_memory(const Dims& d) {
  if (d.L > 1024) sdo::throw_value_error("ms_deform_attn: the CUDA kernels take at most 1024 levels, got " +
                                         std::to_string(d.L));
}

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                        const at::Tensor& attn_weight, int64_t im2col_step) {
  const Tuning tuning = read_tuning();
  const auto in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step,
                                 at::kCUDA, /*check_levels_on_host=*/!tuning.vector_kernel);
  const c10::cuda::CUDAGuard guard(value.device());
  const Dims& d = in.dims;
  if (tuning.vector_kernel) check_levels_fit_shared_memory(d);
  auto output = at::empty({d.B, d.Q, d.H * d.D}, in.value.options());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using cuda_t = typename CudaType<scalar_t>::type;
    const cuda_t* value_ptr = cuda_ptr<scalar_t>(in.value);
    const int64_t* shapes = in.spatial_shapes.const_data_ptr<int64_t>();
    const int64_t* starts = in.level_start_index.const_data_ptr<int64_t>();
    const acc_t* loc = in.sampling_loc.const_data_ptr<acc_t>();
    const acc_t* attn = in.attn_weight.const_data_ptr<acc_t>();
    cuda_t* out = cuda_mut_ptr<scalar_t>(output);
    const cudaError_t err =
        tuning.vector_kernel
            ? cuda_vector::launch_forward<cuda_t, acc_t>(value_ptr, shapes, starts, loc, attn, out, d,
                                                         tuning.forward_heads_inner, tuning.points_split, stream)
            : cuda::launch_forward<cuda_t, acc_t>(value_ptr, shapes, starts, loc, attn, out, d, stream);
    check_launch(err, "forward kernel");
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
    int64_t im2col_step) {
  const Tuning tuning = read_tuning();
  const auto in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step,
                                 at::kCUDA, /*check_levels_on_host=*/!tuning.vector_kernel);
  const auto grad = prepare_grad_output(grad_output, in);
  const c10::cuda::CUDAGuard guard(value.device());
  const Dims& d = in.dims;
  if (tuning.vector_kernel) check_levels_fit_shared_memory(d);
  const auto acc = acc_dtype(value.scalar_type());
  auto grad_loc = at::empty(in.sampling_loc.sizes(), in.sampling_loc.options());
  auto grad_attn = at::empty(in.attn_weight.sizes(), in.attn_weight.options());
  at::Tensor grad_value;
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using cuda_t = typename CudaType<scalar_t>::type;
    // grad_value_ptr: acc_t (either kernel) or cuda_t (16-bit accumulation, vector kernels only).
    auto launch = [&](auto* grad_value_ptr) {
      const cuda_t* grad_ptr = cuda_ptr<scalar_t>(grad);
      const cuda_t* value_ptr = cuda_ptr<scalar_t>(in.value);
      const int64_t* shapes = in.spatial_shapes.const_data_ptr<int64_t>();
      const int64_t* starts = in.level_start_index.const_data_ptr<int64_t>();
      const acc_t* loc = in.sampling_loc.const_data_ptr<acc_t>();
      const acc_t* attn = in.attn_weight.const_data_ptr<acc_t>();
      acc_t* grad_loc_ptr = grad_loc.mutable_data_ptr<acc_t>();
      acc_t* grad_attn_ptr = grad_attn.mutable_data_ptr<acc_t>();
      if constexpr (std::is_same_v<std::remove_pointer_t<decltype(grad_value_ptr)>, acc_t>) {
        if (!tuning.vector_kernel) {
          check_launch(cuda::launch_backward<cuda_t, acc_t>(grad_ptr, value_ptr, shapes, starts, loc, attn,
                                                             grad_value_ptr, grad_loc_ptr, grad_attn_ptr, d, stream),
                       "backward kernel");
          return;
        }
      }
      check_launch(cuda_vector::launch_backward<cuda_t, acc_t>(grad_ptr, value_ptr, shapes, starts, loc, attn,
                                                                grad_value_ptr, grad_loc_ptr, grad_attn_ptr, d,
                                                                tuning.backward_heads_inner, tuning.points_split,
                                                                stream),
                   "backward kernel");
    };
    if constexpr (std::is_same_v<cuda_t, acc_t>) {
      grad_value = at::zeros(value.sizes(), value.options());
      launch(grad_value.mutable_data_ptr<acc_t>());
    } else {
      const bool native = tuning.vector_kernel && tuning.half_grad_native &&
                          compute_capability_major(value.device().index()) >= 9 &&
                          cuda_vector::half_accumulation_possible<cuda_t>(d, in.value.const_data_ptr(),
                                                                          grad.const_data_ptr());
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
