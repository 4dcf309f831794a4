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

}  // namespace cuda
}  // namespace moe_comm
