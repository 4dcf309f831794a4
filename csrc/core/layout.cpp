#include "layout.h"

#include <vector>

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

void count_layout(const Routing& r, int64_t* tokens_per_rank, int64_t* pairs_per_expert) {
  const int64_t per_rank = r.experts_per_rank();
  for (int64_t i = 0; i < r.num_ranks; ++i) tokens_per_rank[i] = 0;
  if (pairs_per_expert) {
    for (int64_t i = 0; i < r.num_experts; ++i) pairs_per_expert[i] = 0;
  }
  // seen_by[rank] == t marks that token t already counts for rank: one copy per rank.
  std::vector<int64_t> seen_by(r.num_ranks, -1);
  for (int64_t t = 0; t < r.num_tokens; ++t) {
    const int64_t* row = r.topk_idx + t * r.topk;
    for (int64_t k = 0; k < r.topk; ++k) {
      const int64_t e = row[k];
      if (e < 0 || e >= r.num_experts) continue;  // masked (or out of range: then nothing is sent)
      if (pairs_per_expert) ++pairs_per_expert[e];
      const int64_t rank = e / per_rank;
      if (seen_by[rank] != t) {
        seen_by[rank] = t;
        ++tokens_per_rank[rank];
      }
    }
  }
}

void fill_send_plan(const Routing& r, const int64_t* send_offsets, int64_t* send_token,
                    int64_t* pair_slot, int64_t* first_slot) {
  const int64_t per_rank = r.experts_per_rank();
  std::vector<int64_t> cursor(send_offsets, send_offsets + r.num_ranks);
  std::vector<int64_t> seen_by(r.num_ranks, -1);
  std::vector<int64_t> slot_of_rank(r.num_ranks, -1);
  for (int64_t t = 0; t < r.num_tokens; ++t) {
    const int64_t* row = r.topk_idx + t * r.topk;
    for (int64_t k = 0; k < r.topk; ++k) {
      const int64_t flat = t * r.topk + k;
      const int64_t e = row[k];
      if (e < 0 || e >= r.num_experts) {
        pair_slot[flat] = -1;
        first_slot[flat] = -1;
        continue;
      }
      const int64_t rank = e / per_rank;
      if (seen_by[rank] != t) {
        seen_by[rank] = t;
        slot_of_rank[rank] = cursor[rank]++;
        send_token[slot_of_rank[rank]] = t;
        first_slot[flat] = slot_of_rank[rank];
      } else {
        first_slot[flat] = -1;
      }
      pair_slot[flat] = slot_of_rank[rank];
    }
  }
}

}  // namespace moe_comm
