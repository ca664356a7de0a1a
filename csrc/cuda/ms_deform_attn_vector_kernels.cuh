// The opt-in CUDA kernels of sdo::ms_deform_attn (SDO_MSDA_CUDA=kernel=vector): a group of lanes per
// (batch, query, head) reading 16-byte vectors. Not yet run on a GPU; the default is the verified
// one-thread-per-channel kernel of ms_deform_attn_kernels.cuh (whose element conversions and
// grad_value cast this file reuses). Free of any torch header, like it (see tests/ops/test_ops_nvcc.py).
//
// Layouts (contiguous): value [B, S, H, D], spatial_shapes [L, 2] (H_l, W_l), level_start_index [L],
// sampling_loc [B, Q, H, L, P, 2] (x, y), attn_weight [B, Q, H, L, P], output [B, Q, H, D].
// scalar_t: float, double, __half or __nv_bfloat16 (value, output, grad_output);
// acc_t: float (double for double) for locations, weights, their gradients and all accumulation;
// grad_t: the type grad_value is accumulated in: acc_t, or scalar_t itself for the 16-bit types on
// sm_90+ (paired half / bfloat16 atomics, see launch_backward).
//
// Work split: one "item" is one (b, q, h); a group of G lanes (a power of two <= 32) owns an item,
// each lane V contiguous channels (a 16-byte vector: 4 floats, 8 halves, 2 doubles), so a warp
// holds 32 / G items. With D = 32 in float32, G = 8: four queries per warp, each value row (one
// corner, one head: 128 bytes) read by one 16-byte load per lane. Every lane of a group computes the
// same bilinear corners (cheaper than sharing them through shuffles). The backward reduces the
// location / weight gradients over the G lanes with xor shuffles. Small problems give each item K
// groups ("slices") that split its points: the forward sums the slices' outputs with shuffles, the
// backward needs nothing more (every point is still owned by one group).
//
// Levels whose extent does not fit in S (or with a non-positive size) are treated as empty: the
// CUDA path does not read spatial_shapes on the host (no device-to-host copy, no sync, capturable
// in a CUDA graph), so this keeps memory accesses in bounds for any input.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../ms_deform_attn_bilinear.h"
#include "ms_deform_attn_kernels.cuh"

namespace sdo {
namespace cuda_vector {

using cuda::from_acc;
using cuda::to_acc;

constexpr int kThreads = 256;

// ---- vectors of V elements, one aligned load / store -----------------------------------------
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& x) {
  *reinterpret_cast<Pack<T, V>*>(p) = x;
}

// Elements per 16-byte vector.
template <typename scalar_t>
constexpr int vector_width() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

// ---- grad_value accumulation: dst[0:V] += src[0:V] -------------------------------------------
// Float32 on sm_90+: one 16-byte vector reduction (red.global.add.v4.f32) instead of four.
template <int V>
__device__ __forceinline__ void atomic_add_pack(float* dst, const float* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVectorRed = V % 4 == 0;
#else
  constexpr bool kVectorRed = false;
#endif
  if constexpr (kVectorRed) {
#pragma unroll
    for (int j = 0; j < V; j += 4) {
      asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(dst + j), "f"(src[j]), "f"(src[j + 1]),
                   "f"(src[j + 2]), "f"(src[j + 3])
                   : "memory");
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) atomicAdd(dst + j, src[j]);
  }
}

template <int V>
__device__ __forceinline__ void atomic_add_pack(double* dst, const double* src) {
#pragma unroll
  for (int j = 0; j < V; ++j) atomicAdd(dst + j, src[j]);
}

// 16-bit grad_value (sm_90+ only; launch_backward picks this path only there): 8 halves or
// bfloat16s = one 16-byte vector reduction of four packed pairs, rounded once per add.
__device__ __forceinline__ unsigned int pack_pair(__half, float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const unsigned int*>(&h);
}
__device__ __forceinline__ unsigned int pack_pair(__nv_bfloat16, float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const unsigned int*>(&h);
}

