// The send plan and the expand plan (bodies/plan.h), each one cooperative launch: the passes
// of the body run back to back with a grid-wide barrier between them, so a flat dispatch
// launches the plan, the header, the pack and the expand, and nothing else. The expand also
// copies the arrived rows to their expert rows (bodies/token_rows.h scatter_row) after a last
// barrier. Only the launch geometry and the barriers are written here.
#include <cooperative_groups.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <utility>

#include "bodies/plan.h"
#include "bodies/token_rows.h"
#include "launchers.h"

namespace moe_comm {
namespace cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t thread_rank() { return blockIdx.x * int64_t(blockDim.x) + threadIdx.x; }
__device__ __forceinline__ int64_t thread_count() { return int64_t(gridDim.x) * blockDim.x; }

__global__ void send_plan_kernel(bodies::SendPlanArgs a, bodies::CapacityArgs c, bool with_capacity) {
  cg::grid_group grid = cg::this_grid();
  if (with_capacity) {  // the same branch for the whole grid
    for (int64_t w = thread_rank(); w < c.split.workers; w += thread_count()) bodies::capacity_count(c, w);
    grid.sync();
    for (int64_t e = thread_rank(); e < c.num_experts; e += thread_count()) bodies::capacity_column(c, e);
    grid.sync();
    if (thread_rank() == 0) bodies::capacity_starts(c);
    grid.sync();
    for (int64_t w = thread_rank(); w < c.split.workers; w += thread_count()) bodies::capacity_group(c, w);
    grid.sync();
    for (int64_t e = thread_rank(); e < c.num_experts; e += thread_count()) bodies::capacity_select(c, e);
    grid.sync();
    for (int64_t w = thread_rank(); w < c.split.workers; w += thread_count()) bodies::capacity_keep(c, w);
    grid.sync();
  }
  for (int64_t w = thread_rank(); w < a.split.workers; w += thread_count()) bodies::send_plan_count(a, w);
  for (int64_t j = thread_rank(); j < bodies::send_plan_slots(a); j += thread_count()) bodies::send_plan_clear(a, j);
  grid.sync();
  const int64_t columns = bodies::send_plan_column_count(a);
  for (int64_t c = thread_rank(); c < columns; c += thread_count()) bodies::send_plan_column(a, c);
  if (a.counts_only()) return;  // the same branch for the whole grid
  grid.sync();
  if (thread_rank() == 0) bodies::send_plan_starts(a);
  grid.sync();
  for (int64_t w = thread_rank(); w < a.split.workers; w += thread_count()) bodies::send_plan_fill(a, w);
}

template <typename E>
__global__ void expand_kernel(bodies::ExpandPlanArgs a, ScatterParams s) {
  cg::grid_group grid = cg::this_grid();
  for (int64_t w = thread_rank(); w < a.split.workers; w += thread_count()) bodies::expand_plan_count(a, w);
  grid.sync();
  for (int64_t c = thread_rank(); c <= a.buckets(); c += thread_count()) bodies::expand_plan_column(a, c);
  grid.sync();
  if (thread_rank() == 0) bodies::expand_plan_starts(a);
  grid.sync();
  for (int64_t w = thread_rank(); w < a.split.workers; w += thread_count()) bodies::expand_plan_fill(a, w);
  grid.sync();
  const bodies::Lanes lanes{int64_t(threadIdx.x), int64_t(blockDim.x)};
  const int64_t padded_rows = a.padding() ? a.output_rows() : 0;
  for (int64_t r = blockIdx.x; r < padded_rows; r += gridDim.x) bodies::zero_if_padding(a, r, lanes);
  for (int64_t i = blockIdx.x; i < s.num_src; i += gridDim.x) bodies::scatter_row<E>(s, i, lanes);
}

// How many blocks a cooperative launch of `kernel` uses at most, asked of the runtime once per
// (kernel, device).
cudaError_t resident_blocks(const void* kernel, int64_t* blocks) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> known;
  int device = 0, per_sm = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find({kernel, device});
  if (it != known.end()) {
    *blocks = it->second;
    return cudaSuccess;
  }
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  if (err != cudaSuccess) return err;
  if (per_sm < 1 || sms < 1) return cudaErrorInvalidConfiguration;
  // One block per SM, not the device's full occupancy: every block of a cooperative launch must
  // be resident at once, and kernels of other streams (NCCL's, waiting for a peer that may be
  // waiting for us) must still fit beside it.
  *blocks = known[{kernel, device}] = sms;
  return cudaSuccess;
}

