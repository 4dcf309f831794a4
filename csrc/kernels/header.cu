// Dispatch headers on the device: a thread per row runs the single-source row bodies of
// engine/header.h that the CPU backend runs in a loop.
#include "../engine/header.h"
#include "launchers.h"

namespace moe_comm {
namespace cuda {
namespace {

constexpr int kThreads = 128;

__global__ void fill_header_kernel(engine::HeaderFill h) {
  for (int64_t d = threadIdx.x; d < h.size; d += blockDim.x) engine::fill_header_row(h, d);
}

__global__ void relay_header_kernel(engine::HeaderRelay h) {
  for (int64_t l = threadIdx.x; l < h.size; l += blockDim.x) engine::relay_header_row(h, l);
}

}  // namespace

cudaError_t launch_fill_header(const engine::HeaderFill& h, cudaStream_t stream) {
  fill_header_kernel<<<1, kThreads, 0, stream>>>(h);
  return cudaGetLastError();
}

cudaError_t launch_relay_header(const engine::HeaderRelay& h, cudaStream_t stream) {
  relay_header_kernel<<<1, kThreads, 0, stream>>>(h);
  return cudaGetLastError();
}

cudaError_t preload_header_kernels() {
  cudaFuncAttributes attributes;
  cudaError_t err = cudaFuncGetAttributes(&attributes, fill_header_kernel);
  return err == cudaSuccess ? cudaFuncGetAttributes(&attributes, relay_header_kernel) : err;
}

}  // namespace cuda
}  // namespace moe_comm
