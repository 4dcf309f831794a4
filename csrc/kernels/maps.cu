// The engine's small map passes on the device: a thread per element runs the single-source
// body (bodies/maps.h) that the CPU backend runs in a loop.
#include "bodies/maps.h"
#include "grid.cuh"
#include "launchers.h"

namespace moe_comm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void read_slot_meta_kernel(ReadSlotMetaParams p) {
  MOE_GRID_STRIDE(at, p.count) bodies::read_slot_meta(p.rows, p.row_bytes, p.meta_offset, p.topk, at, p.idx, p.weights);
}

__global__ void compose_own_slot_kernel(ComposeParams p) {
  MOE_GRID_STRIDE(at, p.count) bodies::compose_own_slot(p.first_slot, p.topk, p.map, p.weights, at, p.out_map, p.out_weights);
}

__global__ void collect_pairs_kernel(CollectParams p) {
  MOE_GRID_STRIDE(at, p.count) bodies::collect_pair(p.per_slot, p.stride, p.pair_slot, p.topk, at, p.out);
}

__global__ void gather_masked_kernel(const float* values, const int64_t* index, int64_t count, float* out) {
  MOE_GRID_STRIDE(at, count) bodies::gather_masked(values, index, at, out);
}

__global__ void mask_by_map_kernel(MaskParams p) {
  MOE_GRID_STRIDE(at, p.count) bodies::mask_by_map(p.rows, p.stride, p.map, p.topk, at, p.out);
}

}  // namespace

cudaError_t launch_read_slot_meta(const ReadSlotMetaParams& p, cudaStream_t stream) {
  if (p.count == 0) return cudaSuccess;
  read_slot_meta_kernel<<<grid_blocks(p.count, kThreads), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_compose_own_slot(const ComposeParams& p, cudaStream_t stream) {
  if (p.count == 0) return cudaSuccess;
  compose_own_slot_kernel<<<grid_blocks(p.count, kThreads), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_collect_pairs(const CollectParams& p, cudaStream_t stream) {
  if (p.count == 0) return cudaSuccess;
  collect_pairs_kernel<<<grid_blocks(p.count, kThreads), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_gather_masked(const float* values, const int64_t* index, int64_t count, float* out,
                                 cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  gather_masked_kernel<<<grid_blocks(count, kThreads), kThreads, 0, stream>>>(values, index, count, out);
  return cudaGetLastError();
}

cudaError_t launch_mask_by_map(const MaskParams& p, cudaStream_t stream) {
  if (p.count == 0) return cudaSuccess;
  mask_by_map_kernel<<<grid_blocks(p.count, kThreads), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t preload_map_kernels() {
  cudaFuncAttributes attributes;
  cudaError_t err = cudaFuncGetAttributes(&attributes, read_slot_meta_kernel);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, compose_own_slot_kernel);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, collect_pairs_kernel);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, gather_masked_kernel);
  return err == cudaSuccess ? cudaFuncGetAttributes(&attributes, mask_by_map_kernel) : err;
}

}  // namespace cuda
}  // namespace moe_comm
