#include "routing.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include "error.h"

namespace moe_comm {

void check_node_limited(const NodeLimitedParams& p) {
  MOE_HOST_ASSERT(p.num_nodes > 0 && p.num_experts % p.num_nodes == 0,
                  "num_experts " << p.num_experts << " must be divisible by num_nodes " << p.num_nodes);
  const int64_t per_node = p.num_experts / p.num_nodes;
  MOE_HOST_ASSERT(p.max_nodes >= 1 && p.max_nodes <= p.num_nodes, "max_nodes " << p.max_nodes);
  MOE_HOST_ASSERT(p.node_score_topk >= 1 && p.node_score_topk <= per_node,
                  "node_score_topk " << p.node_score_topk << " of " << per_node << " experts per node");
  MOE_HOST_ASSERT(p.topk >= 1 && p.topk <= p.max_nodes * per_node,
                  "topk " << p.topk << " exceeds the " << p.max_nodes * per_node << " experts of max_nodes nodes");
}

void node_limited_select(const NodeLimitedParams& p) {
  check_node_limited(p);
  const int64_t per_node = p.num_experts / p.num_nodes;

  std::vector<int64_t> experts(p.num_experts), nodes(p.num_nodes), candidates;
  std::vector<double> node_score(p.num_nodes);
  candidates.reserve(p.max_nodes * per_node);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const float* s = p.scores + t * p.num_experts;
    auto by_score = [s](int64_t a, int64_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); };
    for (int64_t n = 0; n < p.num_nodes; ++n) {
      int64_t* first = experts.data() + n * per_node;
      std::iota(first, first + per_node, n * per_node);
      std::partial_sort(first, first + p.node_score_topk, first + per_node, by_score);
      double sum = 0.0;  // double: the same sum whatever the order of the best scores
      for (int64_t j = 0; j < p.node_score_topk; ++j) sum += s[first[j]];
      node_score[n] = sum;
    }
    std::iota(nodes.begin(), nodes.end(), 0);
    std::partial_sort(nodes.begin(), nodes.begin() + p.max_nodes, nodes.end(), [&](int64_t a, int64_t b) {
      return node_score[a] > node_score[b] || (node_score[a] == node_score[b] && a < b);
    });
    candidates.clear();
    for (int64_t j = 0; j < p.max_nodes; ++j) {
      for (int64_t e = nodes[j] * per_node; e < (nodes[j] + 1) * per_node; ++e) candidates.push_back(e);
    }
    std::partial_sort(candidates.begin(), candidates.begin() + p.topk, candidates.end(), by_score);
    std::copy(candidates.begin(), candidates.begin() + p.topk, p.topk_idx + t * p.topk);
  }
}

}  // namespace moe_comm
