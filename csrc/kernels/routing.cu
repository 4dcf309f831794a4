// Device node-limited top-k (twin of core/routing.cpp, same total order: higher score first,
// lower index on ties; node scores summed in double in descending order, as on the CPU).
// One thread per token. Instead of sorting, each pick is "the best item after the previous
// pick" in that total order, so a thread needs no per-expert scratch.
#include "../core/routing.h"
#include "launchers.h"

namespace moe_comm {
namespace cuda {
namespace {

constexpr int kThreads = 128;

// a comes before b: higher score, or equal score and lower index.
template <typename S>
__device__ __forceinline__ bool before(S sa, int64_t a, S sb, int64_t b) {
  return sa > sb || (sa == sb && a < b);
}

__global__ void node_limited_kernel(NodeLimitedParams p) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= p.num_tokens) return;
  const float* s = p.scores + t * p.num_experts;
  const int64_t per_node = p.num_experts / p.num_nodes;
  double node_score[kMaxRoutingNodes];
  for (int64_t n = 0; n < p.num_nodes; ++n) {
    double sum = 0.0;
    int64_t prev = -1;
    for (int64_t j = 0; j < p.node_score_topk; ++j) {
      int64_t best = -1;
      for (int64_t e = n * per_node; e < (n + 1) * per_node; ++e) {
        if (prev >= 0 && !before(s[prev], prev, s[e], e)) continue;  // taken already
        if (best < 0 || before(s[e], e, s[best], best)) best = e;
      }
      sum += s[best];
      prev = best;
    }
    node_score[n] = sum;
  }
  // The max_nodes-th best node: node n is kept iff it is not after it.
  int64_t last = -1;
  for (int64_t j = 0; j < p.max_nodes; ++j) {
    int64_t best = -1;
    for (int64_t n = 0; n < p.num_nodes; ++n) {
      if (last >= 0 && !before(node_score[last], last, node_score[n], n)) continue;
      if (best < 0 || before(node_score[n], n, node_score[best], best)) best = n;
    }
    last = best;
  }
  int64_t prev = -1;
  for (int64_t k = 0; k < p.topk; ++k) {
    int64_t best = -1;
    for (int64_t e = 0; e < p.num_experts; ++e) {
      const int64_t n = e / per_node;
      if (n != last && !before(node_score[n], n, node_score[last], last)) continue;  // node not kept
      if (prev >= 0 && !before(s[prev], prev, s[e], e)) continue;
      if (best < 0 || before(s[e], e, s[best], best)) best = e;
    }
    p.topk_idx[t * p.topk + k] = best;
    prev = best;
  }
}

}  // namespace

cudaError_t launch_node_limited_select(const NodeLimitedParams& p, cudaStream_t stream) {
  if (p.num_nodes > kMaxRoutingNodes) return cudaErrorInvalidValue;
  if (p.num_tokens == 0) return cudaSuccess;
  const int64_t blocks = (p.num_tokens + kThreads - 1) / kThreads;
  node_limited_kernel<<<blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moe_comm
