// Device node-limited top-k: a thread per token runs the single-source body
// (bodies/routing.h), which keeps no per-node array (no local-memory frame; CUDA review K1).
#include "../core/routing.h"
#include "bodies/routing.h"
#include "launchers.h"

namespace moe_comm {
namespace cuda {
namespace {

constexpr int kThreads = 128;

__global__ void node_limited_kernel(NodeLimitedParams p) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t < p.num_tokens) bodies::node_limited_token(p, t);
}

}  // namespace

cudaError_t launch_node_limited_select(const NodeLimitedParams& p, cudaStream_t stream) {
  if (p.num_nodes > kMaxRoutingNodes) return cudaErrorInvalidValue;
  if (p.num_tokens == 0) return cudaSuccess;
  const int64_t blocks = (p.num_tokens + kThreads - 1) / kThreads;
  node_limited_kernel<<<blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t preload_routing_kernels() {
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, node_limited_kernel);
}

}  // namespace cuda
}  // namespace moe_comm
