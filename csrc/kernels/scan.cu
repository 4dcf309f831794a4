// One exclusive prefix sum over int64 flags (CUB), shared by the send plan and the expansion
// plan: both turn "this (bucket, item) is used" flags into output positions in one pass.
#include <cub/device/device_scan.cuh>

#include "launchers.h"

namespace moe_comm {
namespace cuda {

size_t exclusive_scan_workspace_bytes(int64_t count) {
  size_t bytes = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<const int64_t*>(nullptr),
                                static_cast<int64_t*>(nullptr), count);
  return bytes;
}

cudaError_t launch_exclusive_scan(const int64_t* in, int64_t* out, int64_t count, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  return cub::DeviceScan::ExclusiveSum(workspace, workspace_bytes, in, out, count, stream);
}

// CUB's kernels are not ours to name: one scan of one element, on a stream of its own, loads them.
cudaError_t preload_scan_kernels() {
  int64_t* buffer = nullptr;
  cudaError_t err = cudaMalloc(&buffer, 2 * sizeof(int64_t));
  if (err != cudaSuccess) return err;
  size_t bytes = exclusive_scan_workspace_bytes(1);
  void* scratch = nullptr;
  cudaStream_t stream = nullptr;
  err = cudaMalloc(&scratch, bytes + 1);
  if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  if (err == cudaSuccess) err = cudaMemsetAsync(buffer, 0, 2 * sizeof(int64_t), stream);
  if (err == cudaSuccess) err = launch_exclusive_scan(buffer, buffer + 1, 1, scratch, bytes, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  if (stream) cudaStreamDestroy(stream);
  if (scratch) cudaFree(scratch);
  cudaFree(buffer);
  return err;
}

}  // namespace cuda
}  // namespace moe_comm
