// Bilinear sampling corners shared by the CPU and CUDA kernels of sdo::ms_deform_attn.
// Free of torch headers so that nvcc can compile the CUDA kernels without a CUDA build of torch.
#pragma once

#include <cstdint>
#include <type_traits>

#ifdef __CUDACC__
#define SDO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SDO_HOST_DEVICE inline
#endif

namespace sdo {

// B batch, S value tokens, H heads, D channels per head, Q queries, L levels, P points.
struct Dims {
  int64_t B, S, H, D, Q, L, P;
};

// The four corners of one sampling point, as grid_sample (bilinear, align_corners=False, zero
// padding) sees them. offset[k]: the corner's token inside its level times token_stride, or -1
// outside the level; weight[k]: its bilinear weight; lh/lw/hh/hw feed the location gradient.
// index_t: int64_t on the CPU; the CUDA kernels use int32_t where every offset fits.
template <typename acc_t, typename index_t = int64_t>
struct Corners {
  index_t offset[4];
  acc_t weight[4];
  acc_t lh, lw, hh, hw;
  bool any;  // false: the point lies outside the level and contributes nothing
};

// a * b rounded on its own: nvcc would fuse `a * b - 0.5` into one FMA, and a point exactly on a
// pixel centre could then fall on the other side of it than on the CPU (same output, other one-sided
// location gradient).
template <typename acc_t>
SDO_HOST_DEVICE acc_t mul_rounded(acc_t a, acc_t b) {
#ifdef __CUDA_ARCH__
  if constexpr (std::is_same<acc_t, float>::value) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

template <typename acc_t, typename index_t = int64_t>
SDO_HOST_DEVICE Corners<acc_t, index_t> bilinear_corners(acc_t loc_x, acc_t loc_y, index_t height, index_t width,
                                                         index_t token_stride) {
  Corners<acc_t, index_t> c;
  const acc_t h_im = mul_rounded(loc_y, static_cast<acc_t>(height)) - acc_t(0.5);
  const acc_t w_im = mul_rounded(loc_x, static_cast<acc_t>(width)) - acc_t(0.5);
  c.any = h_im > acc_t(-1) && w_im > acc_t(-1) && h_im < static_cast<acc_t>(height) &&
          w_im < static_cast<acc_t>(width);
  if (!c.any) return c;
  // h_im, w_im > -1 here, so truncation + a fix-up is floor (and avoids a libm call without SSE4.1).
  index_t h_low = static_cast<index_t>(h_im);
  index_t w_low = static_cast<index_t>(w_im);
  h_low -= static_cast<acc_t>(h_low) > h_im;
  w_low -= static_cast<acc_t>(w_low) > w_im;
  const index_t h_high = h_low + 1, w_high = w_low + 1;
  c.lh = h_im - static_cast<acc_t>(h_low);
  c.lw = w_im - static_cast<acc_t>(w_low);
  c.hh = acc_t(1) - c.lh;
  c.hw = acc_t(1) - c.lw;
  const bool top = h_low >= 0, bottom = h_high <= height - 1;
  const bool left = w_low >= 0, right = w_high <= width - 1;
  c.offset[0] = top && left ? (h_low * width + w_low) * token_stride : -1;
  c.offset[1] = top && right ? (h_low * width + w_high) * token_stride : -1;
  c.offset[2] = bottom && left ? (h_high * width + w_low) * token_stride : -1;
  c.offset[3] = bottom && right ? (h_high * width + w_high) * token_stride : -1;
  c.weight[0] = c.hh * c.hw;
  c.weight[1] = c.hh * c.lw;
  c.weight[2] = c.lh * c.hw;
  c.weight[3] = c.lh * c.lw;
  return c;
}

}  // namespace sdo