template <int V, typename half_t>
__device__ __forceinline__ void atomic_add_half_pack(half_t* dst, const float* src) {
  static_assert(V % 8 == 0, "paired 16-bit atomics take 8 elements at a time");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#pragma unroll
  for (int j = 0; j < V; j += 8) {
    const unsigned int p0 = pack_pair(half_t(), src[j], src[j + 1]), p1 = pack_pair(half_t(), src[j + 2], src[j + 3]);
    const unsigned int p2 = pack_pair(half_t(), src[j + 4], src[j + 5]), p3 = pack_pair(half_t(), src[j + 6], src[j + 7]);
    if constexpr (std::is_same<half_t, __half>::value) {
      asm volatile("red.global.add.noftz.v4.f16x2 [%0], {%1, %2, %3, %4};" ::"l"(dst + j), "r"(p0), "r"(p1), "r"(p2),
                   "r"(p3)
                   : "memory");
    } else {
      asm volatile("red.global.add.noftz.v4.bf16x2 [%0], {%1, %2, %3, %4};" ::"l"(dst + j), "r"(p0), "r"(p1), "r"(p2),
                   "r"(p3)
                   : "memory");
    }
  }
#else
  __trap();  // unreachable: the host selects 16-bit accumulation only on sm_90+
#endif
}

template <int V>
__device__ __forceinline__ void atomic_add_pack(__half* dst, const float* src) {
  atomic_add_half_pack<V>(dst, src);
}
template <int V>
__device__ __forceinline__ void atomic_add_pack(__nv_bfloat16* dst, const float* src) {
  atomic_add_half_pack<V>(dst, src);
}

// ---- work split --------------------------------------------------------------------------------
template <typename index_t>
struct Shape {
  index_t B, S, H, D, Q, L, P;
};

// How lanes map to items: G = 1 << log2_group lanes per item and slice; items ordered (b, q, h) with
// heads_inner, else (b, h, q) (neighbouring queries of one head in one warp: for the dense encoder,
// whose queries are pixels in raster order, their samples overlap, which the L1 cache exploits).
// K = 1 << log2_split groups ("slices") share one item and split its points (K divides P): small
// problems (the decoder's 300 queries) then keep K times more lanes busy.
struct Layout {
  int log2_group;
  int log2_split;
  bool heads_inner;
};

template <typename index_t>
struct Item {
  index_t b, h, bqh;  // bqh = (b * Q + q) * H + h: the row of output / sampling_loc / attn_weight
};

template <typename index_t>
__device__ __forceinline__ Item<index_t> decode_item(index_t item, const Shape<index_t>& d, bool heads_inner) {
  Item<index_t> it;
  index_t q;
  if (heads_inner) {
    it.h = item % d.H;
    q = (item / d.H) % d.Q;
    it.b = item / (d.H * d.Q);
  } else {
    q = item % d.Q;
    it.h = (item / d.Q) % d.H;
    it.b = item / (d.Q * d.H);
  }
  it.bqh = (it.b * d.Q + q) * d.H + it.h;
  return it;
}

// Size and first token of one level, or ok = 0 when the level does not fit in S (see the file
// comment). Staged once per block in shared memory: validating costs 64-bit divisions.
template <typename index_t>
struct LevelSpec {
  index_t height, width, start;
  int ok;
};

template <typename index_t>
__device__ __forceinline__ const LevelSpec<index_t>* stage_levels(const int64_t* __restrict__ shapes,
                                                                  const int64_t* __restrict__ starts,
                                                                  const Shape<index_t>& d) {
  extern __shared__ __align__(16) unsigned char level_storage[];
  auto* levels = reinterpret_cast<LevelSpec<index_t>*>(level_storage);
  for (int l = threadIdx.x; l < static_cast<int>(d.L); l += blockDim.x) {
    const int64_t height = shapes[2 * l], width = shapes[2 * l + 1], start = starts[l];
    const int64_t room = static_cast<int64_t>(d.S) - start;  // tokens from start to the end of S
    const bool ok = height > 0 && width > 0 && start >= 0 && room >= height && width <= room / height;
    levels[l] = {ok ? static_cast<index_t>(height) : index_t(1), ok ? static_cast<index_t>(width) : index_t(1),
                 ok ? static_cast<index_t>(start) : index_t(0), ok ? 1 : 0};
  }
  __syncthreads();
  return levels;
}

// Offset in value of the first row of a level for batch b, head h.
template <typename index_t>
__device__ __forceinline__ index_t level_base(const LevelSpec<index_t>& level, index_t b, index_t h,
                                              const Shape<index_t>& d) {
  return ((b * d.S + level.start) * d.H + h) * d.D;
}

