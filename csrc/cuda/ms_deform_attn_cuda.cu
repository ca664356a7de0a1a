// CUDA backend of sdo::ms_deform_attn: argument checks, dtype dispatch and stream handling around
// the kernels in ms_deform_attn_kernels.cuh. Built by setup.py / `sdo ops build` only with a CUDA
// build of torch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

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

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                        const at::Tensor& attn_weight, int64_t im2col_step) {
  const c10::cuda::CUDAGuard guard(value.device());
  const auto in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step,
                                 at::kCUDA);
  const Dims& d = in.dims;
  auto output = at::empty({d.B, d.Q, d.H * d.D}, in.value.options());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using cuda_t = typename CudaType<scalar_t>::type;
    check_launch(cuda::launch_forward<cuda_t, acc_t>(
                     cuda_ptr<scalar_t>(in.value), in.spatial_shapes.const_data_ptr<int64_t>(),
                     in.level_start_index.const_data_ptr<int64_t>(), in.sampling_loc.const_data_ptr<acc_t>(),
                     in.attn_weight.const_data_ptr<acc_t>(), cuda_mut_ptr<scalar_t>(output), d, stream),
                 "forward kernel");
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
    int64_t im2col_step) {
  const c10::cuda::CUDAGuard guard(value.device());
  const auto in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step,
                                 at::kCUDA);
  const auto grad = prepare_grad_output(grad_output, in);
  const Dims& d = in.dims;
  const auto acc = acc_dtype(value.scalar_type());
  auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc));
  auto grad_loc = at::empty(in.sampling_loc.sizes(), in.sampling_loc.options());
  auto grad_attn = at::empty(in.attn_weight.sizes(), in.attn_weight.options());
  auto grad_value = value.scalar_type() == acc ? grad_value_acc : at::empty(value.sizes(), value.options());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using cuda_t = typename CudaType<scalar_t>::type;
    check_launch(cuda::launch_backward<cuda_t, acc_t>(
                     cuda_ptr<scalar_t>(grad), cuda_ptr<scalar_t>(in.value), in.spatial_shapes.const_data_ptr<int64_t>(),
                     in.level_start_index.const_data_ptr<int64_t>(), in.sampling_loc.const_data_ptr<acc_t>(),
                     in.attn_weight.const_data_ptr<acc_t>(), grad_value_acc.mutable_data_ptr<acc_t>(),
                     grad_loc.mutable_data_ptr<acc_t>(), grad_attn.mutable_data_ptr<acc_t>(), d, stream),
                 "backward kernel");
    if (value.scalar_type() != acc) {
      check_launch(cuda::launch_cast<cuda_t, acc_t>(grad_value_acc.const_data_ptr<acc_t>(),
                                                    cuda_mut_ptr<scalar_t>(grad_value), grad_value.numel(), stream),
                   "grad_value cast");
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
