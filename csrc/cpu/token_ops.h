// CPU kernels for the token work of dispatch and combine. Torch-free: raw pointers, byte
// strides and element types; parameters and contracts in core/token_params.h, shared with the
// CUDA kernels in csrc/kernels. Row wire format: core/row_format.h.
#pragma once

#include <cstdint>

#include "../core/row_format.h"
#include "../core/token_params.h"

namespace moe_comm {
namespace cpu {

// Receiver side of dispatch: read the SlotMeta of every received row.
struct ExpandPlanParams {
  const uint8_t* rows = nullptr;  // [num_rows, fmt.row_bytes]
  int64_t num_rows = 0;
  RowFormat fmt;
  int64_t topk = 0;
  int64_t experts_per_rank = 0;
  // The order in which rows enter each expert's segment (a permutation of [0, num_rows));
  // null = arrival order. Hierarchical forwarding delivers rows grouped by forwarding rank,
  // while the API orders them by source rank.
  const int64_t* row_order = nullptr;
};
// tokens_per_expert[experts_per_rank]; throws if a local expert id is out of range.
void count_recv_experts(const ExpandPlanParams& p, int64_t* tokens_per_expert);
// expert_offsets[experts_per_rank + 1]. row_map[num_rows * topk]: expert-major output row of
// (received row, slot), -1 when masked. slot_weights[num_rows * topk]: the router weight per
// slot (0 when masked). recv_weights[R]: the weight of each output row.
void fill_expand_plan(const ExpandPlanParams& p, const int64_t* expert_offsets, int64_t* row_map,
                      float* slot_weights, float* recv_weights);

// The token kernels below run the single-source bodies (csrc/kernels/bodies) once per emulated
// lane for each row, as a GPU block's threads do. 1 (the default) is the fast path; tests set
// several (C.set_cpu_lanes) so that CI runs the lane-strided loops and vector/tail splits the
// GPU takes.
void set_emulated_lanes(int64_t lanes);
int64_t emulated_lanes();

void pack_rows(const PackParams& p);
void scatter_rows(const ScatterParams& p);
void reduce_rows(const ReduceParams& p);
void row_dots(const DotParams& p);

}  // namespace cpu
}  // namespace moe_comm
