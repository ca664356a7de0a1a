// CUDA kernels of sdo::ms_deform_attn, free of any torch header so that `nvcc -c` can compile them
// for every architecture without a CUDA build of torch (see tests/ops/test_ops_nvcc.py).
//
// The default kernels, "channel": threads map to channels (the forward: one thread per output
// element; the backward: one warp per (b, q, h), lanes striding over its channels). Verified on an
// H200 against float64 and the official op. They trust the level table: the host checks it first.
// SDO_MSDA_CUDA=kernel=vector selects the kernels of ms_deform_attn_vector_kernels.cuh instead.
//
// Layouts (contiguous): value [B, S, H, D], spatial_shapes [L, 2] (H_l, W_l), level_start_index [L],
// sampling_loc [B, Q, H, L, P, 2] (x, y), attn_weight [B, Q, H, L, P], output [B, Q, H, D].
// scalar_t: float, double, __half or __nv_bfloat16 (value, output, grad_output, grad_value);
// acc_t: float (double for double) for locations, weights, their gradients and all accumulation.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../ms_deform_attn_bilinear.h"

namespace sdo {
namespace cuda {

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(double x) { return x; }

// One thread per output element (b, q, h, c): neighbouring threads read neighbouring channels.
template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const acc_t* __restrict__ loc,
                               const acc_t* __restrict__ attn, scalar_t* __restrict__ out, Dims d) {
  const int64_t total = d.B * d.Q * d.H * d.D;
  for (int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; n < total;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ch = n % d.D;
    const int64_t bqh = n / d.D;
    const int64_t h = bqh % d.H;
    const int64_t b = bqh / (d.H * d.Q);
    const int64_t token_stride = d.H * d.D;
    acc_t acc = 0;
    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const scalar_t* level_value = value + (b * d.S + starts[l]) * token_stride + h * d.D + ch;
      for (int64_t p = 0; p < d.P; ++p) {
        const int64_t point = (bqh * d.L + l) * d.P + p;
        const auto c = bilinear_corners<acc_t>(loc[2 * point], loc[2 * point + 1], height, width, token_stride);
        if (!c.any) continue;
        acc_t sample = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (c.offset[k] >= 0) sample += c.weight[k] * to_acc(level_value[c.offset[k]]);
        }
        acc += attn[point] * sample;
      }
    }
    out[n] = from_acc<scalar_t>(acc);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

// One warp per (b, q, h); lanes stride over channels. grad_value is accumulated with atomicAdd in
// acc_t (queries share value tokens); the location / weight gradients reduce over channels with
// warp shuffles, so they are written once, without atomics.
template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                const acc_t* __restrict__ loc, const acc_t* __restrict__ attn,
                                acc_t* __restrict__ grad_value, acc_t* __restrict__ grad_loc,
                                acc_t* __restrict__ grad_attn, Dims d) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_total = d.B * d.Q * d.H;
  const int64_t warps_per_grid = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t bqh = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32; bqh < warps_total;
       bqh += warps_per_grid) {  // uniform per warp, so every lane takes part in the shuffles
    const int64_t h = bqh % d.H;
    const int64_t b = bqh / (d.H * d.Q);
    const int64_t token_stride = d.H * d.D;
    const scalar_t* go = grad_out + bqh * d.D;
    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const int64_t level_base = (b * d.S + starts[l]) * token_stride + h * d.D;
      for (int64_t p = 0; p < d.P; ++p) {
        const int64_t point = (bqh * d.L + l) * d.P + p;
        const auto c = bilinear_corners<acc_t>(loc[2 * point], loc[2 * point + 1], height, width, token_stride);
        if (!c.any) {  // also uniform per warp: all lanes read the same point
          if (lane == 0) {
            grad_attn[point] = 0;
            grad_loc[2 * point] = 0;
            grad_loc[2 * point + 1] = 0;
          }
          continue;
        }
        const acc_t a = attn[point];
        acc_t dot[4] = {0, 0, 0, 0};
        for (int64_t ch = lane; ch < d.D; ch += 32) {
          const acc_t g = to_acc(go[ch]);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (c.offset[k] < 0) continue;
            const int64_t idx = level_base + c.offset[k] + ch;
            dot[k] += g * to_acc(value[idx]);
            atomicAdd(grad_value + idx, a * c.weight[k] * g);
          }
        }
        acc_t g_attn = c.weight[0] * dot[0] + c.weight[1] * dot[1] + c.weight[2] * dot[2] + c.weight[3] * dot[3];
        acc_t g_w = c.hh * (dot[1] - dot[0]) + c.lh * (dot[3] - dot[2]);
        acc_t g_h = c.hw * (dot[2] - dot[0]) + c.lw * (dot[3] - dot[1]);
        g_attn = warp_sum(g_attn);
        g_w = warp_sum(g_w);
        g_h = warp_sum(g_h);
        if (lane == 0) {
          grad_attn[point] = g_attn;
          grad_loc[2 * point] = static_cast<acc_t>(width) * g_w * a;
          grad_loc[2 * point + 1] = static_cast<acc_t>(height) * g_h * a;
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void cast_kernel(const acc_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = from_acc<scalar_t>(src[i]);
  }
}

constexpr int kThreads = 256;

inline unsigned int grid_for(int64_t threads_needed) {
  const int64_t blocks = (threads_needed + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(1) << 20;  // grid-stride loops cover the rest
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// Host launchers (pointers are device pointers; shapes/starts live on the device).
template <typename scalar_t, typename acc_t>
cudaError_t launch_forward(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const acc_t* loc,
                           const acc_t* attn, scalar_t* out, Dims d, cudaStream_t stream) {
  const int64_t total = d.B * d.Q * d.H * d.D;
  if (total == 0) return cudaSuccess;
  forward_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(value, shapes, starts, loc, attn, out, d);
  return cudaGetLastError();
}

// grad_value must be zero on entry; grad_loc / grad_attn are fully written.
template <typename scalar_t, typename acc_t>
cudaError_t launch_backward(const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes,
                            const int64_t* starts, const acc_t* loc, const acc_t* attn, acc_t* grad_value,
                            acc_t* grad_loc, acc_t* grad_attn, Dims d, cudaStream_t stream) {
  const int64_t warps = d.B * d.Q * d.H;
  if (warps == 0) return cudaSuccess;
  backward_kernel<scalar_t, acc_t><<<grid_for(warps * 32), kThreads, 0, stream>>>(
      grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc, grad_attn, d);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_cast(const acc_t* src, scalar_t* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  cast_kernel<scalar_t, acc_t><<<grid_for(n), kThreads, 0, stream>>>(src, dst, n);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sdo
