#include "cuda_device.h"

#if defined(MOE_COMM_WITH_CUDA)
#include <cstring>
#include <vector>

#include "../core/error.h"
#include "../kernels/launchers.h"
#include "plan_args.h"

namespace moe_comm {
namespace cuda {

CudaDevice::CudaDevice(int device) : device_(device) {
  int previous = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&previous));
  MOE_CUDA_CHECK(cudaSetDevice(device_));
  const cudaError_t loaded = preload_kernels();
  cudaSetDevice(previous);
  MOE_CUDA_CHECK(loaded);
}

CudaDevice::~CudaDevice() {
  if (pinned_) cudaFreeHost(pinned_);
}

uint8_t* CudaDevice::pinned(int64_t bytes) {
  if (bytes > pinned_bytes_) {
    if (pinned_) MOE_CUDA_CHECK(cudaFreeHost(pinned_));
    pinned_ = nullptr;
    pinned_bytes_ = 0;
    MOE_CUDA_CHECK(cudaMallocHost(&pinned_, bytes + bytes / 2));
    pinned_bytes_ = bytes + bytes / 2;
  }
  return static_cast<uint8_t*>(pinned_);
}

void CudaDevice::plan_send(const Routing& r, const engine::Capacity& capacity, engine::Allocator& alloc,
                           engine::StagePlan& plan) {
  // Scratch freed on return: the caching allocator hands it out again only to work ordered
  // after this launch on the same stream.
  engine::SendPlanWork work = engine::prepare_send_plan(r, plan_workers(r.num_tokens), alloc, plan);
  // Room for every (token, destination): the header tells the host how many are used. Static
  // mode: the fixed slots.
  const int64_t slots = plan.stride ? plan.stride * r.num_ranks : r.num_tokens * r.num_ranks;
  plan.send_token = alloc.allocate(slots * int64_t(sizeof(int64_t)));
  work.args.send_token = plan.send_token.as<int64_t>();
  engine::CapacityWork dropping;
  if (capacity.on()) {
    dropping = engine::prepare_capacity(r, capacity, plan_workers(r.num_tokens * r.topk), alloc, plan, work.args);
  }
  MOE_CUDA_CHECK(launch_send_plan(work.args, capacity.on() ? &dropping.args : nullptr, stream_));
}

void CudaDevice::count_tokens(const Routing& r, engine::Allocator& alloc, int64_t* tokens_per_rank) {
  MOE_CUDA_CHECK(launch_send_plan(engine::prepare_token_count(r, plan_workers(r.num_tokens), alloc, tokens_per_rank).args,
                                  nullptr, stream_));
}

engine::Array CudaDevice::upload(const void* host, int64_t bytes, engine::Allocator& alloc) {
  engine::Array a = alloc.allocate(bytes);
  // From pageable memory: staged before the call returns, so the host array may go.
  if (bytes) MOE_CUDA_CHECK(cudaMemcpyAsync(a.data, host, bytes, cudaMemcpyHostToDevice, stream_));
  return a;
}

bool CudaDevice::capturing() const {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  MOE_CUDA_CHECK(cudaStreamIsCapturing(stream_, &status));
  return status != cudaStreamCaptureStatusNone;
}

void CudaDevice::fill_header(const engine::HeaderFill& h) { MOE_CUDA_CHECK(launch_fill_header(h, stream_)); }
void CudaDevice::relay_header(const engine::HeaderRelay& h) { MOE_CUDA_CHECK(launch_relay_header(h, stream_)); }

