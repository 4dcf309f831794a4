#include "token_ops.h"

#include <atomic>
#include <cstring>
#include <vector>

#include "../core/error.h"
#include "../kernels/bodies/token_rows.h"

namespace moe_comm {
namespace cpu {
namespace {

template <typename Fn>
void with_dtype(DType t, Fn&& fn) {
  MOE_HOST_ASSERT(bodies::with_elem(t, fn), "unknown dtype code " << static_cast<int>(t));
}

std::atomic<int64_t> g_lanes{1};

// Runs body(Lanes) for every emulated lane of one row, in lane order.
template <typename Body>
void each_lane(Body&& body) {
  const int64_t count = g_lanes.load(std::memory_order_relaxed);
  for (int64_t lane = 0; lane < count; ++lane) body(bodies::Lanes{lane, count});
}

}  // namespace

void set_emulated_lanes(int64_t lanes) {
  MOE_HOST_ASSERT(lanes >= 1 && lanes <= 1024, "lanes must be in [1, 1024], got " << lanes);
  g_lanes = lanes;
}

int64_t emulated_lanes() { return g_lanes.load(); }

void pack_rows(const PackParams& p) {
  MOE_HOST_ASSERT(!p.topk_idx || p.fmt.meta_bytes == p.topk * int64_t(sizeof(SlotMeta)),
                  "metadata block of " << p.fmt.meta_bytes << " bytes for topk " << p.topk);
  for (int64_t rank = 0; rank < p.num_ranks; ++rank) {
    for (int64_t j = p.send_offsets[rank]; j < p.send_offsets[rank + 1]; ++j) {
      each_lane([&](bodies::Lanes l) { bodies::pack_row(p, j, rank, l); });
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
  with_dtype(p.dtype, [&](auto elem) {
    using E = decltype(elem);
    for (int64_t i = 0; i < p.num_src; ++i) {
      each_lane([&](bodies::Lanes l) { bodies::scatter_row<E>(p, i, l); });
    }
  });
}

void reduce_rows(const ReduceParams& p) {
  with_dtype(p.src_dtype, [&](auto src_elem) {
    using S = decltype(src_elem);
    with_dtype(p.dst_dtype, [&](auto dst_elem) {
      using D = decltype(dst_elem);
      const bool vectorized = bodies::reduce_vectorizable<S, D>(p);
      for (int64_t i = 0; i < p.num_out; ++i) {
        each_lane([&](bodies::Lanes l) { bodies::reduce_row<S, D>(p, i, vectorized, l); });
      }
    });
  });
}

void row_dots(const DotParams& p) {
  // The shuffle tree needs a power of two: the largest one within the emulated lanes.
  int64_t lanes = 1;
  while (lanes * 2 <= g_lanes.load()) lanes *= 2;
  std::vector<float> parts(lanes);
  with_dtype(p.a_dtype, [&](auto a_elem) {
    using A = decltype(a_elem);
    with_dtype(p.b_dtype, [&](auto b_elem) {
      using B = decltype(b_elem);
      for (int64_t pair = 0; pair < p.num_rows * p.topk; ++pair) {
        for (int64_t lane = 0; lane < lanes; ++lane) {
          parts[lane] = bodies::dot_part<A, B>(p, pair, bodies::Lanes{lane, lanes});
        }
        p.out[pair] = bodies::sum_lane_parts(parts.data(), lanes);
      }
    });
  });
}

}  // namespace cpu
}  // namespace moe_comm
