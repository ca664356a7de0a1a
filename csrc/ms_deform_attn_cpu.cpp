// CPU forward and backward of sdo::ms_deform_attn (see ms_deform_attn.h for shapes).
//
// Forward parallelises over (batch, head, query): every item owns one output row.
// Backward parallelises over (batch, head, channel block): grad_value[b, :, h, block] is then owned
// by exactly one task, so there are no atomics and no per-thread copies of grad_value, and the
// result is deterministic. Gradients of sampling_loc / attn_weight reduce over channels; with more
// than one channel block they go to small per-block buffers summed at the end.
#include "ms_deform_attn.h"
#include "ms_deform_attn_bilinear.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace sdo {
namespace {

// kD > 0: the channel count is a compile-time constant (the common head_dim 32), so the channel
// loops unroll and the accumulator stays in registers; kD = 0 handles any head_dim.
template <typename acc_t, int kD>
struct ChannelBuffer {
  acc_t data[kD];
  explicit ChannelBuffer(int64_t) {}
  acc_t* get() { return data; }
};
template <typename acc_t>
struct ChannelBuffer<acc_t, 0> {
  std::vector<acc_t> data;
  explicit ChannelBuffer(int64_t channels) : data(channels) {}
  acc_t* get() { return data.data(); }
};

// acc[0:n] += w * v[0:n]. Separate so that `restrict` tells the compiler the rows do not overlap.
template <typename scalar_t, typename acc_t, int kD>
inline void axpy_row(acc_t* __restrict__ acc, const scalar_t* __restrict__ v, acc_t w, int64_t n) {
  const int64_t count = kD > 0 ? kD : n;
  for (int64_t ch = 0; ch < count; ++ch) acc[ch] += w * static_cast<acc_t>(v[ch]);
}

// Backward of one corner over a channel run: gv += aw * g, returns <g, v>. The dot product keeps
// kLanes partial sums because without -ffast-math one running sum cannot be vectorised.
template <typename scalar_t, typename acc_t, int kD>
inline acc_t corner_backward(const acc_t* __restrict__ g, const scalar_t* __restrict__ v, acc_t* __restrict__ gv,
                             acc_t aw, int64_t n) {
  constexpr int kLanes = 8;
  const int64_t count = kD > 0 ? kD : n;
  acc_t part[kLanes] = {};
  int64_t ch = 0;
  for (; ch + kLanes <= count; ch += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      part[j] += g[ch + j] * static_cast<acc_t>(v[ch + j]);
      gv[ch + j] += aw * g[ch + j];
    }
  }
  if constexpr (kD == 0 || kD % kLanes != 0) {
    for (; ch < count; ++ch) {
      part[0] += g[ch] * static_cast<acc_t>(v[ch]);
      gv[ch] += aw * g[ch];
    }
  }
  acc_t sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += part[j];
  return sum;
}

// Corners of the L * P sampling points of one (b, q, h), with `level_base[l]` the offset of level l's
// first value row of this (b, h). The rows are prefetched: for queries in random spatial order
// (the sparse encoder's top-k tokens) the gathers otherwise wait on cache misses, so the kernels
// compute the next query's corners while accumulating the current one.
template <typename scalar_t, typename acc_t>
struct QueryCorners {
  std::vector<Corners<acc_t>> corners;
  std::vector<int64_t> level_base;

  explicit QueryCorners(const Dims& d) : corners(d.L * d.P), level_base(d.L) {}

  void compute(const scalar_t* value, acc_t* prefetch_also, const int64_t* shapes, const int64_t* starts,
               const acc_t* loc, int64_t b, int64_t h, int64_t point0, int64_t row_len, const Dims& d) {
    const int64_t token_stride = d.H * d.D;
    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      level_base[l] = (b * d.S + starts[l]) * token_stride + h * d.D;
      for (int64_t p = 0; p < d.P; ++p) {
        const int64_t point = point0 + l * d.P + p;
        Corners<acc_t>& c = corners[l * d.P + p];
        c = bilinear_corners<acc_t>(loc[2 * point], loc[2 * point + 1], height, width, token_stride);
        if (!c.any) continue;
        for (int k = 0; k < 4; ++k) {
          if (c.offset[k] >= 0) prefetch_row(level_base[l] + c.offset[k], value, prefetch_also, row_len);
        }
      }
    }
  }

  static void prefetch_row(int64_t row, const scalar_t* value, acc_t* also, int64_t row_len) {
#if defined(__GNUC__)
    constexpr int64_t kLine = 64;
    const char* v = reinterpret_cast<const char*>(value + row);
    for (int64_t byte = 0; byte < row_len * static_cast<int64_t>(sizeof(scalar_t)); byte += kLine) {
      __builtin_prefetch(v + byte);
    }
    if (also != nullptr) {
      const char* a = reinterpret_cast<const char*>(also + row);
      for (int64_t byte = 0; byte < row_len * static_cast<int64_t>(sizeof(acc_t)); byte += kLine) {
        __builtin_prefetch(a + byte, 1);
      }
    }
#endif
  }
};

