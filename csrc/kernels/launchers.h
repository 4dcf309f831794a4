// Every CUDA launcher of moe_comm, declared in one place. Torch-free: raw device pointers,
// sizes and a cudaStream_t; each returns the launch's cudaError_t for the caller to check.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../core/routing.h"
#include "../core/token_params.h"
#include "../engine/header.h"
#include "bodies/routing.h"

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
  int64_t* status = nullptr;            // optional [1]: bad_code when a row breaks a routing rule
  int64_t bad_code = 0;
};

// Zeroes the outputs on `stream`, then counts. Out-of-range indices count as masked (and set
// the status when one is given).
cudaError_t launch_count_layout(const LayoutKernelParams& p, cudaStream_t stream);

// Send plan (device twin of core/layout.h fill_send_plan), from count_layout's token_in_rank.
// flags/positions are [num_ranks * num_tokens] int64, rank-major: one exclusive scan gives every
// (rank, token) pair its slot in the destination-major send buffer, with no host round trip.
struct SendPlanKernelParams {
  const int64_t* topk_idx = nullptr;   // [num_tokens, topk]
  const bool* token_in_rank = nullptr;  // [num_tokens, num_ranks]
  int64_t num_tokens = 0;
  int64_t topk = 0;
  int64_t num_experts = 0;
  int64_t num_ranks = 0;
  int64_t* flags = nullptr;
  int64_t* positions = nullptr;
  int64_t* send_offsets = nullptr;  // [num_ranks + 1]
  int64_t* send_token = nullptr;    // capacity num_ranks * num_tokens; the first send_offsets[W] used
  int64_t* pair_slot = nullptr;     // [num_tokens, topk]
  int64_t* first_slot = nullptr;    // [num_tokens, topk]
};
cudaError_t launch_send_plan_flags(const SendPlanKernelParams& p, cudaStream_t stream);
// After positions = exclusive scan of flags.
cudaError_t launch_send_plan_fill(const SendPlanKernelParams& p, cudaStream_t stream);

// Exclusive prefix sum of `count` int64 (CUB); workspace of exclusive_scan_workspace_bytes(count).
size_t exclusive_scan_workspace_bytes(int64_t count);
cudaError_t launch_exclusive_scan(const int64_t* in, int64_t* out, int64_t count, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream);

// Token kernels: the device twins of csrc/cpu/token_ops.h, same parameters and contracts
// (core/token_params.h). Payloads move as 16-byte vectors wherever source and destination rows
// are 16-byte aligned (packed rows always are).
cudaError_t launch_pack_rows(const PackParams& p, cudaStream_t stream);
cudaError_t launch_scatter_rows(const ScatterParams& p, cudaStream_t stream);
cudaError_t launch_reduce_rows(const ReduceParams& p, cudaStream_t stream);
cudaError_t launch_row_dots(const DotParams& p, cudaStream_t stream);

// Receiver-side expansion plan (device twin of cpu::count_recv_experts + fill_expand_plan).
// flags/positions are [experts_per_rank * num_rows] int64, expert-major: flag (e, n) marks that
// the n-th row in API order holds local expert e; one exclusive scan over the whole array then
// gives each (e, n) its expert-major output row.
struct ExpandPlanKernelParams {
  const uint8_t* rows = nullptr;       // [num_rows, row_bytes] with SlotMeta at meta_offset
  int64_t num_rows = 0;
  int64_t row_bytes = 0;
  int64_t meta_offset = 0;
  int64_t topk = 0;
  int64_t experts_per_rank = 0;
  const int64_t* row_order = nullptr;  // [num_rows] or null: arrival order
  int64_t* flags = nullptr;
  int64_t* positions = nullptr;
  int64_t* tokens_per_expert = nullptr;  // [experts_per_rank]
  int64_t* row_map = nullptr;          // [num_rows, topk]
  float* slot_weights = nullptr;       // [num_rows, topk]
  float* recv_weights = nullptr;       // [R]
};
// Zeroes and sets flags and counts. Local expert ids must be in range (our own packing).
cudaError_t launch_expand_count(const ExpandPlanKernelParams& p, cudaStream_t stream);
// Between count and fill: positions = exclusive scan of flags (launch_exclusive_scan).
cudaError_t launch_expand_fill(const ExpandPlanKernelParams& p, cudaStream_t stream);

// Node-limited top-k on the device (twin of core/routing.h node_limited_select; the parameters
// must pass check_node_limited). At most kMaxRoutingNodes nodes (the body's kept-node mask).
constexpr int64_t kMaxRoutingNodes = bodies::kMaxRoutingNodes;
cudaError_t launch_node_limited_select(const NodeLimitedParams& p, cudaStream_t stream);

// The engine's map passes (bodies/maps.h), a thread per element; count = elements.
struct ReadSlotMetaParams {
  const uint8_t* rows = nullptr;
  int64_t row_bytes = 0, meta_offset = 0, topk = 0, count = 0;
  int64_t* idx = nullptr;
  float* weights = nullptr;
};
struct ComposeParams {
  const int64_t* first_slot = nullptr;
  const int64_t* map = nullptr;
  const float* weights = nullptr;  // may be null (then out_weights is too)
  int64_t topk = 0, count = 0;
  int64_t* out_map = nullptr;
  float* out_weights = nullptr;
};
struct CollectParams {
  const float* per_slot = nullptr;
  int64_t stride = 0;  // floats between per_slot rows
  const int64_t* pair_slot = nullptr;
  int64_t topk = 0, count = 0;
  float* out = nullptr;
};
struct MaskParams {
  const uint8_t* rows = nullptr;
  int64_t stride = 0;  // bytes between rows
  const int64_t* map = nullptr;
  int64_t topk = 0, count = 0;
  float* out = nullptr;
};
cudaError_t launch_read_slot_meta(const ReadSlotMetaParams& p, cudaStream_t stream);
cudaError_t launch_compose_own_slot(const ComposeParams& p, cudaStream_t stream);
cudaError_t launch_collect_pairs(const CollectParams& p, cudaStream_t stream);
cudaError_t launch_gather_masked(const float* values, const int64_t* index, int64_t count, float* out,
                                 cudaStream_t stream);
cudaError_t launch_mask_by_map(const MaskParams& p, cudaStream_t stream);

// Dispatch headers (engine/header.h bodies): one block, a thread per row.
cudaError_t launch_fill_header(const engine::HeaderFill& h, cudaStream_t stream);
cudaError_t launch_relay_header(const engine::HeaderRelay& h, cudaStream_t stream);

// Loads every moe_comm kernel (and CUB's scan) on the current device now, instead of at its
// first launch: under lazy module loading a first launch takes the context lock and waits for
// the device, which can stall or deadlock against a collective in flight on another stream
// (CUDA review R1). Called when an engine is made for a CUDA device.
cudaError_t preload_token_kernels();
cudaError_t preload_layout_kernels();
cudaError_t preload_send_plan_kernels();
cudaError_t preload_expand_kernels();
cudaError_t preload_routing_kernels();
cudaError_t preload_header_kernels();
cudaError_t preload_map_kernels();
cudaError_t preload_scan_kernels();
inline cudaError_t preload_kernels() {
  cudaError_t (*const each[])() = {preload_token_kernels, preload_layout_kernels, preload_send_plan_kernels,
                                   preload_expand_kernels, preload_routing_kernels, preload_header_kernels,
                                   preload_map_kernels, preload_scan_kernels};
  for (auto preload : each) {
    const cudaError_t err = preload();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Version of the CUDA runtime linked in, as major*1000 + minor*10.
int runtime_version();

}  // namespace cuda
}  // namespace moe_comm
