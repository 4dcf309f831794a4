// The token kernels' bodies, written once: what one lane does for one row. nvcc compiles them
// into the CUDA kernels (a block per row, threadIdx.x / blockDim.x as the lanes: token_ops.cu),
// the host compiler into the CPU backend (emulated lanes in a loop: csrc/cpu/token_ops.cpp), so
// the strided loops and the 16-byte-vector / tail splits the GPU takes also run in CI.
// Parameters and contracts: core/token_params.h. Only launch geometry and warp primitives (the
// shuffle that sums row_dots' partials) stay GPU-only.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../../core/dtype.h"
#include "../../core/fp8.h"
#include "../../core/hd.h"
#include "../../core/row_format.h"
#include "../../core/token_params.h"

namespace moe_comm {
namespace bodies {

// The lanes sharing one row: a block's threads on the GPU, emulated lanes on the CPU.
struct Lanes {
  int64_t id;
  int64_t count;
};

// 16 bytes moved by one vector load or store (ld.global.v4 on the GPU).
struct alignas(16) Vec16 {
  uint32_t word[4];
};

// 16-byte loads and stores, and element j of a vector. Device: plain vector accesses. Host:
// through memcpy, which the compiler turns into the same moves but which, unlike a cast, keeps
// the accesses within C++'s aliasing rules (a float read out of a Vec16 object is otherwise
// undefined, and GCC does miscompile it).
MOE_HD Vec16 load16(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Vec16*>(p);
#else
  Vec16 v;
  std::memcpy(&v, p, 16);
  return v;
#endif
}

MOE_HD void store16(uint8_t* p, const Vec16& v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Vec16*>(p) = v;
#else
  std::memcpy(p, &v, 16);
#endif
}

template <typename T>
MOE_HD T get_elem(const Vec16& v, int j) {
#if defined(__CUDA_ARCH__)
  return reinterpret_cast<const T*>(&v)[j];
#else
  T e;
  std::memcpy(&e, reinterpret_cast<const unsigned char*>(&v) + j * sizeof(T), sizeof(T));
  return e;
#endif
}

template <typename T>
MOE_HD void set_elem(Vec16& v, int j, T e) {
#if defined(__CUDA_ARCH__)
  reinterpret_cast<T*>(&v)[j] = e;
#else
  std::memcpy(reinterpret_cast<unsigned char*>(&v) + j * sizeof(T), &e, sizeof(T));
#endif
}

// A float32 at a 4-byte aligned byte address.
MOE_HD void store_f32(uint8_t* p, float v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<float*>(p) = v;
#else
  std::memcpy(p, &v, sizeof(float));
#endif
}

MOE_HD bool aligned16(const void* a, const void* b) {
  return ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b)) & 15) == 0;
}

// A 4- or 8-byte word at an address aligned for it: plain on the device, memcpy on the host
// (aliasing rules, as load16).
template <typename T>
MOE_HD T load_word(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const T*>(p);
#else
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
#endif
}

template <typename T>
MOE_HD void store_word(uint8_t* p, T v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<T*>(p) = v;
#else
  std::memcpy(p, &v, sizeof(T));
#endif
}

// The whole words of T in [0, bytes), lane-strided. -> bytes copied.
template <typename T>
MOE_HD int64_t copy_words(uint8_t* dst, const uint8_t* src, int64_t bytes, Lanes l) {
  const int64_t words = bytes / int64_t(sizeof(T));
  for (int64_t w = l.id; w < words; w += l.count) {
    store_word<T>(dst + w * int64_t(sizeof(T)), load_word<T>(src + w * int64_t(sizeof(T))));
  }
  return words * int64_t(sizeof(T));
}

// dst[0, bytes) = src[0, bytes) in the widest words both ends are aligned for: 16-byte vectors,
// four loads in flight per lane before their stores (memory-level parallelism, CUDA review
// K2); else 8- or 4-byte words (a row of odd width or offset, K3); then bytes for the tail.
MOE_HD void copy_bytes(uint8_t* dst, const uint8_t* src, int64_t bytes, Lanes l) {
  const uintptr_t both = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src);
  int64_t done = 0;
  if ((both & 15) == 0) {
    const int64_t vectors = bytes / 16, c = l.count;
    int64_t v = l.id;
    for (; v + 3 * c < vectors; v += 4 * c) {
      const Vec16 a = load16(src + 16 * v), b = load16(src + 16 * (v + c));
      const Vec16 e = load16(src + 16 * (v + 2 * c)), f = load16(src + 16 * (v + 3 * c));
      store16(dst + 16 * v, a);
      store16(dst + 16 * (v + c), b);
      store16(dst + 16 * (v + 2 * c), e);
      store16(dst + 16 * (v + 3 * c), f);
    }
    for (; v < vectors; v += c) store16(dst + 16 * v, load16(src + 16 * v));
    done = vectors * 16;
  } else if ((both & 7) == 0) {
    done = copy_words<uint64_t>(dst, src, bytes, l);
  } else if ((both & 3) == 0) {
    done = copy_words<uint32_t>(dst, src, bytes, l);
  }
  for (int64_t b = done + l.id; b < bytes; b += l.count) dst[b] = src[b];
}