// How the lanes of a warp walk over the items: grid-stride over warps, so the loop bounds are uniform
// per warp (every lane reaches the backward's shuffles).
// Lane bits, low to high: sub (channel vector within the group), slice, slot (item within the warp).
template <typename index_t>
struct WarpItems {
  int group, sub, slices, slice, slot;
  index_t items, per_warp, first_warp, warp_stride;

  __device__ __forceinline__ WarpItems(const Shape<index_t>& d, Layout layout) {
    const int lane = threadIdx.x & 31;
    group = 1 << layout.log2_group;
    sub = lane & (group - 1);
    slices = 1 << layout.log2_split;
    slice = (lane >> layout.log2_group) & (slices - 1);
    slot = lane >> (layout.log2_group + layout.log2_split);
    items = d.B * d.Q * d.H;
    per_warp = 32 >> (layout.log2_group + layout.log2_split);
    first_warp = (static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
    warp_stride = static_cast<index_t>(gridDim.x) * (kThreads / 32);
  }
};

// ---- forward -----------------------------------------------------------------------------------
// kOneChunk: D <= G * V, every lane owns at most one vector of channels (the fast path, which may
// split points over slices); else one slice, the lanes stride over channel chunks.
template <typename scalar_t, typename acc_t, int V, bool kOneChunk, typename index_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(const scalar_t* __restrict__ value,
                                                           const int64_t* __restrict__ shapes,
                                                           const int64_t* __restrict__ starts,
                                                           const acc_t* __restrict__ loc,
                                                           const acc_t* __restrict__ attn,
                                                           scalar_t* __restrict__ out, Shape<index_t> d,
                                                           Layout layout) {
  const WarpItems<index_t> w(d, layout);
  const index_t token_stride = d.H * d.D;
  const index_t points = d.L * d.P;
  const LevelSpec<index_t>* levels = stage_levels(shapes, starts, d);
  for (index_t warp = w.first_warp; warp * w.per_warp < w.items; warp += w.warp_stride) {
    const index_t raw_item = warp * w.per_warp + w.slot;
    const bool active = raw_item < w.items;  // inactive lanes join the slice sum, write nothing
    const Item<index_t> it = decode_item(active ? raw_item : w.items - 1, d, layout.heads_inner);
    const acc_t* item_loc = loc + it.bqh * points * 2;
    const acc_t* item_attn = attn + it.bqh * points;
    for (index_t c0 = static_cast<index_t>(w.sub) * V;; c0 += static_cast<index_t>(w.group) * V) {
      const bool lane_on = active && c0 < d.D;
      if (!kOneChunk && !lane_on) break;  // one slice here: no shuffles, lanes may leave
      acc_t acc[V];
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = 0;
      for (index_t l = 0; lane_on && l < d.L; ++l) {
        const LevelSpec<index_t> level = levels[l];
        if (!level.ok) continue;
        const scalar_t* level_value = value + level_base(level, it.b, it.h, d) + c0;
#pragma unroll 4
        for (index_t p = w.slice; p < d.P; p += w.slices) {
          const index_t point = l * d.P + p;
          const auto c = bilinear_corners<acc_t, index_t>(item_loc[2 * point], item_loc[2 * point + 1], level.height,
                                                          level.width, token_stride);
          if (!c.any) continue;
          const acc_t a = item_attn[point];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (c.offset[k] < 0) continue;
            const Pack<scalar_t, V> v = load_pack<scalar_t, V>(level_value + c.offset[k]);
            const acc_t weight = a * c.weight[k];
#pragma unroll
            for (int j = 0; j < V; ++j) acc[j] += weight * to_acc(v.v[j]);
          }
        }
      }
      if (kOneChunk) {  // every lane is here once: sum the slices' partial outputs
        for (int offset = w.group; offset < w.group * w.slices; offset *= 2) {
#pragma unroll
          for (int j = 0; j < V; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], offset);
        }
      }
      if (lane_on && w.slice == 0) {
        Pack<scalar_t, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) o.v[j] = from_acc<scalar_t>(acc[j]);
        store_pack<scalar_t, V>(out + it.bqh * d.D + c0, o);
      }
      if (kOneChunk) break;
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, int group) {
  for (int offset = group / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// One corner over one chunk of V channels: returns <grad_out, value> over the chunk and adds
// w * grad_out to grad_value.
template <typename scalar_t, typename acc_t, typename grad_t, int V, typename index_t>
__device__ __forceinline__ acc_t corner_backward(const scalar_t* __restrict__ value, grad_t* grad_value, index_t row,
                                                 const acc_t (&g)[V], acc_t w) {
  const Pack<scalar_t, V> v = load_pack<scalar_t, V>(value + row);
  acc_t dot = 0;
  acc_t contribution[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    dot += g[j] * to_acc(v.v[j]);
    contribution[j] = w * g[j];
  }
  atomic_add_pack<V>(grad_value + row, contribution);
  return dot;
}

template <typename scalar_t, typename acc_t, int V, typename index_t>
__device__ __forceinline__ void load_grad_chunk(const scalar_t* __restrict__ grad_out, index_t offset, bool valid,
                                                acc_t (&g)[V]) {
  if (valid) {
    const Pack<scalar_t, V> x = load_pack<scalar_t, V>(grad_out + offset);
#pragma unroll
    for (int j = 0; j < V; ++j) g[j] = to_acc(x.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) g[j] = 0;
  }
}

// grad_value: zero on entry, accumulated with atomics (queries share value rows). grad_loc and
// grad_attn are fully written, once per point, by the first lane of each group.
template <typename scalar_t, typename acc_t, typename grad_t, int V, bool kOneChunk, typename index_t>
__global__ void __launch_bounds__(kThreads) backward_kernel(const scalar_t* __restrict__ grad_out,
                                                            const scalar_t* __restrict__ value,
                                                            const int64_t* __restrict__ shapes,
                                                            const int64_t* __restrict__ starts,
                                                            const acc_t* __restrict__ loc,
                                                            const acc_t* __restrict__ attn, grad_t* grad_value,
                                                            acc_t* __restrict__ grad_loc,
                                                            acc_t* __restrict__ grad_attn, Shape<index_t> d,
                                                            Layout layout) {
  const WarpItems<index_t> w(d, layout);
  const index_t token_stride = d.H * d.D;
  const index_t points = d.L * d.P;
  const index_t chunk_stride = static_cast<index_t>(w.group) * V;
  const LevelSpec<index_t>* levels = stage_levels(shapes, starts, d);
  for (index_t warp = w.first_warp; warp * w.per_warp < w.items; warp += w.warp_stride) {
    const index_t raw_item = warp * w.per_warp + w.slot;
    const bool active = raw_item < w.items;  // inactive lanes compute on the last item, write nothing
    const Item<index_t> it = decode_item(active ? raw_item : w.items - 1, d, layout.heads_inner);
    const acc_t* item_loc = loc + it.bqh * points * 2;
    const acc_t* item_attn = attn + it.bqh * points;
    const scalar_t* item_grad = grad_out + it.bqh * d.D;
    const index_t first_c = static_cast<index_t>(w.sub) * V;
    acc_t g[V];  // grad_out of this lane's channels (the one chunk on the fast path)
    if (kOneChunk) load_grad_chunk<scalar_t, acc_t, V>(item_grad, first_c, active && first_c < d.D, g);
    for (index_t l = 0; l < d.L; ++l) {
      const LevelSpec<index_t> level = levels[l];
      const index_t base = level_base(level, it.b, it.h, d);
      for (index_t p = w.slice; p < d.P; p += w.slices) {  // the same trip count on every lane (K divides P)
        const index_t point = l * d.P + p;
        const auto c = bilinear_corners<acc_t, index_t>(item_loc[2 * point], item_loc[2 * point + 1], level.height,
                                                        level.width, token_stride);
        const bool sampled = active && level.ok && c.any;
        const acc_t a = sampled ? item_attn[point] : acc_t(0);
        acc_t dot[4] = {0, 0, 0, 0};
        if (sampled) {
          for (index_t c0 = first_c; c0 < d.D; c0 += chunk_stride) {
            if (!kOneChunk) load_grad_chunk<scalar_t, acc_t, V>(item_grad, c0, true, g);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              if (c.offset[k] >= 0) {
                dot[k] += corner_backward<scalar_t, acc_t, grad_t, V>(value, grad_value, base + c.offset[k] + c0,
                                                                      g, a * c.weight[k]);
              }
            }
            if (kOneChunk) break;
          }
        }
        acc_t g_attn = 0, g_w = 0, g_h = 0;
        if (sampled) {
          g_attn = c.weight[0] * dot[0] + c.weight[1] * dot[1] + c.weight[2] * dot[2] + c.weight[3] * dot[3];
          g_w = c.hh * (dot[1] - dot[0]) + c.lh * (dot[3] - dot[2]);
          g_h = c.hw * (dot[2] - dot[0]) + c.lw * (dot[3] - dot[1]);
        }
        g_attn = group_sum(g_attn, w.group);
        g_w = group_sum(g_w, w.group);
        g_h = group_sum(g_h, w.group);
        if (active && w.sub == 0) {
          const index_t out_point = it.bqh * points + point;
          grad_attn[out_point] = g_attn;
          grad_loc[2 * out_point] = static_cast<acc_t>(level.width) * g_w * a;
          grad_loc[2 * out_point + 1] = static_cast<acc_t>(level.height) * g_h * a;
        }
      }
    }
  }
}

// ---- host side ---------------------------------------------------------------------------------
inline bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline int log2_ceil(int64_t n) {
  int k = 0;
  while ((int64_t(1) << k) < n) ++k;
  return k;
}

// Which kernel instance runs: the vector width V (vectors: one chunk of channels per lane; scalars:
// lanes stride over channels, 64-bit indices), whether 32-bit indices suffice, the lanes per item.
struct Plan {
  int vec;
  bool index32;
  Layout layout;
};

// vec_ok: D is a multiple of the vector width and every pointer that is read or written with
// vectors is aligned to it (the caller checks the pointers). split: slices per item, 0 = automatic
// (enough lanes for about two waves of a large GPU); always a power of two that divides P, with
// G * K <= 32, and 1 on the scalar path.
inline Plan make_plan(const Dims& d, int vector, bool vec_ok, bool heads_inner, int split = 0) {
  Plan plan;
  const bool vectors = vec_ok && d.D % vector == 0 && d.D / vector <= 32;
  plan.vec = vectors ? vector : 1;
  const int64_t lanes_needed = (d.D + plan.vec - 1) / plan.vec;
  plan.layout.log2_group = log2_ceil(lanes_needed < 32 ? lanes_needed : 32);
  plan.layout.heads_inner = heads_inner;
  const int64_t items = d.B * d.Q * d.H;
  int log2_split = 0;
  if (vectors) {
    const int64_t lanes = items << plan.layout.log2_group;
    constexpr int64_t kWantedLanes = int64_t(1) << 19;
    auto fits = [&](int k) { return plan.layout.log2_group + k <= 5 && d.P % (int64_t(1) << k) == 0; };
    if (split > 0) {
      while ((2 << log2_split) <= split && fits(log2_split + 1)) ++log2_split;
    } else {
      while (fits(log2_split + 1) && (lanes << (log2_split + 1)) <= kWantedLanes) ++log2_split;
    }
  }
  plan.layout.log2_split = log2_split;
  const int64_t limit = int64_t(1) << 31;
  const int64_t value_numel = d.B * d.S * d.H * d.D;
  const int64_t loc_numel = d.B * d.Q * d.H * d.L * d.P * 2;
  const int64_t out_numel = d.B * d.Q * d.H * d.D;
  // 32-bit indexing: every offset below 2^31, with room for the item counter to run one grid of
  // warps (<= 2^28 lanes, see grid_for) past the last item. The scalar path always uses 64 bits.
  plan.index32 = plan.vec > 1 && value_numel < limit && loc_numel < limit && out_numel < limit &&
                 items * 32 + (int64_t(1) << 28) < limit;
  return plan;
}

template <typename index_t>
Shape<index_t> narrow(const Dims& d) {
  return {static_cast<index_t>(d.B), static_cast<index_t>(d.S), static_cast<index_t>(d.H), static_cast<index_t>(d.D),
          static_cast<index_t>(d.Q), static_cast<index_t>(d.L), static_cast<index_t>(d.P)};
}

inline size_t level_bytes(const Dims& d, const Plan& plan) {
  return static_cast<size_t>(d.L) * (plan.index32 ? sizeof(LevelSpec<int32_t>) : sizeof(LevelSpec<int64_t>));
}

inline unsigned int grid_for(const Dims& d, const Plan& plan) {
  const int64_t per_warp = 32 >> (plan.layout.log2_group + plan.layout.log2_split);
  const int64_t warps = (d.B * d.Q * d.H + per_warp - 1) / per_warp;
  const int64_t blocks = (warps + kThreads / 32 - 1) / (kThreads / 32);
  const int64_t cap = int64_t(1) << 20;  // grid-stride loops cover the rest
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// Host launchers (device pointers; shapes/starts live on the device). heads_inner: item order;
// split: slices per item, 0 = automatic (see Layout and make_plan; both are tuning knobs).
template <typename scalar_t, typename acc_t>
cudaError_t launch_forward(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const acc_t* loc,
                           const acc_t* attn, scalar_t* out, Dims d, bool heads_inner, int split,
                           cudaStream_t stream) {
  if (d.B * d.Q * d.H * d.D == 0) return cudaSuccess;
  constexpr int kVec = vector_width<scalar_t>();
  const int bytes = kVec * static_cast<int>(sizeof(scalar_t));
  const Plan plan = make_plan(d, kVec, aligned(value, bytes) && aligned(out, bytes), heads_inner, split);
  const unsigned int grid = grid_for(d, plan);
  const size_t smem = level_bytes(d, plan);
  if (plan.vec == kVec && plan.index32) {
    forward_kernel<scalar_t, acc_t, kVec, true, int32_t>
        <<<grid, kThreads, smem, stream>>>(value, shapes, starts, loc, attn, out, narrow<int32_t>(d), plan.layout);
  } else if (plan.vec == kVec) {
    forward_kernel<scalar_t, acc_t, kVec, true, int64_t>
        <<<grid, kThreads, smem, stream>>>(value, shapes, starts, loc, attn, out, narrow<int64_t>(d), plan.layout);
  } else {
    forward_kernel<scalar_t, acc_t, 1, false, int64_t>
        <<<grid, kThreads, smem, stream>>>(value, shapes, starts, loc, attn, out, narrow<int64_t>(d), plan.layout);
  }
  return cudaGetLastError();
}

// True when launch_backward can accumulate grad_value in scalar_t itself (16-bit types): the
// vector path must apply (D a multiple of 8; value and grad_output 16-byte aligned, as is any
// fresh torch allocation for grad_value), and the device must be sm_90+ (vector
// red.global.add.*x2), which the caller checks.
template <typename scalar_t>
bool half_accumulation_possible(const Dims& d, const void* value, const void* grad_out) {
  constexpr int kVec = vector_width<scalar_t>();
  return sizeof(scalar_t) == 2 && d.D % kVec == 0 && d.D / kVec <= 32 && aligned(value, 16) && aligned(grad_out, 16);
}

// grad_value must be zero on entry; grad_loc / grad_attn are fully written. grad_t is acc_t, or
// scalar_t for 16-bit types where half_accumulation_possible() (else cudaErrorInvalidValue).
template <typename scalar_t, typename acc_t, typename grad_t>
cudaError_t launch_backward(const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes,
                            const int64_t* starts, const acc_t* loc, const acc_t* attn, grad_t* grad_value,
                            acc_t* grad_loc, acc_t* grad_attn, Dims d, bool heads_inner, int split,
                            cudaStream_t stream) {
  if (d.B * d.Q * d.H == 0) return cudaSuccess;
  constexpr int kVec = vector_width<scalar_t>();
  constexpr bool kHalfGrad = sizeof(grad_t) == 2;
  const int bytes = kVec * static_cast<int>(sizeof(scalar_t));
  const bool vec_ok = aligned(value, bytes) && aligned(grad_out, bytes) &&
                      aligned(grad_value, kVec * static_cast<int>(sizeof(grad_t)));
  const Plan plan = make_plan(d, kVec, vec_ok, heads_inner, split);
  const unsigned int grid = grid_for(d, plan);
  const size_t smem = level_bytes(d, plan);
  if constexpr (kHalfGrad) {
    if (plan.vec != kVec) return cudaErrorInvalidValue;
  }
  if (plan.vec == kVec && plan.index32) {
    backward_kernel<scalar_t, acc_t, grad_t, kVec, true, int32_t><<<grid, kThreads, smem, stream>>>(
        grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc, grad_attn, narrow<int32_t>(d), plan.layout);
  } else if (plan.vec == kVec) {
    backward_kernel<scalar_t, acc_t, grad_t, kVec, true, int64_t><<<grid, kThreads, smem, stream>>>(
        grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc, grad_attn, narrow<int64_t>(d), plan.layout);
  } else if constexpr (!kHalfGrad) {
    backward_kernel<scalar_t, acc_t, grad_t, 1, false, int64_t><<<grid, kThreads, smem, stream>>>(
        grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc, grad_attn, narrow<int64_t>(d), plan.layout);
  }
  return cudaGetLastError();
}

}  // namespace cuda_vector
}  // namespace sdo
