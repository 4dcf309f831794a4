#include "cpu_device.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "../core/error.h"
#include "../engine/plan_args.h"
#include "../kernels/bodies/maps.h"
#include "token_ops.h"

namespace moe_comm {
namespace cpu {

namespace {

// The plans' workers are the emulated lanes (1 unless a test asks for more), so the CPU suite
// runs the chunked passes the GPU runs, with any split.
int64_t plan_workers(int64_t items) { return std::max<int64_t>(1, std::min(items, emulated_lanes())); }

void count_pass(const bodies::SendPlanArgs& a) {
  for (int64_t w = 0; w < a.split.workers; ++w) bodies::send_plan_count(a, w);
  const int64_t columns = bodies::send_plan_column_count(a);
  for (int64_t c = 0; c < columns; ++c) bodies::send_plan_column(a, c);
}

// The outputs were sized from the headers' counts: prove them right (free on the CPU; on CUDA
// the plan places nothing then, and the next dispatch's header reports it). The static mode
// reads no header: its problems wait in the sticky word, as on CUDA.
void check_arrivals(const engine::ExpandArgs& e, const bodies::ExpandPlanArgs& a, int64_t bad_slots,
                    const std::vector<int64_t>& arrived) {
  MOE_HOST_ASSERT(bad_slots == 0, bad_slots << " arrived slot(s) name a local expert outside [0, "
                                            << a.experts << ")");
  for (int64_t x = 0; x < a.experts; ++x) {
    const int64_t announced = e.expert_offsets[x + 1] - e.expert_offsets[x];
    MOE_HOST_ASSERT(arrived[x] == announced, "the header announced " << announced << " rows for local expert " << x
                                                                     << ", " << arrived[x] << " arrived");
  }
  MOE_HOST_ASSERT(*a.status == 0, "more rows arrived from one source rank for one expert than its block of "
                                      << a.block_rows << " holds");
}

}  // namespace

void CpuDevice::plan_send(const Routing& r, const engine::Capacity& capacity, engine::Allocator& alloc,
                          engine::StagePlan& plan) {
  engine::SendPlanWork work = engine::prepare_send_plan(r, plan_workers(r.num_tokens), alloc, plan);
  bodies::SendPlanArgs& a = work.args;
  if (capacity.on()) {
    const engine::CapacityWork cw =
        engine::prepare_capacity(r, capacity, plan_workers(r.num_tokens * r.topk), alloc, plan, a);
    const bodies::CapacityArgs& c = cw.args;
    for (int64_t w = 0; w < c.split.workers; ++w) bodies::capacity_count(c, w);
    for (int64_t e = 0; e < c.num_experts; ++e) bodies::capacity_column(c, e);
    bodies::capacity_starts(c);
    for (int64_t w = 0; w < c.split.workers; ++w) bodies::capacity_group(c, w);
    for (int64_t e = 0; e < c.num_experts; ++e) bodies::capacity_select(c, e);
    for (int64_t w = 0; w < c.split.workers; ++w) bodies::capacity_keep(c, w);
  }
  count_pass(a);
  bodies::send_plan_starts(a);
  plan.num_send = a.send_offsets[r.num_ranks];
  plan.send_token = alloc.allocate(plan.num_send * int64_t(sizeof(int64_t)));  // exact: the counts are here
  a.send_token = plan.send_token.as<int64_t>();
  for (int64_t j = 0; j < bodies::send_plan_slots(a); ++j) bodies::send_plan_clear(a, j);
  for (int64_t w = 0; w < a.split.workers; ++w) bodies::send_plan_fill(a, w);
}

void CpuDevice::count_tokens(const Routing& r, engine::Allocator& alloc, int64_t* tokens_per_rank) {
  count_pass(engine::prepare_token_count(r, plan_workers(r.num_tokens), alloc, tokens_per_rank).args);
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

void CpuDevice::download(const std::vector<Transfer>& items, const std::string&) {
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

void CpuDevice::expand(const engine::ExpandArgs& e, engine::Allocator& alloc) {
  engine::ExpandPlanWork work =
      engine::prepare_expand(e, plan_workers(e.num_rows), e.expert_offsets, e.padded_offsets, e.source_starts, alloc);
  const bodies::ExpandPlanArgs& a = work.args;
  for (int64_t w = 0; w < a.split.workers; ++w) bodies::expand_plan_count(a, w);
  for (int64_t c = 0; c <= a.buckets(); ++c) bodies::expand_plan_column(a, c);
  const int64_t bad_slots = a.starts[a.buckets()];
  std::vector<int64_t> arrived(a.experts, 0);  // per local expert, before the starts pass
  for (int64_t b = 0; b < a.buckets(); ++b) arrived[b % a.experts] += a.starts[b];
  bodies::expand_plan_starts(a);
  if (!a.fixed.on()) check_arrivals(e, a, bad_slots, arrived);
  for (int64_t w = 0; w < a.split.workers; ++w) bodies::expand_plan_fill(a, w);
  for (int64_t r = 0; a.padding() && r < a.output_rows(); ++r) {
    each_lane([&](bodies::Lanes l) { bodies::zero_if_padding(a, r, l); });
  }
  cpu::scatter_rows(engine::expand_scatter(e));
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
