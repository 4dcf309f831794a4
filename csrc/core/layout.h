// Dispatch layout on the sending rank: which ranks each token goes to (once per rank, however
// many of that rank's experts it picked), and where it sits in the rank-major send buffer.
// Host-only math, shared by the CPU path and checked against the CUDA layout kernel.
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

// Indices out of [0, num_experts) count as masked in both passes, so that a plan made before
// the routing's status is known never indexes out of bounds (a bad routing sends nothing).
// Pass 1. tokens_per_rank[W]: distinct tokens sent to each rank. pairs_per_expert[E] (may be
// null): valid (token, expert) pairs per global expert.
void count_layout(const Routing& routing, int64_t* tokens_per_rank, int64_t* pairs_per_expert);

// Pass 2, given send_offsets[W + 1] (exclusive prefix of tokens_per_rank). The send buffer is
// rank-major, ascending token index inside a rank.
//   send_token[n_send]: source token of each send slot.
//   pair_slot[T * K]:   send slot of (token, slot k); -1 for a masked slot.
//   first_slot[T * K]:  like pair_slot, but only on the first slot of each destination rank
//                       (the combine sums each returned partial exactly once).
void fill_send_plan(const Routing& routing, const int64_t* send_offsets, int64_t* send_token,
                    int64_t* pair_slot, int64_t* first_slot);

}  // namespace moe_comm