void CudaDevice::download(const std::vector<Transfer>& items, const std::string& stage) {
  int64_t total = 0;
  for (const Transfer& t : items) total += t.bytes;
  uint8_t* staging = pinned(total);
  int64_t at = 0;
  for (const Transfer& t : items) {  // into pinned memory: asynchronous, so the wait can be bounded
    if (t.bytes) MOE_CUDA_CHECK(cudaMemcpyAsync(staging + at, t.src, t.bytes, cudaMemcpyDeviceToHost, stream_));
    at += t.bytes;
  }
  if (wait_) {
    wait_(stream_, stage);
  } else {
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  at = 0;
  for (const Transfer& t : items) {
    if (t.bytes) std::memcpy(t.dst, staging + at, t.bytes);
    at += t.bytes;
  }
}

void CudaDevice::fill_zero(void* data, int64_t bytes) {
  if (bytes) MOE_CUDA_CHECK(cudaMemsetAsync(data, 0, bytes, stream_));
}

void CudaDevice::pack_rows(const PackParams& p) { MOE_CUDA_CHECK(launch_pack_rows(p, stream_)); }
void CudaDevice::scatter_rows(const ScatterParams& p) { MOE_CUDA_CHECK(launch_scatter_rows(p, stream_)); }
void CudaDevice::reduce_rows(const ReduceParams& p) { MOE_CUDA_CHECK(launch_reduce_rows(p, stream_)); }
void CudaDevice::row_dots(const DotParams& p) { MOE_CUDA_CHECK(launch_row_dots(p, stream_)); }

void CudaDevice::read_slot_meta(const uint8_t* rows, int64_t num_rows, const RowFormat& fmt, int64_t topk,
                                int64_t* idx, float* weights) {
  ReadSlotMetaParams p{rows, fmt.row_bytes, fmt.meta_offset, topk, num_rows * topk, idx, weights};
  MOE_CUDA_CHECK(launch_read_slot_meta(p, stream_));
}

void CudaDevice::expand(const engine::ExpandArgs& e, engine::Allocator& alloc) {
  if (e.fixed.on()) {  // static mode: every table is arithmetic, nothing goes up
    engine::ExpandPlanWork work = engine::prepare_expand(e, plan_workers(e.num_rows), nullptr, nullptr, nullptr, alloc);
    MOE_CUDA_CHECK(launch_expand(work.args, engine::expand_scatter(e), stream_));
    return;
  }
  // The announced offsets go up with the rows' plan (a copy, not a launch); a disagreement
  // places no row (bodies/plan.h), so a corrupted header cannot write out of bounds.
  const int64_t n = e.experts_per_rank + 1;
  std::vector<int64_t> tables(e.expert_offsets, e.expert_offsets + n);  // one upload for all three
  if (e.padded_offsets) tables.insert(tables.end(), e.padded_offsets, e.padded_offsets + n);
  if (e.source_starts) tables.insert(tables.end(), e.source_starts, e.source_starts + e.sources + 1);
  engine::Array on_device = upload(tables.data(), int64_t(tables.size() * sizeof(int64_t)), alloc);
  const int64_t* announced = on_device.as<int64_t>();
  const int64_t* padded = e.padded_offsets ? announced + n : nullptr;
  const int64_t* sources = e.source_starts ? announced + (padded ? 2 * n : n) : nullptr;
  engine::ExpandPlanWork work = engine::prepare_expand(e, plan_workers(e.num_rows), announced, padded, sources, alloc);
  MOE_CUDA_CHECK(launch_expand(work.args, engine::expand_scatter(e), stream_));
}

void CudaDevice::compose_own_slot(const int64_t* first_slot, int64_t num_in, int64_t topk, const int64_t* map,
                                  const float* weights, int64_t* out_map, float* out_weights) {
  ComposeParams p{first_slot, map, weights, topk, num_in * topk, out_map, out_weights};
  MOE_CUDA_CHECK(launch_compose_own_slot(p, stream_));
}

void CudaDevice::collect_pairs(const float* per_slot, int64_t per_slot_stride, const int64_t* pair_slot,
                               int64_t num_in, int64_t topk, float* out) {
  CollectParams p{per_slot, per_slot_stride, pair_slot, topk, num_in * topk, out};
  MOE_CUDA_CHECK(launch_collect_pairs(p, stream_));
}

void CudaDevice::gather_masked(const float* values, const int64_t* index, int64_t count, float* out) {
  MOE_CUDA_CHECK(launch_gather_masked(values, index, count, out, stream_));
}

void CudaDevice::mask_by_map(const uint8_t* rows, int64_t stride, const int64_t* map, int64_t num_rows, int64_t topk,
                             float* out) {
  MaskParams p{rows, stride, map, topk, num_rows * topk, out};
  MOE_CUDA_CHECK(launch_mask_by_map(p, stream_));
}

}  // namespace cuda
}  // namespace moe_comm
#endif
