// Device send plan: flags, one exclusive scan (scan.cu), fill. See launchers.h.
#include "grid.cuh"
#include "bodies/layout.h"
#include "launchers.h"

namespace moe_comm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t work) { return grid_blocks(work, kThreads); }

// flags[r * T + t] = token t goes to rank r: rank-major, so the scan orders slots by
// destination, then by token, as the CPU plan does.
__global__ void send_plan_flags_kernel(SendPlanKernelParams p) {
  const int64_t total = p.num_ranks * p.num_tokens;
  MOE_GRID_STRIDE(i, total) {
    const int64_t r = i / p.num_tokens, t = i % p.num_tokens;
    p.flags[i] = p.token_in_rank[t * p.num_ranks + r] ? 1 : 0;
  }
}

__global__ void send_plan_slots_kernel(SendPlanKernelParams p) {
  const int64_t total = p.num_ranks * p.num_tokens;
  MOE_GRID_STRIDE(i, total) {
    if (p.flags[i]) p.send_token[p.positions[i]] = i % p.num_tokens;
  }
  // Rank r's slots start where its first (rank, token) pair was numbered.
  MOE_GRID_STRIDE(r, p.num_ranks + 1) {
    if (r < p.num_ranks) {
      p.send_offsets[r] = p.positions[r * p.num_tokens];
    } else {
      p.send_offsets[r] = p.positions[total - 1] + p.flags[total - 1];
    }
  }
}

__global__ void send_plan_pairs_kernel(SendPlanKernelParams p) {
  const int64_t experts_per_rank = p.num_experts / p.num_ranks;
  MOE_GRID_STRIDE(pair, p.num_tokens * p.topk) {
    const int64_t t = pair / p.topk, k = pair % p.topk;
    const int64_t* row = p.topk_idx + t * p.topk;
    if (!bodies::valid_expert(row[k], p.num_experts)) {
      p.pair_slot[pair] = -1;
      p.first_slot[pair] = -1;
      continue;
    }
    const int64_t rank = row[k] / experts_per_rank;
    const int64_t slot = p.positions[rank * p.num_tokens + t];
    const bool first = bodies::first_to_dest(row, k, p.num_experts, experts_per_rank);
    p.pair_slot[pair] = slot;
    p.first_slot[pair] = first ? slot : -1;
  }
}

}  // namespace

cudaError_t launch_send_plan_flags(const SendPlanKernelParams& p, cudaStream_t stream) {
  if (p.num_ranks <= 0 || p.num_experts % p.num_ranks != 0) return cudaErrorInvalidValue;
  if (p.num_tokens == 0) return cudaSuccess;
  send_plan_flags_kernel<<<blocks_for(p.num_ranks * p.num_tokens), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_send_plan_fill(const SendPlanKernelParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) {  // nothing to send: every offset is 0
    return cudaMemsetAsync(p.send_offsets, 0, (p.num_ranks + 1) * sizeof(int64_t), stream);
  }
  send_plan_slots_kernel<<<blocks_for(p.num_ranks * p.num_tokens), kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.topk == 0) return err;
  send_plan_pairs_kernel<<<blocks_for(p.num_tokens * p.topk), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t preload_send_plan_kernels() {
  cudaFuncAttributes attributes;
  cudaError_t err = cudaFuncGetAttributes(&attributes, send_plan_flags_kernel);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, send_plan_slots_kernel);
  return err == cudaSuccess ? cudaFuncGetAttributes(&attributes, send_plan_pairs_kernel) : err;
}

}  // namespace cuda
}  // namespace moe_comm
