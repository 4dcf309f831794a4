// Node-limited (group-limited) top-k selection, DeepSeek-V3 style: each token keeps its best
// `max_nodes` nodes, ranked by the sum of their best `node_score_topk` experts' scores, then its
// top-k experts among those nodes. Ties go to the lower index, so the result is deterministic.
#pragma once

#include <cstdint>

namespace moe_comm {

struct NodeLimitedParams {
  const float* scores = nullptr;  // [num_tokens, num_experts] selection scores (bias included)
  int64_t num_tokens = 0;
  int64_t num_experts = 0;
  int64_t num_nodes = 0;          // experts [n * E / N, (n + 1) * E / N) live on node n
  int64_t max_nodes = 0;
  int64_t node_score_topk = 0;    // experts summed into a node's score
  int64_t topk = 0;
  int64_t* topk_idx = nullptr;    // [num_tokens, topk] out, by descending score
};

// Throws naming the parameter a selection cannot honour (shared with the CUDA launcher).
void check_node_limited(const NodeLimitedParams& p);

void node_limited_select(const NodeLimitedParams& p);

}  // namespace moe_comm
