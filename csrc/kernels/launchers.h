// Every CUDA launcher of moe_comm, declared in one place. Torch-free: raw device pointers,
// sizes and a cudaStream_t; each returns the launch's cudaError_t for the caller to check.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moe_comm {
namespace cuda {

// Dispatch layout counts (the device twin of core/layout.h count_layout).
struct LayoutKernelParams {
  const int64_t* topk_idx = nullptr;  // [num_tokens, topk] on the device
  int64_t num_tokens = 0;
  int64_t topk = 0;
  int64_t num_experts = 0;
  int64_t num_ranks = 0;
  int64_t* tokens_per_rank = nullptr;   // [num_ranks]: distinct tokens per destination rank
  int64_t* pairs_per_expert = nullptr;  // [num_experts]: valid (token, expert) pairs
  bool* token_in_rank = nullptr;        // [num_tokens, num_ranks]: token goes to that rank
};

// Zeroes the outputs on `stream`, then counts. Indices must already be validated.
cudaError_t launch_count_layout(const LayoutKernelParams& p, cudaStream_t stream);

// Version of the CUDA runtime linked in, as major*1000 + minor*10.
int runtime_version();

}  // namespace cuda
}  // namespace moe_comm
