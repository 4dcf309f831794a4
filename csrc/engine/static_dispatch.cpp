// The static mode: a flat dispatch with pad_to_capacity under a token budget, whose every size
// is known before the call, so that nothing waits for the device (CUDA graphs can capture it).
//
// Each rank sends every peer exactly B = min(max_tokens_per_rank, E_local * C) rows (capacity
// bounds what one rank can send one peer; unused rows go as zeros naming no expert), so the row
// exchange needs no counts. The header still travels, where the counts live, and the expand
// checks it there: a peer's status or a disagreement places nothing (zeros out) and is kept in
// a sticky word, reported by the next header read back or by Buffer.check().
//
// The headers are read back (one host wait) on a rank's first static call, and whenever its
// call (hidden, dtype, top-k, C, B) differs from the last one every rank read and agreed on:
// then a changed call on one rank is found before any row moves. A rank that reads a problem
// joins the row exchanges of the peers that did not read (the header says which), sending
// zeros of the sizes they expect, so that nobody waits for rows that never come.
#include <algorithm>

#include "engine.h"

namespace moe_comm {
namespace engine {

DispatchResult Engine::dispatch_static(const RowsIn& x, const int64_t* topk_idx, int64_t topk, const float* weights,
                                       const Capacity& capacity, int64_t alignment, int64_t static_tokens,
                                       const DispatchWire& wire) {
  MOE_HOST_ASSERT(stages_.size() == 1, "the static mode needs a flat Buffer");
  MOE_HOST_ASSERT(capacity.on(), "the static mode needs a capacity");
  const StageSpec& stage = stages_[0];
  const int64_t W = stage.size, C = capacity.capacity;
  const int64_t B = std::min(static_tokens, experts_per_rank_ * C);
  DispatchResult out;
  CallFacts call;
  call.num_experts = num_experts_;
  call.hidden = x.cols;
  call.dtype = dtype_fact(x.dtype, wire);
  call.topk = topk;
  call.block_rows = C + 1;
  call.static_rows = B;
  const std::vector<int64_t> signature{call.hidden, call.dtype, call.topk, call.block_rows, call.static_rows};
  const bool reads = signature != agreed_signature_;

  auto layout = std::make_shared<DispatchLayout>();
  layout->dtype_fact = call.dtype;
  layout->plans.resize(1);
  StagePlan& plan = layout->plans[0];
  plan.stride = B;
  launch();
  device_->plan_send(Routing{topk_idx, x.rows, topk, num_experts_, W}, capacity, *allocator_, plan);
  const int64_t* routed = plan.kept_idx.as<int64_t>();
  layout->dropped = plan.dropped;

  Headers h;
  out.problem = exchange_headers(call, Problem{}, &plan, nullptr, h, layout->stats, reads);
  if (out.problem.any()) {
    settle_with_static_peers(h, true);
    return out;  // no token has moved
  }
  if (reads) agreed_signature_ = signature;

  plan.send_rows.assign(W, B);
  plan.recv_rows.assign(W, B);
  plan.num_send = plan.num_recv = W * B;
  const RowFormat fmt = dispatch_row_format(x.cols, call.dtype, topk, sizeof(SlotMeta));
  uint8_t* arrived =
      pack_and_send(stage, plan, x, fmt, routed, weights, topk, nullptr, "dispatch/" + stage.name, wire);

  // Every expert's segment: W blocks of C rows, then zero rows up to the alignment.
  const int64_t segment = (W * C + alignment - 1) / alignment * alignment;
  const int64_t R = experts_per_rank_ * segment, N = W * B;
  layout->tokens_per_expert.assign(experts_per_rank_, segment);
  layout->padded = R > 0;
  ExpandArgs a = prepare_outputs(x, topk, arrived, N, R, wire, *layout, out);
  a.block_rows = C;
  a.sources = W;
  a.fixed = StaticExpand{std::max<int64_t>(B, 1), segment, h.received_on_device[0].as<int64_t>(), h.layouts[0], call,
                         world_size_, sticky_.as<int64_t>()};
  a.bad_status = (world_size_ - rank_) << 8 | kStaticFlag | (kEarlierCombine + kArrivalMismatch);
  launch();
  device_->expand(a, *allocator_);
  layout->fixed = true;
  if (agrees_at_once(h, true)) out.static_status = agree();
  finish_layout(x, topk, N, R, *layout);  // the wire's stats: B rows to every peer
  out.layout = layout;
  return out;
}

bool Engine::agrees_at_once(const Headers& h, bool static_here) const {
  // With immediate statuses, a static call ends with the status agreement (every rank raises
  // in the call); so does every rank that sees a static peer in its headers.
  if (defer_status_ || stages_.size() != 1 || stages_[0].size == 1) return false;
  if (static_here) return true;
  const HeaderLayout& l = h.layouts[0];
  for (int64_t p = 0; p < stages_[0].size; ++p) {
    if (h.received[0][p * l.width() + kStaticRows] > 0) return true;
  }
  return false;
}

void Engine::settle_with_static_peers(const Headers& h, bool static_here) {
  if (stages_.size() != 1 || stages_[0].size == 1 || h.received.empty()) return;
  const StageSpec& stage = stages_[0];
  const HeaderLayout& l = h.layouts[0];
  std::vector<int64_t> bytes(stage.size, 0);  // what each such peer sends and expects: its own call
  int64_t total = 0;
  for (int64_t p = 0; p < stage.size; ++p) {
    const int64_t* row = h.received[0].data() + p * l.width();
    if (p == stage.index || row[kReads] != 0 || row[kStaticRows] <= 0) continue;
    const RowFormat fmt = dispatch_row_format(row[kHidden], row[kDtype], row[kTopk], sizeof(SlotMeta));
    bytes[p] = row[kStaticRows] * fmt.row_bytes;
    total += bytes[p];
  }
  if (total > 0) {  // zeros: the peer's expand sees this rank's status and places nothing
    const std::string name = "dispatch/" + stage.name;
    uint8_t* zeros = workspace(name + "/settle", 2 * total);
    launch();
    device_->fill_zero(zeros, total);
    ++current_->exchanges;
    stage.transport->all_to_all(zeros, bytes, zeros + total, bytes, nullptr, nullptr, name, ++sequence_[name]);
  }
  if (agrees_at_once(h, static_here)) agree();
}

int64_t Engine::agree_status() {
  begin("check");
  return agree();
}

int64_t Engine::agree() {
  std::vector<int64_t> mine(1 + pending_used_, 0);
  std::vector<Device::Transfer> copies{{sticky_.data, mine.data(), int64_t(sizeof(int64_t))}};
  if (pending_used_) copies.push_back({pending_.data, mine.data() + 1, pending_used_ * int64_t(sizeof(int64_t))});
  if (!device_->host_readable()) ++current_->host_waits;
  device_->download(copies, "check");
  int64_t status = mine[0];
  // Deferred combine statuses not yet folded into a header count as well, as the header would
  // have reported them.
  int64_t combine = pending_folded_;
  for (size_t i = 1; i < mine.size(); ++i) combine = std::max(combine, mine[i]);
  if (combine != 0) {
    status = std::max(status, (combine >> 8) << 8 | kStaticFlag | (kEarlierCombine + (combine & 0xFF)));
  }
  clear_reported(combine != 0, mine[0] != 0);
  // Agreed over every stage: MAX, so the lowest bad rank wins (rail, then node: every rank).
  const bool deferred = defer_status_;
  defer_status_ = false;  // this exchange reads its statuses at once
  try {
    for (const StageSpec& stage : stages_) {
      if (stage.size == 1) continue;
      const std::vector<int64_t> none(stage.size, 0);
      uint8_t* dummy = workspace("check/rows", kRowAlignBytes);
      exchange(stage, dummy, none, dummy, none, kRowAlignBytes, &status, "check/" + stage.name);
    }
  } catch (...) {
    defer_status_ = deferred;
    throw;
  }
  defer_status_ = deferred;
  return status;
}

}  // namespace engine
}  // namespace moe_comm
