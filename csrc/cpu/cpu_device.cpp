#include "cpu_device.h"

#include <cstring>
#include <vector>

#include "../core/error.h"
#include "../kernels/bodies/maps.h"
#include "token_ops.h"

namespace moe_comm {
namespace cpu {

void CpuDevice::plan_send(const Routing& r, engine::Allocator& alloc, engine::StagePlan& plan) {
  const int64_t W = r.num_ranks, T = r.num_tokens, K = r.topk;
  plan.num_in = T;
  plan.status = alloc.allocate(int64_t(sizeof(int64_t)));
  *plan.status.as<int64_t>() = find_routing_problem(r).kind == RoutingProblem::kOk ? 0 : engine::kRoutingCode;
  plan.rows_per_dest = alloc.allocate(W * int64_t(sizeof(int64_t)));
  plan.pairs_per_expert = alloc.allocate(r.num_experts * int64_t(sizeof(int64_t)));
  plan.send_offsets = alloc.allocate((W + 1) * int64_t(sizeof(int64_t)));
  int64_t* rows = plan.rows_per_dest.as<int64_t>();
  count_layout(r, rows, plan.pairs_per_expert.as<int64_t>());
  int64_t* offsets = plan.send_offsets.as<int64_t>();
  offsets[0] = 0;
  for (int64_t d = 0; d < W; ++d) offsets[d + 1] = offsets[d] + rows[d];
  plan.num_send = offsets[W];
  plan.send_token = alloc.allocate(plan.num_send * int64_t(sizeof(int64_t)));
  plan.pair_slot = alloc.allocate(T * K * int64_t(sizeof(int64_t)));
  plan.first_slot = alloc.allocate(T * K * int64_t(sizeof(int64_t)));
  fill_send_plan(r, offsets, plan.send_token.as<int64_t>(), plan.pair_slot.as<int64_t>(),
                 plan.first_slot.as<int64_t>());
}

void CpuDevice::count_tokens(const Routing& r, engine::Allocator&, int64_t* tokens_per_rank) {
  count_layout(r, tokens_per_rank, nullptr);
}

engine::Array CpuDevice::upload(const void* host, int64_t bytes, engine::Allocator& alloc) {
  engine::Array a = alloc.allocate(bytes);
  if (bytes) std::memcpy(a.data, host, bytes);
  return a;
}

void CpuDevice::fill_header(const engine::HeaderFill& h) {
  for (int64_t d = 0; d < h.size; ++d) engine::fill_header_row(h, d);
}

void CpuDevice::relay_header(const engine::HeaderRelay& h) {
  for (int64_t l = 0; l < h.size; ++l) engine::relay_header_row(h, l);
}

void CpuDevice::fill_zero(void* data, int64_t bytes) {
  if (bytes) std::memset(data, 0, bytes);
}

void CpuDevice::download(const std::vector<Transfer>& items) {
  for (const Transfer& t : items) {
    if (t.bytes) std::memcpy(t.dst, t.src, t.bytes);
  }
}

void CpuDevice::pack_rows(const PackParams& p) { cpu::pack_rows(p); }

void CpuDevice::read_slot_meta(const uint8_t* rows, int64_t num_rows, const RowFormat& fmt, int64_t topk,
                               int64_t* idx, float* weights) {
  for (int64_t at = 0; at < num_rows * topk; ++at) {
    bodies::read_slot_meta(rows, fmt.row_bytes, fmt.meta_offset, topk, at, idx, weights);
  }
}

void CpuDevice::expand(const engine::ExpandArgs& a, engine::Allocator&) {
  ExpandPlanParams plan;
  plan.rows = a.rows;
  plan.num_rows = a.num_rows;
  plan.fmt = a.fmt;
  plan.topk = a.topk;
  plan.experts_per_rank = a.experts_per_rank;
  plan.row_order = a.row_order;
  std::vector<int64_t> counts(a.experts_per_rank);
  count_recv_experts(plan, counts.data());
  for (int64_t e = 0; e < a.experts_per_rank; ++e) {
    // The outputs were sized from the header's counts: prove them right (free on the CPU).
    MOE_HOST_ASSERT(counts[e] == a.expert_offsets[e + 1] - a.expert_offsets[e],
                    "the header announced " << a.expert_offsets[e + 1] - a.expert_offsets[e]
                                            << " rows for local expert " << e << ", " << counts[e] << " arrived");
  }
  fill_expand_plan(plan, a.expert_offsets, a.row_map, a.slot_weights, a.recv_weights);
  cpu::scatter_rows(engine::expand_scatter(a));
}

void CpuDevice::scatter_rows(const ScatterParams& p) { cpu::scatter_rows(p); }
void CpuDevice::reduce_rows(const ReduceParams& p) { cpu::reduce_rows(p); }
void CpuDevice::row_dots(const DotParams& p) { cpu::row_dots(p); }

void CpuDevice::compose_own_slot(const int64_t* first_slot, int64_t num_in, int64_t topk, const int64_t* map,
                                 const float* weights, int64_t* out_map, float* out_weights) {
  for (int64_t at = 0; at < num_in * topk; ++at) {
    bodies::compose_own_slot(first_slot, topk, map, weights, at, out_map, out_weights);
  }
}

void CpuDevice::collect_pairs(const float* per_slot, int64_t per_slot_stride, const int64_t* pair_slot,
                              int64_t num_in, int64_t topk, float* out) {
  for (int64_t at = 0; at < num_in * topk; ++at) bodies::collect_pair(per_slot, per_slot_stride, pair_slot, topk, at, out);
}

void CpuDevice::gather_masked(const float* values, const int64_t* index, int64_t count, float* out) {
  for (int64_t at = 0; at < count; ++at) bodies::gather_masked(values, index, at, out);
}

void CpuDevice::mask_by_map(const uint8_t* rows, int64_t stride, const int64_t* map, int64_t num_rows, int64_t topk,
                            float* out) {
  for (int64_t at = 0; at < num_rows * topk; ++at) bodies::mask_by_map(rows, stride, map, topk, at, out);
}

}  // namespace cpu
}  // namespace moe_comm