// The send segment holding slot j: send_offsets[r] <= j < send_offsets[r + 1].
MOE_HD int64_t rank_of_slot(const int64_t* send_offsets, int64_t num_ranks, int64_t j) {
  int64_t lo = 0, hi = num_ranks;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (send_offsets[mid] <= j) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Send slot j (bound for rank `dest`): payload (FP8 rows: and scales), zeroed padding, and the
// SlotMeta block. A static mode's unused slot (token -1) goes as zeros naming no expert. A
// quantizing pack leaves a used slot's payload and scales to the lane groups of fp8_amax_part /
// fp8_store_part.
MOE_HD void pack_row(const PackParams& p, int64_t j, int64_t dest, Lanes l) {
  const RowFormat& f = p.fmt;
  const int64_t t = p.send_token[j];
  uint8_t* out = p.dst + j * f.row_bytes;
  if (t >= 0 && !p.quantize) {
    copy_bytes(out, p.src + t * p.src_stride, f.payload_bytes, l);
    if (f.fp8()) copy_bytes(out + f.scale_offset, p.scales + t * p.scales_stride, f.scale_bytes, l);
  }
  // Zero the rest (the payload too for an unused slot) but what the lanes write: no
  // uninitialised bytes on the wire, and no two lanes writing one byte.
  const int64_t meta_end = f.meta_offset + (p.topk_idx ? f.meta_bytes : 0);
  const int64_t scale_end = t >= 0 ? f.scale_offset + f.scale_bytes : 0;
  for (int64_t b = (t >= 0 ? f.payload_bytes : 0) + l.id; b < f.row_bytes; b += l.count) {
    const bool written = (b >= f.meta_offset && b < meta_end) || (b >= f.scale_offset && b < scale_end);
    if (!written) out[b] = 0;
  }
  if (!p.topk_idx) return;
  const int64_t first = dest * p.experts_per_rank;
  SlotMeta* meta = reinterpret_cast<SlotMeta*>(out + f.meta_offset);
  for (int64_t k = l.id; k < p.topk; k += l.count) {
    SlotMeta m{-1, 0.0f};
    if (t >= 0) {
      const int64_t e = p.topk_idx[t * p.topk + k];
      m.local_expert = (e >= first && e < first + p.experts_per_rank) ? int32_t(e - first) : -1;
      m.weight = p.topk_weights ? p.topk_weights[t * p.topk + k] : 1.0f;
    }
    meta[k] = m;
  }
}

// A quantizing pack (API.md "FP8 on the wire"): each 128-element block of a slot's row is
// quantized by a group of lanes (on the GPU a warp of 32, which shares the block's amax by
// shuffles; on the CPU one lane), lane g of `group` taking elements
// [128 b + g 128 / group, 128 b + (g + 1) 128 / group). The amax is a max and the cast is
// per element, so how the block is split does not change a bit.
constexpr int kFp8WarpLanes = 32;

// Lane g's part of block b's amax in send slot j: max |x| over its elements (0: unused slot;
// NaN when one is NaN, as torch's amax).
template <typename E>
MOE_HD float fp8_amax_part(const PackParams& p, int64_t j, int64_t b, int g, int group) {
  const int64_t t = p.send_token[j];
  if (t < 0) return 0.0f;
  const auto* x = reinterpret_cast<const typename E::Storage*>(p.src + t * p.src_stride);
  const int64_t per_lane = kFp8Block / group, first = b * kFp8Block + g * per_lane;
  const int64_t end = first + per_lane < p.fmt.payload_bytes ? first + per_lane : p.fmt.payload_bytes;
  float amax = 0.0f;
  bool nan = false;
  for (int64_t h = first; h < end; ++h) {  // a plain max in the loop (it vectorizes), NaN aside
    const float a = fabsf(E::load(x[h]));
    amax = a > amax ? a : amax;
    nan = nan || a != a;
  }
  return nan ? bits_float(0x7fc00000u) : amax;
}

// Lane g's elements of block b as e4m3, with the block's amax; lane 0 also stores its scale.
template <typename E>
MOE_HD void fp8_store_part(const PackParams& p, int64_t j, int64_t b, int g, int group, float amax) {
  const int64_t t = p.send_token[j];
  if (t < 0) return;
  const auto* x = reinterpret_cast<const typename E::Storage*>(p.src + t * p.src_stride);
  uint8_t* out = p.dst + j * p.fmt.row_bytes;
  const int64_t per_lane = kFp8Block / group, first = b * kFp8Block + g * per_lane;
  const int64_t end = first + per_lane < p.fmt.payload_bytes ? first + per_lane : p.fmt.payload_bytes;
  const float ratio = fp8_ratio(amax);
  for (int64_t h = first; h < end; ++h) out[h] = float_to_e4m3(E::load(x[h]) * ratio);
  if (g == 0) store_f32(out + p.fmt.scale_offset + b * int64_t(sizeof(float)), fp8_scale(amax));
}

// out[0, n) = w * in[0, n) in element type E, rounded once: V elements per 16-byte vector
// when both rows are aligned, then element by element (the same value either way).
template <typename E>
MOE_HD void scale_elements(uint8_t* out, const uint8_t* in, int64_t n, float w, Lanes l) {
  using T = typename E::Storage;
  constexpr int V = 16 / sizeof(T);
  int64_t done = 0;
  if (aligned16(out, in)) {
    const int64_t vectors = n / V;
    for (int64_t v = l.id; v < vectors; v += l.count) {
      Vec16 raw = load16(in + 16 * v);
      MOE_UNROLL
      for (int j = 0; j < V; ++j) set_elem<T>(raw, j, E::store(w * E::load(get_elem<T>(raw, j))));
      store16(out + 16 * v, raw);
    }
    done = vectors * V;
  }
  const T* s = reinterpret_cast<const T*>(in);
  T* d = reinterpret_cast<T*>(out);
  for (int64_t h = done + l.id; h < n; h += l.count) d[h] = E::store(w * E::load(s[h]));
}

// FP8 row i (e4m3 bytes, then its scales at p.fp8_scale_offset) into every expert row it
// feeds: as it is, with its scales (pre-quantized input), or dequantized, q.float() * scale in
// E. A row feeding several local experts is dequantized once, into the first; the others copy
// that, each lane the elements it wrote itself (so on the GPU no lane reads another's writes).
template <typename E>
MOE_HD void fp8_expand_row(const ScatterParams& p, int64_t i, Lanes l) {
  using T = typename E::Storage;
  const uint8_t* in = p.src + i * p.src_stride;
  const uint8_t* scales = in + p.fp8_scale_offset;
  const T* first = nullptr;
  for (int64_t k = 0; k < p.topk; ++k) {
    const int64_t row = p.row_map[i * p.topk + k];
    if (row < 0) continue;
    if (p.scales_dst) {
      copy_bytes(p.dst + row * p.dst_stride, in, p.hidden, l);
      copy_bytes(p.scales_dst + row * p.scales_dst_stride, scales,
                 fp8_scale_count(p.hidden) * int64_t(sizeof(float)), l);
      continue;
    }
    T* out = reinterpret_cast<T*>(p.dst + row * p.dst_stride);
    if (first) {
      for (int64_t h = l.id; h < p.hidden; h += l.count) out[h] = first[h];
      continue;
    }
    for (int64_t h = l.id; h < p.hidden; h += l.count) {
      out[h] = E::store(e4m3_to_float(in[h]) * load_word<float>(scales + (h / kFp8Block) * int64_t(sizeof(float))));
    }
    first = out;
  }
}

// Source row i into every expert row it feeds: dst[row_map[i, k]] = weight[i, k] * src[i].
template <typename E>
MOE_HD void scatter_row(const ScatterParams& p, int64_t i, Lanes l) {
  if (p.fp8_scale_offset >= 0) {
    fp8_expand_row<E>(p, i, l);
    return;
  }
  const uint8_t* in = p.src + i * p.src_stride;
  for (int64_t k = 0; k < p.topk; ++k) {
    const int64_t row = p.row_map[i * p.topk + k];
    if (row < 0) continue;
    uint8_t* out = p.dst + row * p.dst_stride;
    if (!p.weights) {
      copy_bytes(out, in, p.hidden * int64_t(sizeof(typename E::Storage)), l);
    } else {
      scale_elements<E>(out, in, p.hidden, p.weights[i * p.topk + k], l);
    }
  }
}

// Whether output row i (and every source row) is 16-byte aligned, and V source elements fill
// whole 16-byte stores of D: then reduce_row takes vectors for all but the tail.
template <typename S, typename D>
MOE_HD bool reduce_vectorizable(const ReduceParams& p) {
  constexpr int V = 16 / sizeof(typename S::Storage);
  if ((V * sizeof(typename D::Storage)) % 16 != 0) return false;  // float32 -> 16-bit
  return aligned16(p.src, p.dst) && ((p.src_stride | p.dst_stride) & 15) == 0;
}

// dst[i] = sum over valid k (in order) of w[i, k] * src[map[i, k]], accumulated in float32.
// The vector and element paths add the same terms in the same order: identical results.
template <typename S, typename D>
MOE_HD void reduce_row(const ReduceParams& p, int64_t i, bool vectorized, Lanes l) {
  using TS = typename S::Storage;
  using TD = typename D::Storage;
  constexpr int V = 16 / sizeof(TS);
  const int64_t* map = p.map + i * p.topk;
  const float* weights = p.weights ? p.weights + i * p.topk : nullptr;
  uint8_t* out = p.dst + i * p.dst_stride;
  int64_t done = 0;
  // Vectors only where V results of D fill whole 16-byte stores (not float32 -> 16-bit, for
  // which reduce_vectorizable is false).
  if constexpr ((V * sizeof(TD)) % 16 == 0) {
    constexpr int kStores = V * sizeof(TD) / 16;
    constexpr int kPerStore = 16 / sizeof(TD);
    const int64_t vectors = vectorized ? p.hidden / V : 0;
    for (int64_t v = l.id; v < vectors; v += l.count) {
      float acc[V];
      MOE_UNROLL
      for (int j = 0; j < V; ++j) acc[j] = 0.0f;
      for (int64_t k = 0; k < p.topk; ++k) {
        const int64_t row = map[k];
        if (row < 0) continue;
        const float w = weights ? weights[k] : 1.0f;
        const Vec16 raw = load16(p.src + row * p.src_stride + 16 * v);
        MOE_UNROLL
        for (int j = 0; j < V; ++j) acc[j] += w * S::load(get_elem<TS>(raw, j));
      }
      MOE_UNROLL
      for (int s = 0; s < kStores; ++s) {
        Vec16 packed;
        MOE_UNROLL
        for (int j = 0; j < kPerStore; ++j) set_elem<TD>(packed, j, D::store(acc[s * kPerStore + j]));
        store16(out + 16 * (v * kStores + s), packed);
      }
    }
    done = vectors * V;
  }
  TD* o = reinterpret_cast<TD*>(out);
  for (int64_t h = done + l.id; h < p.hidden; h += l.count) {
    float acc = 0.0f;
    for (int64_t k = 0; k < p.topk; ++k) {
      const int64_t row = map[k];
      if (row < 0) continue;
      const float w = weights ? weights[k] : 1.0f;
      acc += w * S::load(reinterpret_cast<const TS*>(p.src + row * p.src_stride)[h]);
    }
    o[h] = D::store(acc);
  }
  if (p.scalars) {
    for (int64_t k = l.id; k < p.topk; k += l.count) {
      store_f32(out + p.scalars_offset + k * int64_t(sizeof(float)), p.scalars[i * p.topk + k]);
    }
  }
}

// This lane's part of dot(a[i], b[map[pair]]), pair = i * topk + k: the elements h = lane,
// lane + count, ... in order. 0 where map < 0. The lanes' parts are then summed as a tree
// (sum_lane_parts), as a warp's shuffle does.
template <typename A, typename B>
MOE_HD float dot_part(const DotParams& p, int64_t pair, Lanes l) {
  const int64_t row = p.map[pair];
  if (row < 0) return 0.0f;
  const int64_t i = pair / p.topk;
  const auto* a = reinterpret_cast<const typename A::Storage*>(p.a + i * p.a_stride);
  const auto* b = reinterpret_cast<const typename B::Storage*>(p.b + row * p.b_stride);
  float dot = 0.0f;
  for (int64_t h = l.id; h < p.hidden; h += l.count) dot += A::load(a[h]) * B::load(b[h]);
  return dot;
}

// Sums lane parts the way __shfl_down_sync halves a warp: parts[n] += parts[n + offset] for
// offset = count/2, count/4, ..., 1 (count a power of two). -> parts[0].
MOE_HD float sum_lane_parts(float* parts, int64_t count) {
  for (int64_t offset = count / 2; offset > 0; offset /= 2) {
    for (int64_t n = 0; n < offset; ++n) parts[n] += parts[n + offset];
  }
  return parts[0];
}

// Calls fn(Elem<T>{}) for the element type of a DType code (on the host: it picks a kernel).
template <typename Fn>
inline bool with_elem(DType t, Fn&& fn) {
  switch (t) {
    case DType::kFloat32: fn(Elem<DType::kFloat32>{}); return true;
    case DType::kBFloat16: fn(Elem<DType::kBFloat16>{}); return true;
    case DType::kFloat16: fn(Elem<DType::kFloat16>{}); return true;
  }
  return false;
}

}  // namespace bodies
}  // namespace moe_comm
