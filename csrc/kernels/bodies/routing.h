// Node-limited top-k for one token, written once: the CUDA kernel runs it with a thread per
// token (csrc/kernels/routing.cu), the CPU loops over tokens (core/routing.cpp). One total
// order everywhere: higher score first, lower index on ties; a node's score is the sum, in
// double and in that order, of its best node_score_topk experts. Each pick is "the best item
// after the previous pick", so a token needs no per-expert or per-node scratch (the kept nodes
// are a 256-bit mask): no local-memory frame on the GPU. Scores that order nothing (NaN) end
// the picks early: the remaining slots get -1 instead of an out-of-bounds read.
#pragma once

#include <cstdint>

#include "../../core/hd.h"
#include "../../core/routing.h"

namespace moe_comm {
namespace bodies {

constexpr int64_t kMaxRoutingNodes = 256;  // the kept-node mask's bits

// a comes before b: higher score, or an equal score and a lower index.
template <typename S>
MOE_HD bool before(S sa, int64_t a, S sb, int64_t b) {
  return sa > sb || (sa == sb && a < b);
}

// The best item of [first, last) after `prev` (-1: none yet) in the total order; -1 if none.
MOE_HD int64_t next_expert(const float* s, int64_t first, int64_t last, int64_t prev) {
  int64_t best = -1;
  for (int64_t e = first; e < last; ++e) {
    if (prev >= 0 && !before(s[prev], prev, s[e], e)) continue;  // taken already
    if (best < 0 || before(s[e], e, s[best], best)) best = e;
  }
  return best;
}

MOE_HD double node_score(const float* s, int64_t node, int64_t per_node, int64_t node_score_topk) {
  double sum = 0.0;
  int64_t prev = -1;
  for (int64_t j = 0; j < node_score_topk; ++j) {
    prev = next_expert(s, node * per_node, (node + 1) * per_node, prev);
    if (prev < 0) break;
    sum += s[prev];
  }
  return sum;
}

MOE_HD void node_limited_token(const NodeLimitedParams& p, int64_t t) {
  const float* s = p.scores + t * p.num_experts;
  const int64_t per_node = p.num_experts / p.num_nodes;
  uint64_t kept[kMaxRoutingNodes / 64] = {0, 0, 0, 0};
  int64_t last = -1;
  double last_score = 0.0;
  for (int64_t j = 0; j < p.max_nodes; ++j) {
    int64_t best = -1;
    double best_score = 0.0;
    for (int64_t n = 0; n < p.num_nodes; ++n) {
      const double score = node_score(s, n, per_node, p.node_score_topk);
      if (last >= 0 && !before(last_score, last, score, n)) continue;
      if (best < 0 || before(score, n, best_score, best)) {
        best = n;
        best_score = score;
      }
    }
    if (best < 0) break;
    kept[best / 64] |= uint64_t{1} << (best % 64);
    last = best;
    last_score = best_score;
  }
  int64_t prev = -1;
  for (int64_t k = 0; k < p.topk; ++k) {
    int64_t best = -1;
    if (k == 0 || prev >= 0) {
      for (int64_t e = 0; e < p.num_experts; ++e) {
        const int64_t n = e / per_node;
        if (!((kept[n / 64] >> (n % 64)) & 1)) continue;
        if (prev >= 0 && !before(s[prev], prev, s[e], e)) continue;
        if (best < 0 || before(s[e], e, s[best], best)) best = e;
      }
    }
    p.topk_idx[t * p.topk + k] = best;
    prev = best;
  }
}

}  // namespace bodies
}  // namespace moe_comm
