// Device expansion plan: counts, one exclusive scan, fill. See launchers.h.
#include "grid.cuh"
#include "launchers.h"

namespace moe_comm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ SlotMeta meta_at(const ExpandPlanKernelParams& p, int64_t row, int64_t k) {
  return reinterpret_cast<const SlotMeta*>(p.rows + row * p.row_bytes + p.meta_offset)[k];
}

__global__ void expand_count_kernel(ExpandPlanKernelParams p) {
  MOE_GRID_STRIDE(pair, p.num_rows * p.topk) {
    const int64_t n = pair / p.topk, k = pair % p.topk;
    const int64_t row = p.row_order ? p.row_order[n] : n;
    const int32_t e = meta_at(p, row, k).local_expert;
    if (e < 0) continue;
    p.flags[e * p.num_rows + n] = 1;  // an expert appears at most once per row
    atomicAdd(reinterpret_cast<unsigned long long*>(&p.tokens_per_expert[e]), 1ull);
  }
}

__global__ void expand_fill_kernel(ExpandPlanKernelParams p) {
  MOE_GRID_STRIDE(pair, p.num_rows * p.topk) {
    const int64_t n = pair / p.topk, k = pair % p.topk;
    const int64_t row = p.row_order ? p.row_order[n] : n;
    const SlotMeta m = meta_at(p, row, k);
    const int64_t flat = row * p.topk + k;
    if (m.local_expert < 0) {
      p.row_map[flat] = -1;
      p.slot_weights[flat] = 0.0f;
      continue;
    }
    const int64_t out = p.positions[m.local_expert * p.num_rows + n];
    p.row_map[flat] = out;
    p.slot_weights[flat] = m.weight;
    p.recv_weights[out] = m.weight;
  }
}

unsigned blocks_for(int64_t work) { return grid_blocks(work, kThreads); }

}  // namespace

cudaError_t launch_expand_count(const ExpandPlanKernelParams& p, cudaStream_t stream) {
  const int64_t count = p.experts_per_rank * p.num_rows;
  cudaError_t err = cudaMemsetAsync(p.tokens_per_expert, 0, p.experts_per_rank * sizeof(int64_t), stream);
  if (err == cudaSuccess && count > 0) err = cudaMemsetAsync(p.flags, 0, count * sizeof(int64_t), stream);
  if (err != cudaSuccess || p.num_rows * p.topk == 0) return err;
  expand_count_kernel<<<blocks_for(p.num_rows * p.topk), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_expand_fill(const ExpandPlanKernelParams& p, cudaStream_t stream) {
  if (p.num_rows * p.topk == 0) return cudaSuccess;
  expand_fill_kernel<<<blocks_for(p.num_rows * p.topk), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t preload_expand_kernels() {
  cudaFuncAttributes attributes;
  cudaError_t err = cudaFuncGetAttributes(&attributes, expand_count_kernel);
  return err == cudaSuccess ? cudaFuncGetAttributes(&attributes, expand_fill_kernel) : err;
}

}  // namespace cuda
}  // namespace moe_comm
