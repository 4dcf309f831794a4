// Per-element bodies of the engine's small map passes, written once: a CUDA thread per element
// (csrc/kernels/maps.cu) or a CPU loop (csrc/cpu/cpu_device.cpp). Shapes in core terms: N rows
// arrived at a stage, K top-k slots, n_in rows of a stage's input.
#pragma once

#include <cstdint>
#include <cstring>

#include "../../core/hd.h"
#include "../../core/row_format.h"

namespace moe_comm {
namespace bodies {

// Element (i, k) of arrived dispatch rows' SlotMeta: the next stage's routing.
MOE_HD void read_slot_meta(const uint8_t* rows, int64_t row_bytes, int64_t meta_offset, int64_t topk, int64_t at,
                           int64_t* idx, float* weights) {
  const int64_t i = at / topk, k = at % topk;
  const uint8_t* m = rows + i * row_bytes + meta_offset + k * int64_t(sizeof(SlotMeta));
#if defined(__CUDA_ARCH__)
  const SlotMeta meta = *reinterpret_cast<const SlotMeta*>(m);
#else
  SlotMeta meta;
  std::memcpy(&meta, m, sizeof(SlotMeta));
#endif
  idx[at] = meta.local_expert;
  weights[at] = meta.weight;
}

// A stage with one destination sends input row i to one slot at most (its only first slot):
// element (i, k) of the maps re-indexed by input row, -1 / 0 where row i sent nothing.
MOE_HD void compose_own_slot(const int64_t* first_slot, int64_t topk, const int64_t* map, const float* weights,
                             int64_t at, int64_t* out_map, float* out_weights) {
  const int64_t i = at / topk, k = at % topk;
  int64_t slot = -1;
  for (int64_t j = 0; j < topk; ++j) slot = first_slot[i * topk + j] > slot ? first_slot[i * topk + j] : slot;
  out_map[at] = slot >= 0 ? map[slot * topk + k] : -1;
  if (out_weights) out_weights[at] = slot >= 0 ? weights[slot * topk + k] : 0.0f;
}

// out[i, k] = per_slot[pair_slot[i, k], k] (rows of stride floats), 0 where masked.
MOE_HD void collect_pair(const float* per_slot, int64_t stride, const int64_t* pair_slot, int64_t topk, int64_t at,
                         float* out) {
  const int64_t slot = pair_slot[at];
  out[at] = slot >= 0 ? per_slot[slot * stride + at % topk] : 0.0f;
}

// out[at] = values[index[at]], 0 where index < 0.
MOE_HD void gather_masked(const float* values, const int64_t* index, int64_t at, float* out) {
  out[at] = index[at] >= 0 ? values[index[at]] : 0.0f;
}

// out[i, k] = map[i, k] < 0 ? 0 : rows[i, k] (float32 rows of `stride` bytes).
MOE_HD void mask_by_map(const uint8_t* rows, int64_t stride, const int64_t* map, int64_t topk, int64_t at,
                        float* out) {
  const int64_t i = at / topk, k = at % topk;
  const uint8_t* w = rows + i * stride + k * int64_t(sizeof(float));
#if defined(__CUDA_ARCH__)
  const float value = *reinterpret_cast<const float*>(w);
#else
  float value;
  std::memcpy(&value, w, sizeof(float));
#endif
  out[at] = map[at] < 0 ? 0.0f : value;
}

}  // namespace bodies
}  // namespace moe_comm
