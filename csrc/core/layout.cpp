#include "layout.h"

namespace moe_comm {

RoutingProblem find_routing_problem(const Routing& r) {
  RoutingProblem p;
  for (int64_t t = 0; t < r.num_tokens; ++t) {
    const int64_t* row = r.topk_idx + t * r.topk;
    for (int64_t k = 0; k < r.topk; ++k) {
      const int64_t e = row[k];
      if (e < -1 || e >= r.num_experts) return {RoutingProblem::kOutOfRange, t, k, e};
      if (e < 0) continue;
      for (int64_t j = 0; j < k; ++j) {
        if (row[j] == e) return {RoutingProblem::kDuplicate, t, k, e};
      }
    }
  }
  return p;
}

}  // namespace moe_comm
