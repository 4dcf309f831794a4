// CPU kernels for the token work of dispatch and combine. Torch-free: raw pointers, byte
// strides and element types; parameters and contracts in core/token_params.h, shared with the
// CUDA kernels in csrc/kernels. Row wire format: core/row_format.h.
#pragma once

#include <cstdint>

#include "../core/row_format.h"
#include "../core/token_params.h"
#include "../kernels/bodies/token_rows.h"

namespace moe_comm {
namespace cpu {

// The token kernels below run the single-source bodies (csrc/kernels/bodies) once per emulated
// lane for each row, as a GPU block's threads do. 1 (the default) is the fast path; tests set
// several (C.set_cpu_lanes) so that CI runs the lane-strided loops and vector/tail splits the
// GPU takes.
void set_emulated_lanes(int64_t lanes);
int64_t emulated_lanes();

// Runs body(Lanes) for every emulated lane of one row, in lane order.
template <typename Body>
void each_lane(Body&& body) {
  const int64_t count = emulated_lanes();
  for (int64_t lane = 0; lane < count; ++lane) body(bodies::Lanes{lane, count});
}

void pack_rows(const PackParams& p);
void scatter_rows(const ScatterParams& p);
void reduce_rows(const ReduceParams& p);
void row_dots(const DotParams& p);

}  // namespace cpu
}  // namespace moe_comm
