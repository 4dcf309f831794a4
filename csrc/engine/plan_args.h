// What both backends do around the plan bodies (kernels/bodies/plan.h): allocate a plan's
// arrays and point the body's arguments at them. The backends differ only in how they run
// the passes (a loop, or one cooperative launch) and in how many workers they split into.
#pragma once

#include "../kernels/bodies/plan.h"
#include "device.h"

namespace moe_comm {
namespace engine {

struct SendPlanWork {
  bodies::SendPlanArgs args;
  Array table;  // the passes' scratch: keep it until they have run
};

// The counts-only plan: distinct tokens per rank of a routing, nothing else.
inline SendPlanWork prepare_token_count(const Routing& r, int64_t workers, Allocator& alloc, int64_t* tokens_per_rank) {
  SendPlanWork w;
  w.table = alloc.allocate(workers * (r.num_ranks + 1) * int64_t(sizeof(int64_t)));
  bodies::SendPlanArgs& a = w.args;
  a.topk_idx = r.topk_idx;
  a.num_tokens = r.num_tokens;
  a.topk = r.topk;
  a.num_experts = r.num_experts;
  a.num_dests = r.num_ranks;
  a.split = bodies::WorkSplit{r.num_tokens, workers};
  a.table = w.table.as<int64_t>();
  a.rows_per_dest = tokens_per_rank;
  return w;
}

// Everything of `plan` but send_token, whose size the caller picks (exact once the counts are
// known on the CPU, the worst case on CUDA, where they are not).
inline SendPlanWork prepare_send_plan(const Routing& r, int64_t workers, Allocator& alloc, StagePlan& plan) {
  auto i64 = [&](int64_t n) { return alloc.allocate(n * int64_t(sizeof(int64_t))); };
  plan.num_in = r.num_tokens;
  plan.status = i64(1);
  plan.rows_per_dest = i64(r.num_ranks);
  plan.pairs_per_expert = i64(r.num_experts);
  plan.send_offsets = i64(r.num_ranks + 1);
  plan.pair_slot = i64(r.num_tokens * r.topk);
  plan.first_slot = i64(r.num_tokens * r.topk);
  SendPlanWork w = prepare_token_count(r, workers, alloc, plan.rows_per_dest.as<int64_t>());
  bodies::SendPlanArgs& a = w.args;
  a.bad_code = kRoutingCode;
  a.status = plan.status.as<int64_t>();
  a.send_offsets = plan.send_offsets.as<int64_t>();
  a.pairs_per_expert = plan.pairs_per_expert.as<int64_t>();
  a.pair_slot = plan.pair_slot.as<int64_t>();
  a.first_slot = plan.first_slot.as<int64_t>();
  a.stride = plan.stride;
  return w;
}

struct CapacityWork {
  bodies::CapacityArgs args;
  Array table, starts, grouped, last_kept;  // scratch, as above
};

// Drops pairs past capacity into plan.kept_idx, and points the send plan at it (the rules are
// still checked on the caller's routing).
inline CapacityWork prepare_capacity(const Routing& r, const Capacity& c, int64_t workers, Allocator& alloc,
                                     StagePlan& plan, bodies::SendPlanArgs& send) {
  auto i64 = [&](int64_t n) { return alloc.allocate(n * int64_t(sizeof(int64_t))); };
  const int64_t pairs = r.num_tokens * r.topk;
  plan.kept_idx = i64(pairs);
  plan.dropped = i64(1);
  CapacityWork w;
  w.table = i64(workers * r.num_experts);
  w.starts = i64(r.num_experts + 1);
  w.grouped = i64(pairs);
  w.last_kept = i64(r.num_experts);
  bodies::CapacityArgs& a = w.args;
  a.topk_idx = r.topk_idx;
  a.weights = c.weights;
  a.num_tokens = r.num_tokens;
  a.topk = r.topk;
  a.num_experts = r.num_experts;
  a.capacity = c.capacity;
  a.by_weight = c.by_weight;
  a.split = bodies::WorkSplit{pairs, workers};
  a.table = w.table.as<int64_t>();
  a.starts = w.starts.as<int64_t>();
  a.grouped = w.grouped.as<int64_t>();
  a.last_kept = w.last_kept.as<int64_t>();
  a.kept_idx = plan.kept_idx.as<int64_t>();
  a.dropped = plan.dropped.as<int64_t>();
  send.rule_idx = r.topk_idx;
  send.topk_idx = a.kept_idx;
  return w;
}

struct ExpandPlanWork {
  bodies::ExpandPlanArgs args;
  Array table, starts;  // scratch, as above
};

// announced, padded, source_starts: ExpandArgs::expert_offsets, padded_offsets and
// source_starts where the backend reads them (on the device for CUDA).
inline ExpandPlanWork prepare_expand(const ExpandArgs& e, int64_t workers, const int64_t* announced,
                                     const int64_t* padded, const int64_t* source_starts, Allocator& alloc) {
  MOE_HOST_ASSERT(e.fixed.on() ? e.fixed.sticky != nullptr : e.status != nullptr, "the expand needs a status word");
  MOE_HOST_ASSERT(e.block_rows == 0 || e.fixed.on() || (padded && source_starts),
                  "blocks need padded offsets and source starts");
  ExpandPlanWork w;
  bodies::ExpandPlanArgs& a = w.args;
  a.experts = e.experts_per_rank;
  a.block_rows = e.block_rows;
  a.sources = e.block_rows ? e.sources : 1;
  a.source_starts = source_starts;
  w.table = alloc.allocate(workers * a.columns() * int64_t(sizeof(int64_t)));
  w.starts = alloc.allocate((a.columns() + 1) * int64_t(sizeof(int64_t)));  // + the verdict
  a.rows = e.rows;
  a.num_rows = e.num_rows;
  a.row_bytes = e.fmt.row_bytes;
  a.meta_offset = e.fmt.meta_offset;
  a.topk = e.topk;
  a.row_order = e.row_order;
  a.split = bodies::WorkSplit{e.num_rows, workers};
  a.table = w.table.as<int64_t>();
  a.starts = w.starts.as<int64_t>();
  a.announced = announced;
  a.status = e.status;
  a.bad_status = e.bad_status;
  a.row_map = e.row_map;
  a.slot_weights = e.slot_weights;
  a.recv_weights = e.recv_weights;
  a.padded = padded;
  a.recv_x = e.recv_x;
  a.out_row_bytes = e.out_row_bytes();
  a.recv_scales = e.recv_scales;
  a.scale_row_bytes = e.scale_row_bytes();
  a.fixed = e.fixed;
  return w;
}

}  // namespace engine
}  // namespace moe_comm