template <typename scalar_t, typename acc_t, int kD>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const acc_t* loc,
                    const acc_t* attn, scalar_t* out, const Dims& d) {
  const int64_t channels = kD > 0 ? kD : d.D;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, d.L * d.P));
  // Items ordered (b, h, q): a thread walks the queries of one head, whose value rows (head_dim
  // channels each) around neighbouring queries stay in cache.
  at::parallel_for(0, d.B * d.H * d.Q, grain, [&](int64_t begin, int64_t end) {
    ChannelBuffer<acc_t, kD> buffer(channels);
    acc_t* acc = buffer.get();
    QueryCorners<scalar_t, acc_t> current(d), next(d);
    auto corners_of = [&](int64_t item, QueryCorners<scalar_t, acc_t>& into) {
      const int64_t q = item % d.Q, h = (item / d.Q) % d.H, b = item / (d.Q * d.H);
      into.compute(value, nullptr, shapes, starts, loc, b, h, ((b * d.Q + q) * d.H + h) * d.L * d.P, channels, d);
    };
    corners_of(begin, current);
    for (int64_t item = begin; item < end; ++item) {
      if (item + 1 < end) corners_of(item + 1, next);
      const int64_t q = item % d.Q, h = (item / d.Q) % d.H, b = item / (d.Q * d.H);
      const int64_t bqh = (b * d.Q + q) * d.H + h;
      for (int64_t ch = 0; ch < channels; ++ch) acc[ch] = 0;
      for (int64_t l = 0; l < d.L; ++l) {
        const scalar_t* level_value = value + current.level_base[l];
        for (int64_t p = 0; p < d.P; ++p) {
          const Corners<acc_t>& c = current.corners[l * d.P + p];
          if (!c.any) continue;
          const acc_t a = attn[bqh * d.L * d.P + l * d.P + p];
          for (int k = 0; k < 4; ++k) {
            if (c.offset[k] >= 0) axpy_row<scalar_t, acc_t, kD>(acc, level_value + c.offset[k], a * c.weight[k], channels);
          }
        }
      }
      scalar_t* o = out + bqh * channels;
      for (int64_t ch = 0; ch < channels; ++ch) o[ch] = static_cast<scalar_t>(acc[ch]);
      std::swap(current, next);
    }
  });
}

// grad_value_acc: [B, S, H, D] in acc_t, zero on entry (may alias the returned grad_value).
// grad_loc_part: [blocks, B, Q, H, L, P, 2], grad_attn_part: [blocks, B, Q, H, L, P], acc_t.
template <typename scalar_t, typename acc_t, int kD>
void backward_kernel(const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                     const acc_t* loc, const acc_t* attn, acc_t* grad_value_acc, acc_t* grad_loc_part,
                     acc_t* grad_attn_part, int64_t blocks, const Dims& d) {
  const int64_t channels = kD > 0 ? kD : d.D;  // kD > 0 only with a single channel block
  const int64_t block_len = (channels + blocks - 1) / blocks;
  const int64_t points_total = d.B * d.Q * d.H * d.L * d.P;
  at::parallel_for(0, d.B * d.H * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task % blocks;
      const int64_t h = (task / blocks) % d.H;
      const int64_t b = task / (blocks * d.H);
      const int64_t c0 = kD > 0 ? 0 : blk * block_len;
      const int64_t c1 = kD > 0 ? kD : std::min(channels, c0 + block_len);
      acc_t* g_loc = grad_loc_part + blk * points_total * 2;
      acc_t* g_attn = grad_attn_part + blk * points_total;
      ChannelBuffer<acc_t, kD> buffer(channels);
      acc_t* g = buffer.get();  // grad_output of this (b, q, h) and channel block, in acc_t
      QueryCorners<scalar_t, acc_t> current(d), next(d);
      auto corners_of = [&](int64_t q, QueryCorners<scalar_t, acc_t>& into) {
        into.compute(value + c0, grad_value_acc + c0, shapes, starts, loc, b, h, ((b * d.Q + q) * d.H + h) * d.L * d.P,
                     c1 - c0, d);
      };
      if (d.Q > 0) corners_of(0, current);
      for (int64_t q = 0; q < d.Q; ++q) {
        if (q + 1 < d.Q) corners_of(q + 1, next);
        const int64_t bq = b * d.Q + q;
        const scalar_t* go = grad_out + (bq * d.H + h) * channels;
        for (int64_t ch = c0; ch < c1; ++ch) g[ch - c0] = static_cast<acc_t>(go[ch]);
        const int64_t point0 = (bq * d.H + h) * d.L * d.P;
        for (int64_t l = 0; l < d.L; ++l) {
          const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
          const int64_t level_base = current.level_base[l];
          for (int64_t p = 0; p < d.P; ++p) {
            const int64_t point = point0 + l * d.P + p;
            const Corners<acc_t>& c = current.corners[l * d.P + p];
            if (!c.any) {  // outside the level: zero output, zero gradients
              g_attn[point] = 0;
              g_loc[2 * point] = 0;
              g_loc[2 * point + 1] = 0;
              continue;
            }
            const acc_t a = attn[point];
            acc_t dot[4] = {0, 0, 0, 0};  // <grad_out, value at corner> over this channel block
            for (int k = 0; k < 4; ++k) {
              if (c.offset[k] < 0) continue;
              const int64_t row = level_base + c.offset[k] + c0;
              dot[k] = corner_backward<scalar_t, acc_t, kD>(g, value + row, grad_value_acc + row, a * c.weight[k],
                                                            c1 - c0);
            }
            g_attn[point] = c.weight[0] * dot[0] + c.weight[1] * dot[1] + c.weight[2] * dot[2] + c.weight[3] * dot[3];
            const acc_t grad_w = c.hh * (dot[1] - dot[0]) + c.lh * (dot[3] - dot[2]);
            const acc_t grad_h = c.hw * (dot[2] - dot[0]) + c.lw * (dot[3] - dot[1]);
            g_loc[2 * point] = static_cast<acc_t>(width) * grad_w * a;
            g_loc[2 * point + 1] = static_cast<acc_t>(height) * grad_h * a;
          }
        }
        std::swap(current, next);
      }
    }
  });
}

