// A routing as the plans see it (kernels/bodies/plan.h), and the host's account of the first
// rule it breaks, for the error message (the plans only report that some row broke one).
#pragma once

#include <cstdint>

namespace moe_comm {

struct Routing {
  const int64_t* topk_idx = nullptr;  // [num_tokens, topk], values in [-1, num_experts)
  int64_t num_tokens = 0;
  int64_t topk = 0;
  int64_t num_experts = 0;
  int64_t num_ranks = 0;

  int64_t experts_per_rank() const { return num_experts / num_ranks; }
};

// First rule a routing breaks, or kind == kOk.
struct RoutingProblem {
  enum Kind { kOk = 0, kOutOfRange = 1, kDuplicate = 2 };
  Kind kind = kOk;
  int64_t token = -1;
  int64_t slot = -1;
  int64_t value = 0;
};

RoutingProblem find_routing_problem(const Routing& routing);

}  // namespace moe_comm