cudaError_t launch_cooperative(const void* kernel, int64_t work, void** args, cudaStream_t stream) {
  int64_t limit = 0;
  cudaError_t err = resident_blocks(kernel, &limit);
  if (err != cudaSuccess) return err;
  const int64_t wanted = std::max<int64_t>(1, (work + kThreads - 1) / kThreads);
  for (int64_t blocks = std::min(wanted, limit);; blocks = (blocks + 1) / 2) {
    err = cudaLaunchCooperativeKernel(kernel, dim3(unsigned(blocks)), dim3(kThreads), args, 0, stream);
    // Fewer SMs than the device has (MPS, green contexts): a smaller grid does the same work.
    if (err != cudaErrorCooperativeLaunchTooLarge || blocks == 1) return err;
    cudaGetLastError();  // clear it before the retry
  }
}

}  // namespace

int64_t plan_workers(int64_t items) {
  // Workers walk their chunks serially and the column scans walk the workers serially: about
  // sqrt(2 * items) of each keeps both passes short (a first choice, to be tuned on a GPU).
  const int64_t workers = int64_t(std::ceil(std::sqrt(2.0 * double(items))));
  return std::max<int64_t>(1, std::min(workers, items));
}

cudaError_t launch_send_plan(const bodies::SendPlanArgs& a, const bodies::CapacityArgs* capacity,
                             cudaStream_t stream) {
  if (a.num_dests <= 0 || a.num_experts % a.num_dests != 0) return cudaErrorInvalidValue;
  bodies::SendPlanArgs args = a;
  bodies::CapacityArgs dropping = capacity ? *capacity : bodies::CapacityArgs{};
  bool with_capacity = capacity != nullptr;
  void* params[] = {&args, &dropping, &with_capacity};
  int64_t work = std::max({a.split.workers, bodies::send_plan_column_count(a), bodies::send_plan_slots(a)});
  if (capacity) work = std::max({work, capacity->split.workers, capacity->num_experts});
  return launch_cooperative(reinterpret_cast<const void*>(send_plan_kernel), work, params, stream);
}

cudaError_t launch_expand(const bodies::ExpandPlanArgs& a, const ScatterParams& s, cudaStream_t stream) {
  bodies::ExpandPlanArgs args = a;
  ScatterParams scatter = s;
  void* params[] = {&args, &scatter};
  const int64_t work = std::max({a.split.workers, a.buckets() + 1, s.num_src * kThreads});
  cudaError_t err = cudaSuccess;
  const bool known = bodies::with_elem(s.dtype, [&](auto elem) {
    err = launch_cooperative(reinterpret_cast<const void*>(expand_kernel<decltype(elem)>), work, params, stream);
  });
  return known ? err : cudaErrorInvalidValue;
}

cudaError_t preload_plan_kernels() {
  cudaFuncAttributes attributes;
  cudaError_t first = cudaFuncGetAttributes(&attributes, send_plan_kernel);
  const DType types[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  for (DType t : types) {
    bodies::with_elem(t, [&](auto elem) {
      const cudaError_t err = cudaFuncGetAttributes(&attributes, expand_kernel<decltype(elem)>);
      if (first == cudaSuccess) first = err;
    });
  }
  return first;
}

int runtime_version() {
  int version = 0;
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

}  // namespace cuda
}  // namespace moe_comm