// Enough (batch, head, channel block) tasks to keep every thread busy, blocks of >= 8 channels.
int64_t channel_blocks(const Dims& d) {
  const int64_t threads = at::get_num_threads();
  const int64_t pairs = d.B * d.H;
  if (pairs >= threads) return 1;
  const int64_t wanted = (threads + pairs - 1) / pairs;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, d.D / 8));
}

}  // namespace

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                      const at::Tensor& attn_weight, int64_t im2col_step) {
  const auto in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step,
                                 at::kCPU);
  const Dims& d = in.dims;
  auto output = at::empty({d.B, d.Q, d.H * d.D}, in.value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel = d.D == 32 ? forward_kernel<scalar_t, acc_t, 32> : forward_kernel<scalar_t, acc_t, 0>;
    kernel(in.value.const_data_ptr<scalar_t>(), in.spatial_shapes.const_data_ptr<int64_t>(),
           in.level_start_index.const_data_ptr<int64_t>(), in.sampling_loc.const_data_ptr<acc_t>(),
           in.attn_weight.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(), d);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
    int64_t im2col_step) {
  const auto in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step,
                                 at::kCPU);
  const auto grad = prepare_grad_output(grad_output, in);
  const Dims& d = in.dims;
  const auto acc = acc_dtype(value.scalar_type());
  const int64_t blocks = channel_blocks(d);
  auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc));
  auto grad_loc_part = at::empty({blocks, d.B, d.Q, d.H, d.L, d.P, 2}, in.sampling_loc.options());
  auto grad_attn_part = at::empty({blocks, d.B, d.Q, d.H, d.L, d.P}, in.attn_weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel = d.D == 32 && blocks == 1 ? backward_kernel<scalar_t, acc_t, 32> : backward_kernel<scalar_t, acc_t, 0>;
    kernel(grad.const_data_ptr<scalar_t>(), in.value.const_data_ptr<scalar_t>(),
           in.spatial_shapes.const_data_ptr<int64_t>(), in.level_start_index.const_data_ptr<int64_t>(),
           in.sampling_loc.const_data_ptr<acc_t>(), in.attn_weight.const_data_ptr<acc_t>(),
           grad_value_acc.mutable_data_ptr<acc_t>(), grad_loc_part.mutable_data_ptr<acc_t>(),
           grad_attn_part.mutable_data_ptr<acc_t>(), blocks, d);
  });
  auto grad_loc = blocks == 1 ? grad_loc_part[0] : grad_loc_part.sum(0);
  auto grad_attn = blocks == 1 ? grad_attn_part[0] : grad_attn_part.sum(0);
  auto grad_value = value.scalar_type() == acc ? grad_value_acc : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_loc.to(sampling_loc.scalar_type()), grad_attn.to(attn_weight.scalar_type())};
}

}  // namespace sdo
