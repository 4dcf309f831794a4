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

}  // namespace

void set_emulated_lanes(int64_t lanes) {
  MOE_HOST_ASSERT(lanes >= 1 && lanes <= 1024, "lanes must be in [1, 1024], got " << lanes);
  g_lanes = lanes;
}

int64_t emulated_lanes() { return g_lanes.load(std::memory_order_relaxed); }

void pack_rows(const PackParams& p) {
  MOE_HOST_ASSERT(!p.topk_idx || p.fmt.meta_bytes == p.topk * int64_t(sizeof(SlotMeta)),
                  "metadata block of " << p.fmt.meta_bytes << " bytes for topk " << p.topk);
  MOE_HOST_ASSERT(!p.quantize || p.fmt.fp8(), "a quantizing pack needs FP8 rows");
  for (int64_t rank = 0; rank < p.num_ranks; ++rank) {
    for (int64_t j = p.send_offsets[rank]; j < p.send_offsets[rank + 1]; ++j) {
      each_lane([&](bodies::Lanes l) { bodies::pack_row(p, j, rank, l); });
    }
  }
  if (!p.quantize) return;
  // The GPU's warp per block, as one lane per block (the same bits: see fp8_amax_part); with
  // emulated lanes, as many lanes as the GPU's warp, their parts met as its shuffles meet them.
  const int group = emulated_lanes() > 1 ? bodies::kFp8WarpLanes : 1;
  with_dtype(p.quantize_from, [&](auto elem) {
    using E = decltype(elem);
    const int64_t blocks = fp8_scale_count(p.fmt.payload_bytes);
    for (int64_t j = 0; j < p.num_rows; ++j) {
      for (int64_t b = 0; b < blocks; ++b) {
        float amax = 0.0f;
        for (int g = 0; g < group; ++g) amax = nan_max(amax, bodies::fp8_amax_part<E>(p, j, b, g, group));
        for (int g = 0; g < group; ++g) bodies::fp8_store_part<E>(p, j, b, g, group, amax);
      }
    }
  });
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
