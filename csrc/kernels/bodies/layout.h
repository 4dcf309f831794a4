// The routing rules of one token row, written once for the send plans (core/layout.cpp on the
// CPU, layout.cu / send_plan.cu on the GPU): which slots name an expert, and whether the row
// breaks a rule (an index outside [-1, E), or an expert twice). A plan made before the status
// is known treats an out-of-range index as masked, so nothing ever indexes out of bounds.
#pragma once

#include <cstdint>

#include "../../core/hd.h"

namespace moe_comm {
namespace bodies {

MOE_HD bool valid_expert(int64_t e, int64_t num_experts) { return e >= 0 && e < num_experts; }

MOE_HD bool routing_row_bad(const int64_t* row, int64_t topk, int64_t num_experts) {
  for (int64_t k = 0; k < topk; ++k) {
    const int64_t e = row[k];
    if (e < -1 || e >= num_experts) return true;
    if (e < 0) continue;
    for (int64_t j = 0; j < k; ++j) {
      if (row[j] == e) return true;
    }
  }
  return false;
}

// Slot k is the first of row's slots bound for its destination (experts_per_dest experts each).
MOE_HD bool first_to_dest(const int64_t* row, int64_t k, int64_t num_experts, int64_t experts_per_dest) {
  const int64_t dest = row[k] / experts_per_dest;
  for (int64_t j = 0; j < k; ++j) {
    if (valid_expert(row[j], num_experts) && row[j] / experts_per_dest == dest) return false;
  }
  return true;
}

}  // namespace bodies
}  // namespace moe_comm
