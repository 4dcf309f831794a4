// Every CUDA launcher of moe_comm, declared in one place. Torch-free: raw device pointers,
// sizes and a cudaStream_t; each returns the launch's cudaError_t for the caller to check.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../core/routing.h"
#include "../core/token_params.h"
#include "../engine/header.h"
#include "bodies/plan.h"
#include "bodies/routing.h"

namespace moe_comm {
namespace cuda {

// Token kernels: the device twins of csrc/cpu/token_ops.h, same parameters and contracts
// (core/token_params.h). Payloads move as 16-byte vectors wherever source and destination rows
// are 16-byte aligned (packed rows always are).
cudaError_t launch_pack_rows(const PackParams& p, cudaStream_t stream);
cudaError_t launch_scatter_rows(const ScatterParams& p, cudaStream_t stream);
cudaError_t launch_reduce_rows(const ReduceParams& p, cudaStream_t stream);
cudaError_t launch_row_dots(const DotParams& p, cudaStream_t stream);

// The send plan and the expand plan (bodies/plan.h), one cooperative launch each (plan.cu).
// plan_workers: how many workers a plan over `items` uses on the GPU (args.split.workers).
int64_t plan_workers(int64_t items);
// capacity (may be null): pairs past it dropped first, in the same launch (a.topk_idx points
// at capacity->kept_idx then).
cudaError_t launch_send_plan(const bodies::SendPlanArgs& a, const bodies::CapacityArgs* capacity,
                             cudaStream_t stream);
// The plan, then each arrived row copied into its expert rows (s: the scatter of a.row_map).
cudaError_t launch_expand(const bodies::ExpandPlanArgs& a, const ScatterParams& s, cudaStream_t stream);

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

// Loads every moe_comm kernel on the current device now, instead of at its
// first launch: under lazy module loading a first launch takes the context lock and waits for
// the device, which can stall or deadlock against a collective in flight on another stream
// (CUDA review R1). Called when an engine is made for a CUDA device.
cudaError_t preload_token_kernels();
cudaError_t preload_plan_kernels();
cudaError_t preload_routing_kernels();
cudaError_t preload_header_kernels();
cudaError_t preload_map_kernels();
inline cudaError_t preload_kernels() {
  cudaError_t (*const each[])() = {preload_token_kernels, preload_plan_kernels, preload_routing_kernels,
                                   preload_header_kernels, preload_map_kernels};
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
