#include "cuda_device.h"

#if defined(MOE_COMM_WITH_CUDA)
#include <cstring>

#include "../core/error.h"
#include "../kernels/launchers.h"

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

void CudaDevice::count_layout(const Routing& r, engine::Allocator&, int64_t* tokens_per_dest, int64_t* pairs,
                              bool* token_in_dest, int64_t* status) {
  LayoutKernelParams p;
  p.topk_idx = r.topk_idx;
  p.num_tokens = r.num_tokens;
  p.topk = r.topk;
  p.num_experts = r.num_experts;
  p.num_ranks = r.num_ranks;
  p.tokens_per_rank = tokens_per_dest;
  p.pairs_per_expert = pairs;
  p.token_in_rank = token_in_dest;
  p.status = status;
  p.bad_code = engine::kRoutingCode;
  MOE_CUDA_CHECK(launch_count_layout(p, stream_));
}

void CudaDevice::exclusive_scan(const int64_t* in, int64_t* out, int64_t count, engine::Allocator& alloc) {
  const size_t bytes = exclusive_scan_workspace_bytes(count);
  engine::Array scratch = alloc.allocate(int64_t(bytes));
  MOE_CUDA_CHECK(launch_exclusive_scan(in, out, count, scratch.data, bytes, stream_));
}

void CudaDevice::plan_send(const Routing& r, engine::Allocator& alloc, engine::StagePlan& plan) {
  const int64_t W = r.num_ranks, T = r.num_tokens, K = r.topk, pairs = W * T;
  auto i64 = [&](int64_t n) { return alloc.allocate(n * int64_t(sizeof(int64_t))); };
  plan.num_in = T;
  plan.status = i64(1);
  plan.rows_per_dest = i64(W);
  plan.pairs_per_expert = i64(r.num_experts);
  // Scratch freed on return: the caching allocator hands it out again only to work ordered
  // after these kernels on the same stream.
  engine::Array token_in_dest = alloc.allocate(T * W);
  count_layout(r, alloc, plan.rows_per_dest.as<int64_t>(), plan.pairs_per_expert.as<int64_t>(),
               reinterpret_cast<bool*>(token_in_dest.data), plan.status.as<int64_t>());
  engine::Array flags = i64(pairs), positions = i64(pairs);
  plan.send_offsets = i64(W + 1);
  plan.send_token = i64(pairs);  // room for every (token, destination): the header tells how many
  plan.pair_slot = i64(T * K);
  plan.first_slot = i64(T * K);
  SendPlanKernelParams p;
  p.topk_idx = r.topk_idx;
  p.token_in_rank = reinterpret_cast<const bool*>(token_in_dest.data);
  p.num_tokens = T;
  p.topk = K;
  p.num_experts = r.num_experts;
  p.num_ranks = W;
  p.flags = flags.as<int64_t>();
  p.positions = positions.as<int64_t>();
  p.send_offsets = plan.send_offsets.as<int64_t>();
  p.send_token = plan.send_token.as<int64_t>();
  p.pair_slot = plan.pair_slot.as<int64_t>();
  p.first_slot = plan.first_slot.as<int64_t>();
  MOE_CUDA_CHECK(launch_send_plan_flags(p, stream_));
  exclusive_scan(p.flags, p.positions, pairs, alloc);
  MOE_CUDA_CHECK(launch_send_plan_fill(p, stream_));
}

void CudaDevice::count_tokens(const Routing& r, engine::Allocator& alloc, int64_t* tokens_per_rank) {
  engine::Array pairs = alloc.allocate(r.num_experts * int64_t(sizeof(int64_t)));
  engine::Array token_in_rank = alloc.allocate(r.num_tokens * r.num_ranks);
  count_layout(r, alloc, tokens_per_rank, pairs.as<int64_t>(), reinterpret_cast<bool*>(token_in_rank.data), nullptr);
}

engine::Array CudaDevice::upload(const void* host, int64_t bytes, engine::Allocator& alloc) {
  engine::Array a = alloc.allocate(bytes);
  // From pageable memory: staged before the call returns, so the host array may go.
  if (bytes) MOE_CUDA_CHECK(cudaMemcpyAsync(a.data, host, bytes, cudaMemcpyHostToDevice, stream_));
  return a;
}

void CudaDevice::fill_header(const engine::HeaderFill& h) { MOE_CUDA_CHECK(launch_fill_header(h, stream_)); }
void CudaDevice::relay_header(const engine::HeaderRelay& h) { MOE_CUDA_CHECK(launch_relay_header(h, stream_)); }

void CudaDevice::download(const std::vector<Transfer>& items) {
  int64_t total = 0;
  for (const Transfer& t : items) total += t.bytes;
  uint8_t* staging = pinned(total);
  int64_t at = 0;
  for (const Transfer& t : items) {  // into pinned memory: asynchronous, so the wait can be bounded
    if (t.bytes) MOE_CUDA_CHECK(cudaMemcpyAsync(staging + at, t.src, t.bytes, cudaMemcpyDeviceToHost, stream_));
    at += t.bytes;
  }
  if (wait_) {
    wait_(stream_);
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

void CudaDevice::expand(const engine::ExpandArgs& a, engine::Allocator& alloc) {
  // Scratch of the expand plan (kernels/expand_plan.cu): expert-major flags, their scan and
  // device counts; freed on return (stream-ordered reuse).
  const int64_t count = a.experts_per_rank * a.num_rows;
  engine::Array flags = alloc.allocate(count * int64_t(sizeof(int64_t)));
  engine::Array positions = alloc.allocate(count * int64_t(sizeof(int64_t)));
  engine::Array counts = alloc.allocate(a.experts_per_rank * int64_t(sizeof(int64_t)));
  ExpandPlanKernelParams p;
  p.rows = a.rows;
  p.num_rows = a.num_rows;
  p.row_bytes = a.fmt.row_bytes;
  p.meta_offset = a.fmt.meta_offset;
  p.topk = a.topk;
  p.experts_per_rank = a.experts_per_rank;
  p.row_order = a.row_order;
  p.flags = flags.as<int64_t>();
  p.positions = positions.as<int64_t>();
  p.tokens_per_expert = counts.as<int64_t>();
  p.row_map = a.row_map;
  p.slot_weights = a.slot_weights;
  p.recv_weights = a.recv_weights;
  MOE_CUDA_CHECK(launch_expand_count(p, stream_));
  exclusive_scan(p.flags, p.positions, count, alloc);
  MOE_CUDA_CHECK(launch_expand_fill(p, stream_));
  MOE_CUDA_CHECK(launch_scatter_rows(engine::expand_scatter(a), stream_));
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
