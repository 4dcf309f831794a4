#include "bodies/layout.h"
#include "launchers.h"

namespace moe_comm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Block-local histograms live in shared memory while they fit in the default 48 KiB.
constexpr int64_t kMaxSharedCounters = 48 * 1024 / sizeof(unsigned int);

__device__ __forceinline__ void add_global(int64_t* counter, unsigned long long value) {
  atomicAdd(reinterpret_cast<unsigned long long*>(counter), value);
}

// One thread per token. A token counts once per destination rank: slot k contributes to its
// rank only if no earlier slot of the same row went to that rank (top-k is small).
template <bool kShared>
__global__ void count_layout_kernel(LayoutKernelParams p) {
  extern __shared__ unsigned int shared_counts[];  // [num_experts + num_ranks] when kShared
  const int64_t experts_per_rank = p.num_experts / p.num_ranks;
  if (kShared) {
    for (int64_t i = threadIdx.x; i < p.num_experts + p.num_ranks; i += blockDim.x)
      shared_counts[i] = 0;
    __syncthreads();
  }
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < p.num_tokens) {
    const int64_t* row = p.topk_idx + t * p.topk;
    if (p.status && bodies::routing_row_bad(row, p.topk, p.num_experts)) {
      atomicMax(reinterpret_cast<unsigned long long*>(p.status), static_cast<unsigned long long>(p.bad_code));
    }
    for (int64_t k = 0; k < p.topk; ++k) {
      const int64_t e = row[k];
      if (!bodies::valid_expert(e, p.num_experts)) continue;  // masked (or out of range: status set)
      const int64_t rank = e / experts_per_rank;
      const bool first = bodies::first_to_dest(row, k, p.num_experts, experts_per_rank);
      if (kShared) {
        atomicAdd(&shared_counts[e], 1u);
        if (first) atomicAdd(&shared_counts[p.num_experts + rank], 1u);
      } else {
        add_global(&p.pairs_per_expert[e], 1ull);
        if (first) add_global(&p.tokens_per_rank[rank], 1ull);
      }
      if (first) p.token_in_rank[t * p.num_ranks + rank] = true;
    }
  }
  if (kShared) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < p.num_experts + p.num_ranks; i += blockDim.x) {
      const unsigned int c = shared_counts[i];
      if (c == 0) continue;
      if (i < p.num_experts) add_global(&p.pairs_per_expert[i], c);
      else add_global(&p.tokens_per_rank[i - p.num_experts], c);
    }
  }
}

}  // namespace

cudaError_t launch_count_layout(const LayoutKernelParams& p, cudaStream_t stream) {
  if (p.num_ranks <= 0 || p.num_experts % p.num_ranks != 0) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(p.tokens_per_rank, 0, p.num_ranks * sizeof(int64_t), stream);
  if (err == cudaSuccess && p.status) err = cudaMemsetAsync(p.status, 0, sizeof(int64_t), stream);
  if (err == cudaSuccess)
    err = cudaMemsetAsync(p.pairs_per_expert, 0, p.num_experts * sizeof(int64_t), stream);
  if (err == cudaSuccess && p.num_tokens > 0)
    err = cudaMemsetAsync(p.token_in_rank, 0, p.num_tokens * p.num_ranks * sizeof(bool), stream);
  if (err != cudaSuccess || p.num_tokens == 0) return err;

  const int64_t blocks = (p.num_tokens + kThreads - 1) / kThreads;
  const int64_t counters = p.num_experts + p.num_ranks;
  if (counters <= kMaxSharedCounters) {
    count_layout_kernel<true><<<blocks, kThreads, counters * sizeof(unsigned int), stream>>>(p);
  } else {
    count_layout_kernel<false><<<blocks, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

int runtime_version() {
  int version = 0;
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

cudaError_t preload_layout_kernels() {
  cudaFuncAttributes attributes;
  cudaError_t err = cudaFuncGetAttributes(&attributes, count_layout_kernel<true>);
  return err == cudaSuccess ? cudaFuncGetAttributes(&attributes, count_layout_kernel<false>) : err;
}

}  // namespace cuda
}  // namespace moe_comm
