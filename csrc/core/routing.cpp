#include "routing.h"

#include "../kernels/bodies/routing.h"
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
  MOE_HOST_ASSERT(p.num_nodes <= bodies::kMaxRoutingNodes,
                  "num_nodes " << p.num_nodes << " exceeds the " << bodies::kMaxRoutingNodes << " supported");
}

void node_limited_select(const NodeLimitedParams& p) {
  check_node_limited(p);
  for (int64_t t = 0; t < p.num_tokens; ++t) bodies::node_limited_token(p, t);  // as a GPU thread does
}

}  // namespace moe_comm
