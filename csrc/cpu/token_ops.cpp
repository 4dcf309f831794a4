#include "token_ops.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "../core/error.h"

namespace moe_comm {
namespace cpu {
namespace {

template <typename Fn>
void with_dtype(DType t, Fn&& fn) {
  switch (t) {
    case DType::kFloat32: fn(Elem<DType::kFloat32>{}); return;
    case DType::kBFloat16: fn(Elem<DType::kBFloat16>{}); return;
    case DType::kFloat16: fn(Elem<DType::kFloat16>{}); return;
  }
  MOE_HOST_ASSERT(false, "unknown dtype code " << static_cast<int>(t));
}

template <typename E>
const typename E::Storage* row_at(const uint8_t* base, int64_t stride, int64_t i) {
  return reinterpret_cast<const typename E::Storage*>(base + i * stride);
}

template <typename E>
typename E::Storage* row_at(uint8_t* base, int64_t stride, int64_t i) {
  return reinterpret_cast<typename E::Storage*>(base + i * stride);
}

}  // namespace

void pack_rows(const PackParams& p) {
  const RowFormat& f = p.fmt;
  const bool with_meta = p.topk_idx != nullptr;
  MOE_HOST_ASSERT(!with_meta || f.meta_bytes == p.topk * int64_t(sizeof(SlotMeta)),
                  "metadata block of " << f.meta_bytes << " bytes for topk " << p.topk);
  for (int64_t rank = 0; rank < p.num_ranks; ++rank) {
    for (int64_t j = p.send_offsets[rank]; j < p.send_offsets[rank + 1]; ++j) {
      const int64_t t = p.send_token[j];
      uint8_t* out = p.dst + j * f.row_bytes;
      if (f.payload_bytes) std::memcpy(out, p.src + t * p.src_stride, f.payload_bytes);
      // Zero the padding so the wire carries no uninitialised bytes.
      std::memset(out + f.payload_bytes, 0, f.meta_offset - f.payload_bytes);
      std::memset(out + f.meta_end(), 0, f.row_bytes - f.meta_end());
      if (!with_meta) {
        std::memset(out + f.meta_offset, 0, f.meta_bytes);
        continue;
      }
      const int64_t lo = rank * p.experts_per_rank;
      for (int64_t k = 0; k < p.topk; ++k) {
        const int64_t e = p.topk_idx[t * p.topk + k];
        SlotMeta m;
        m.local_expert = (e >= lo && e < lo + p.experts_per_rank) ? int32_t(e - lo) : -1;
        m.weight = p.topk_weights ? p.topk_weights[t * p.topk + k] : 1.0f;
        std::memcpy(out + f.meta_offset + k * sizeof(SlotMeta), &m, sizeof(SlotMeta));
      }
    }
  }
}

namespace {
SlotMeta read_meta(const ExpandPlanParams& p, int64_t i, int64_t k) {
  SlotMeta m;
  std::memcpy(&m, p.rows + i * p.fmt.row_bytes + p.fmt.meta_offset + k * sizeof(SlotMeta),
              sizeof(SlotMeta));
  return m;
}
}  // namespace

void count_recv_experts(const ExpandPlanParams& p, int64_t* tokens_per_expert) {
  for (int64_t e = 0; e < p.experts_per_rank; ++e) tokens_per_expert[e] = 0;
  for (int64_t i = 0; i < p.num_rows; ++i) {
    for (int64_t k = 0; k < p.topk; ++k) {
      const int32_t le = read_meta(p, i, k).local_expert;
      if (le < 0) continue;
      MOE_HOST_ASSERT(le < p.experts_per_rank,
                      "received row " << i << " names local expert " << le << " of "
                                      << p.experts_per_rank);
      ++tokens_per_expert[le];
    }
  }
}

void fill_expand_plan(const ExpandPlanParams& p, const int64_t* expert_offsets, int64_t* row_map,
                      float* slot_weights, float* recv_weights) {
  // Walking rows in (source rank, source token) order and appending to each expert's segment
  // gives the API order inside every expert.
  std::vector<int64_t> cursor(expert_offsets, expert_offsets + p.experts_per_rank);
  for (int64_t n = 0; n < p.num_rows; ++n) {
    const int64_t i = p.row_order ? p.row_order[n] : n;
    for (int64_t k = 0; k < p.topk; ++k) {
      const SlotMeta m = read_meta(p, i, k);
      const int64_t flat = i * p.topk + k;
      if (m.local_expert < 0) {
        row_map[flat] = -1;
        slot_weights[flat] = 0.0f;
        continue;
      }
      const int64_t row = cursor[m.local_expert]++;
      row_map[flat] = row;
      slot_weights[flat] = m.weight;
      recv_weights[row] = m.weight;
    }
  }
}

void scatter_rows(const ScatterParams& p) {
  const int64_t bytes = p.hidden * dtype_size(p.dtype);
  if (!p.weights) {
    for (int64_t i = 0; i < p.num_src; ++i) {
      for (int64_t k = 0; k < p.topk; ++k) {
        const int64_t row = p.row_map[i * p.topk + k];
        if (row >= 0) std::memcpy(p.dst + row * p.dst_stride, p.src + i * p.src_stride, bytes);
      }
    }
    return;
  }
  with_dtype(p.dtype, [&](auto elem) {
    using E = decltype(elem);
    for (int64_t i = 0; i < p.num_src; ++i) {
      const auto* in = row_at<E>(p.src, p.src_stride, i);
      for (int64_t k = 0; k < p.topk; ++k) {
        const int64_t row = p.row_map[i * p.topk + k];
        if (row < 0) continue;
        const float w = p.weights[i * p.topk + k];
        auto* out = row_at<E>(p.dst, p.dst_stride, row);
        for (int64_t h = 0; h < p.hidden; ++h) out[h] = E::store(w * E::load(in[h]));
      }
    }
  });
}

void reduce_rows(const ReduceParams& p) {
  std::vector<float> acc(p.hidden);
  with_dtype(p.src_dtype, [&](auto src_elem) {
    using S = decltype(src_elem);
    with_dtype(p.dst_dtype, [&](auto dst_elem) {
      using D = decltype(dst_elem);
      for (int64_t i = 0; i < p.num_out; ++i) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t k = 0; k < p.topk; ++k) {
          const int64_t src_row = p.map[i * p.topk + k];
          if (src_row < 0) continue;
          const float w = p.weights ? p.weights[i * p.topk + k] : 1.0f;
          const auto* in = row_at<S>(p.src, p.src_stride, src_row);
          for (int64_t h = 0; h < p.hidden; ++h) acc[h] += w * S::load(in[h]);
        }
        auto* out = row_at<D>(p.dst, p.dst_stride, i);
        for (int64_t h = 0; h < p.hidden; ++h) out[h] = D::store(acc[h]);
      }
    });
  });
}

void row_dots(const DotParams& p) {
  with_dtype(p.a_dtype, [&](auto a_elem) {
    using A = decltype(a_elem);
    with_dtype(p.b_dtype, [&](auto b_elem) {
      using B = decltype(b_elem);
      for (int64_t i = 0; i < p.num_rows; ++i) {
        const auto* a = row_at<A>(p.a, p.a_stride, i);
        for (int64_t k = 0; k < p.topk; ++k) {
          const int64_t row = p.map[i * p.topk + k];
          float dot = 0.0f;
          if (row >= 0) {
            const auto* b = row_at<B>(p.b, p.b_stride, row);
            for (int64_t h = 0; h < p.hidden; ++h) dot += A::load(a[h]) * B::load(b[h]);
          }
          p.out[i * p.topk + k] = dot;
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace moe_comm
