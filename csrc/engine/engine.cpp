#include "engine.h"

#include <algorithm>
#include <numeric>
#include <utility>

namespace moe_comm {
namespace engine {
namespace {

constexpr int64_t kScalarBytes = 4;  // one float32 per slot on the return wire

int64_t sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

// Rows per peer of a header: what each row's block columns add up to.
std::vector<int64_t> header_rows(const std::vector<int64_t>& header, int64_t size, const HeaderLayout& layout) {
  std::vector<int64_t> rows(size, 0);
  for (int64_t d = 0; d < size; ++d) {
    for (int64_t b = 0; b < layout.blocks; ++b) rows[d] += header[d * layout.width() + layout.rows_col() + b];
  }
  return rows;
}

}  // namespace

Engine::Engine(std::vector<StageSpec> stages, int64_t rank, int64_t world_size, int64_t num_experts,
               std::shared_ptr<Device> device, std::shared_ptr<Allocator> allocator)
    : stages_(std::move(stages)), rank_(rank), world_size_(world_size), num_experts_(num_experts),
      experts_per_rank_(num_experts / world_size), device_(std::move(device)), allocator_(std::move(allocator)) {
  MOE_HOST_ASSERT(stages_.size() == 1 || stages_.size() == 2, "an engine has 1 or 2 stages, got " << stages_.size());
  for (const StageSpec& s : stages_) {
    MOE_HOST_ASSERT(s.size == 1 || s.transport, "stage " << s.name << " of size " << s.size << " has no transport");
    MOE_HOST_ASSERT(int64_t(s.global_ranks.size()) == s.size && int64_t(s.remote.size()) == s.size,
                    "stage " << s.name << ": ranks and remote flags must list every destination");
  }
  // Words that live as long as the engine, made here so that no call allocates or uploads them
  // (a call may be under CUDA graph capture).
  int64_t largest = 1;
  for (const StageSpec& s : stages_) largest = std::max(largest, s.size);
  const std::vector<int64_t> zeros(largest, 0);
  zero_status_ = device_->upload(zeros.data(), largest * int64_t(sizeof(int64_t)), *allocator_);
  sticky_ = device_->upload(zeros.data(), int64_t(sizeof(int64_t)), *allocator_);
  pending_ = allocate(pending_capacity() * int64_t(sizeof(int64_t)));
  int64_t copied = 0;  // the copies are done before any stream of a call reads the words
  device_->download({{sticky_.data, &copied, int64_t(sizeof(int64_t))}}, "setup");
}

int64_t Engine::pending_capacity() const {
  // Room for the statuses of several combines between two dispatches (micro-batches).
  return 16 * (stages_[0].size + (stages_.size() > 1 ? stages_[1].size : 0));
}

void Engine::begin(const std::string& kind) {
  current_ = &counters_[kind];
  *current_ = Counters{};
  if (!captured_ && device_->capturing()) captured_ = true;
}

const Counters& Engine::counters(const std::string& kind) const {
  static const Counters none;
  auto it = counters_.find(kind);
  return it == counters_.end() ? none : it->second;
}

int64_t Engine::workspace_bytes() const {
  int64_t total = 0;
  for (const auto& w : workspaces_) total += w.second.bytes;
  return total;
}

uint8_t* Engine::workspace(const std::string& name, int64_t bytes) {
  Array& w = workspaces_[name];
  if (w.bytes < bytes || !w.data) {
    // A CUDA graph captured earlier keeps writing the old block at each replay: keep it.
    if (captured_ && w.data) retired_.push_back(w);
    w = allocate(bytes + bytes / 4);  // grow-only: fresh pages fault on every call
  }
  return w.data;
}

void Engine::clear_reported(bool combines, bool sticky) {
  pending_used_ = pending_folded_ = 0;
  // Error paths only (their launches are not in the budgets). A captured header reads these
  // words again at each replay: what was reported must not be reported again.
  if (combines) {
    launch();
    device_->fill_zero(pending_.data, pending_.bytes);
  }
  if (sticky) {
    launch();
    device_->fill_zero(sticky_.data, int64_t(sizeof(int64_t)));
  }
}

int64_t* Engine::reserve_pending(int64_t count) {
  if (pending_used_ + count > pending_capacity()) {  // full: read them back now (a host wait, rare)
    std::vector<int64_t> seen(pending_used_);
    ++current_->host_waits;
    device_->download({{pending_.data, seen.data(), pending_used_ * int64_t(sizeof(int64_t))}}, "combine/status");
    for (int64_t v : seen) pending_folded_ = std::max(pending_folded_, v);
    pending_used_ = 0;
  }
  int64_t* at = pending_.as<int64_t>() + pending_used_;
  pending_used_ += count;
  return at;
}

void Engine::exchange(const StageSpec& stage, const uint8_t* send, const std::vector<int64_t>& send_rows,
                      uint8_t* recv, const std::vector<int64_t>& recv_rows, int64_t row_bytes, int64_t* status,
                      const std::string& name) {
  std::vector<int64_t> send_bytes(send_rows.size()), recv_bytes(recv_rows.size());
  for (size_t p = 0; p < send_rows.size(); ++p) send_bytes[p] = send_rows[p] * row_bytes;
  for (size_t p = 0; p < recv_rows.size(); ++p) recv_bytes[p] = recv_rows[p] * row_bytes;
  // The status words live where the wire reads them (the device for NCCL).
  const int64_t status_bytes = stage.size * int64_t(sizeof(int64_t));
  Array status_out, status_in;
  int64_t* landed = nullptr;
  if (status) {
    const std::vector<int64_t> mine(stage.size, *status);
    status_out = *status == 0 ? zero_status_ : device_->upload(mine.data(), status_bytes, *allocator_);
    if (defer_status_) {
      landed = reserve_pending(stage.size);
    } else {
      status_in = allocate(status_bytes);
      landed = status_in.as<int64_t>();
    }
  }
  ++current_->exchanges;
  stage.transport->all_to_all(send, send_bytes, recv, recv_bytes, status_out.as<int64_t>(), landed, name,
                              ++sequence_[name]);
  if (status && !defer_status_) {
    std::vector<int64_t> theirs(stage.size);
    if (!device_->host_readable()) ++current_->host_waits;
    device_->download({{landed, theirs.data(), status_bytes}}, name);
    for (int64_t s : theirs) *status = std::max(*status, s);  // MAX: the lowest bad rank wins
  }
}

uint8_t* Engine::pack_and_send(const StageSpec& stage, const StagePlan& plan, const RowsIn& rows, const RowFormat& fmt,
                               const int64_t* idx, const float* weights, int64_t topk, int64_t* status,
                               const std::string& name, const DispatchWire& fp8) {
  uint8_t* send = workspace(name + "/send", plan.num_send * fmt.row_bytes);
  PackParams p;
  p.src = rows.data;
  p.src_stride = rows.stride_bytes;
  p.send_token = plan.send_token.as<int64_t>();
  p.send_offsets = plan.send_offsets.as<int64_t>();
  p.num_ranks = stage.size;
  p.num_rows = plan.num_send;
  p.dst = send;
  p.fmt = fmt;
  p.topk_idx = idx;
  p.topk_weights = weights;
  p.topk = topk;
  p.experts_per_rank = stage.experts_per_dest;
  p.quantize = fmt.fp8() && !fp8.prequantized;
  p.quantize_from = rows.dtype;
  p.scales = fp8.scales;
  p.scales_stride = fp8.scales_stride;
  launch();
  device_->pack_rows(p);
  if (stage.size == 1) return send;  // no wire: what this rank sends itself is what arrives
  uint8_t* recv = workspace(name + "/recv", plan.num_recv * fmt.row_bytes);
  exchange(stage, send, plan.send_rows, recv, plan.recv_rows, fmt.row_bytes, status, name);
  return recv;
}

void Engine::reduce_rows(const RowsIn& src, const int64_t* map, const float* weights, int64_t topk, int64_t num_out,
                         uint8_t* dst, int64_t dst_stride, const float* scalars, int64_t scalars_offset) {
  ReduceParams r;
  r.src = src.data;
  r.src_stride = src.stride_bytes;
  r.src_dtype = src.dtype;
  r.map = map;
  r.num_out = num_out;
  r.topk = topk;
  r.weights = weights;
  r.hidden = src.cols;
  r.dst = dst;
  r.dst_stride = dst_stride;
  r.dst_dtype = src.dtype;
  r.scalars = scalars;
  r.scalars_offset = scalars_offset;
  launch();
  device_->reduce_rows(r);
}

// ---- dispatch -------------------------------------------------------------------------------

Problem Engine::exchange_headers(const CallFacts& call, const Problem& local, const StagePlan* plan0,
                                 const int64_t* forward, Headers& h, LinkStats& stats, bool reads) {
  const StageSpec& first = stages_[0];
  if (stages_.size() == 1) {
    h.layouts = {HeaderLayout{1, 0, experts_per_rank_}};
  } else {
    h.layouts = {HeaderLayout{1, stages_[1].size, first.experts_per_dest},
                 HeaderLayout{first.size, 0, stages_[1].experts_per_dest}};
  }
  const size_t n = stages_.size();
  h.sent_on_device.resize(n);
  h.received_on_device.resize(n);
  HeaderFixed fixed{call, rank_, local, local.any() ? nullptr : plan0->status.as<int64_t>()};
  // Deferred combine statuses ride in this header; read once the headers are (below).
  fixed.world = world_size_;
  fixed.pending = pending_.as<int64_t>();
  fixed.pending_count = pending_used_;
  fixed.pending_folded = pending_folded_;
  fixed.sticky = reads ? sticky_.as<int64_t>() : nullptr;
  fixed.reads = reads;
  for (size_t j = 0; j < n; ++j) {
    const StageSpec& stage = stages_[j];
    const int64_t bytes = stage.size * h.layouts[j].width() * int64_t(sizeof(int64_t));
    h.sent_on_device[j] = allocate(bytes);
    if (j == 0) {
      HeaderFill fill{h.sent_on_device[0].as<int64_t>(), stage.size, h.layouts[0], fixed, nullptr, forward, nullptr};
      if (!local.any()) {
        fill.rows_per_dest = plan0->rows_per_dest.as<int64_t>();
        fill.pairs = plan0->pairs_per_expert.as<int64_t>();
      }
      launch();
      device_->fill_header(fill);
    } else {  // the forwarder's node header, from what its rail peers told it, where it lives
      const StageSpec& rail = stages_[0];
      HeaderRelay relay{h.received_on_device[0].as<int64_t>(), h.layouts[0], rail.size,
                        rail.global_ranks[0], rail.size > 1 ? rail.global_ranks[1] - rail.global_ranks[0] : 1,
                        h.sent_on_device[1].as<int64_t>(), stage.size, h.layouts[1], fixed};
      launch();
      device_->relay_header(relay);
    }
    if (stage.size == 1) {
      h.received_on_device[j] = h.sent_on_device[j];
      continue;
    }
    h.received_on_device[j] = allocate(bytes);
    const std::vector<int64_t> one(stage.size, 1);
    exchange(stage, h.sent_on_device[j].data, one, h.received_on_device[j].data, one,
             h.layouts[j].width() * int64_t(sizeof(int64_t)), nullptr, "dispatch/" + stage.name + "/header");
  }
  if (!reads) {  // the static mode: the fill folded the pending statuses on the device
    clear_reported(false, false);
    return Problem{};
  }
  // The dispatch's one host wait: every header at once; they size everything that follows.
  std::vector<Device::Transfer> copies;
  h.sent.resize(n);
  h.received.resize(n);
  for (size_t j = 0; j < n; ++j) {
    const int64_t count = stages_[j].size * h.layouts[j].width();
    h.sent[j].resize(count);
    h.received[j].resize(count);
    copies.push_back({h.sent_on_device[j].data, h.sent[j].data(), count * int64_t(sizeof(int64_t))});
    copies.push_back({h.received_on_device[j].data, h.received[j].data(), count * int64_t(sizeof(int64_t))});
  }
  if (!local.any() && plan0->dropped.data) {  // capacity's count rides in the same wait
    copies.push_back({plan0->dropped.data, &stats.pairs_dropped, int64_t(sizeof(int64_t))});
  }
  int64_t sticky = 0;  // reported by this header (unless this rank's input was rejected)
  copies.push_back({sticky_.data, &sticky, int64_t(sizeof(int64_t))});
  ++current_->host_waits;
  device_->download(copies, "dispatch/header");
  const int64_t reported = h.sent[0][kStatus];
  clear_reported(!local.any() && reported >= kEarlierCombine && reported < kStaticFlag, !local.any() && sticky != 0);
  Problem problem = local;
  if (!problem.any() && h.sent[0][kStatus] != 0) {  // own routing, or a deferred combine status
    problem = Problem{h.sent[0][kStatus], h.sent[0][kBadRank], h.sent[0][kSeenBy]};
  }
  for (size_t j = 0; j < n && !problem.any(); ++j) {
    problem = find_problem(h.received[j].data(), stages_[j].size, h.layouts[j], call, stages_[j].global_ranks,
                           rank_);
  }
  return problem;
}

std::vector<uint8_t*> Engine::run_stages(const RowsIn& x, const int64_t* topk_idx, int64_t topk, const float* weights,
                                         const DispatchWire& wire, Headers& h, DispatchLayout& layout) {
  const RowFormat fmt = dispatch_row_format(x.cols, layout.dtype_fact, topk, sizeof(SlotMeta));
  RowsIn rows = x;
  DispatchWire source = wire;  // stage 0: x; later stages forward FP8 rows as they arrived
  const int64_t* idx = topk_idx;
  const float* w = weights;
  Array next_idx, next_weights;  // the next stage's routing, read from what arrived
  std::vector<uint8_t*> arrived;
  for (size_t j = 0; j < stages_.size(); ++j) {
    const StageSpec& stage = stages_[j];
    StagePlan& plan = layout.plans[j];
    if (j > 0) {
      Routing r{idx, rows.rows, topk, stage.size * stage.experts_per_dest, stage.size};
      launch();
      device_->plan_send(r, Capacity{}, *allocator_, plan);
    }
    plan.send_rows = header_rows(h.sent[j], stage.size, h.layouts[j]);
    plan.recv_rows = header_rows(h.received[j], stage.size, h.layouts[j]);
    plan.num_recv = sum(plan.recv_rows);
    plan.num_send = sum(plan.send_rows);  // a device plan is sized for the worst case
    // Headers that cannot be this plan's (a stream drained by an abort, a corrupted wire) end
    // here instead of in a kernel reading out of bounds.
    for (int64_t d = 0; d < stage.size; ++d) {
      MOE_HOST_ASSERT(plan.send_rows[d] >= 0 && plan.recv_rows[d] >= 0,
                      "stage '" << stage.name << "': negative row count in the header of destination " << d);
    }
    MOE_HOST_ASSERT(plan.num_send * int64_t(sizeof(int64_t)) <= plan.send_token.bytes,
                    "stage '" << stage.name << "' announced " << plan.num_send << " rows, more than its plan holds");
    const int64_t* planned = plan.rows_per_dest.as<int64_t>();
    for (int64_t d = 0; d < stage.size && device_->host_readable(); ++d) {
      // What the headers announced must be what the plan sends.
      MOE_HOST_ASSERT(planned[d] == plan.send_rows[d], "stage '" << stage.name << "' announced "
                                                                 << plan.send_rows[d] << " rows to destination " << d
                                                                 << " but its plan sends " << planned[d]);
    }
    uint8_t* recv = pack_and_send(stage, plan, rows, fmt, idx, w, topk, nullptr, "dispatch/" + stage.name, source);
    arrived.push_back(recv);
    rows = RowsIn{recv, fmt.row_bytes, plan.num_recv, x.cols, x.dtype};
    source = DispatchWire{wire.fp8, true, recv + fmt.scale_offset, fmt.row_bytes};
    if (j + 1 < stages_.size()) {
      next_idx = allocate(plan.num_recv * topk * int64_t(sizeof(int64_t)));
      next_weights = allocate(plan.num_recv * topk * int64_t(sizeof(float)));
      launch();
      device_->read_slot_meta(recv, plan.num_recv, fmt, topk, next_idx.as<int64_t>(), next_weights.as<float>());
      idx = next_idx.as<int64_t>();
      w = next_weights.as<float>();
    }
  }
  return arrived;
}

DispatchResult Engine::dispatch(const RowsIn& x, const int64_t* topk_idx, int64_t topk, const float* weights,
                                int64_t rejected, const Capacity& capacity, int64_t alignment,
                                bool pad_to_capacity, int64_t static_tokens, const DispatchWire& wire) {
  begin("dispatch");
  if (static_tokens > 0 && pad_to_capacity && !rejected) {
    return dispatch_static(x, topk_idx, topk, weights, capacity, alignment, static_tokens, wire);
  }
  DispatchResult out;
  CallFacts call;
  call.num_experts = num_experts_;
  Problem local;
  if (rejected) local = Problem{rejected, rank_, rank_};
  auto layout = std::make_shared<DispatchLayout>();
  layout->plans.resize(stages_.size());
  Array forward;
  const int64_t* routed = topk_idx;
  if (!local.any()) {
    call.hidden = x.cols;
    call.dtype = dtype_fact(x.dtype, wire);
    call.topk = topk;
    layout->dtype_fact = call.dtype;
    if (pad_to_capacity) {
      MOE_HOST_ASSERT(capacity.on(), "pad_to_capacity needs a capacity");
      call.block_rows = capacity.capacity + 1;  // agreed with C + 1: 0 is "not padding", even for C = 0
    }
    launch();
    device_->plan_send(Routing{topk_idx, x.rows, topk, num_experts_, stages_[0].size}, capacity, *allocator_,
                       layout->plans[0]);
    if (capacity.on()) routed = layout->plans[0].kept_idx.as<int64_t>();  // what is sent from here on
    if (stages_.size() == 2) {  // rows each rail peer will forward to each rank of its node
      forward = allocate(world_size_ * int64_t(sizeof(int64_t)));
      launch();
      device_->count_tokens(Routing{routed, x.rows, topk, num_experts_, world_size_}, *allocator_,
                            forward.as<int64_t>());
    }
  }
  Headers h;
  out.problem = exchange_headers(call, local, &layout->plans[0], forward.as<int64_t>(), h, layout->stats);
  if (out.problem.any()) {
    settle_with_static_peers(h, false);
    if (!local.any() && out.problem.rank == rank_ && out.problem.code == kRoutingCode) {
      // This rank's own routing: find the slot to name (the error path may wait on the device).
      std::vector<int64_t> idx(x.rows * topk);
      device_->download({{topk_idx, idx.data(), int64_t(idx.size() * sizeof(int64_t))}}, "dispatch/header");
      out.routing = find_routing_problem(Routing{idx.data(), x.rows, topk, num_experts_, world_size_});
    }
    return out;  // no token has moved, on any rank
  }

  std::vector<uint8_t*> arrived = run_stages(x, routed, topk, weights, wire, h, *layout);

  // The last header announced every arrival: outputs are sized without waiting on the device.
  const size_t last = stages_.size() - 1;
  const HeaderLayout& hl = h.layouts[last];
  const std::vector<int64_t>& got = h.received[last];
  const int64_t senders = stages_[last].size;
  layout->tokens_per_expert.assign(experts_per_rank_, 0);
  for (int64_t s = 0; s < senders; ++s) {
    for (int64_t e = 0; e < experts_per_rank_; ++e) {
      layout->tokens_per_expert[e] += got[s * hl.width() + hl.experts_col() + e];
    }
  }
  std::vector<int64_t> expert_offsets(experts_per_rank_ + 1, 0);
  std::partial_sum(layout->tokens_per_expert.begin(), layout->tokens_per_expert.end(), expert_offsets.begin() + 1);
  // Padding: blocks of C rows per source rank (pad_to_capacity), then zero rows to the
  // alignment, end each expert's segment.
  const int64_t block_rows = pad_to_capacity ? capacity.capacity : 0;
  std::vector<int64_t> padded_offsets;
  if (alignment > 1 || pad_to_capacity) {
    padded_offsets.assign(experts_per_rank_ + 1, 0);
    for (int64_t e = 0; e < experts_per_rank_; ++e) {
      MOE_HOST_ASSERT(!pad_to_capacity || layout->tokens_per_expert[e] <= world_size_ * block_rows,
                      "the headers announced " << layout->tokens_per_expert[e] << " rows for local expert " << e
                                               << ", more than its " << world_size_ << " blocks of " << block_rows);
      const int64_t kept = pad_to_capacity ? world_size_ * block_rows : layout->tokens_per_expert[e];
      const int64_t rows = (kept + alignment - 1) / alignment * alignment;
      padded_offsets[e + 1] = padded_offsets[e] + rows;
      layout->tokens_per_expert[e] = rows;  // grouped GEMMs see the padded segments
    }
    layout->padded = padded_offsets.back() > expert_offsets.back();
  }
  const int64_t R = padded_offsets.empty() ? expert_offsets.back() : padded_offsets.back();
  const int64_t N = layout->plans[last].num_recv;

  // Arrival order is (sender, block); the API wants (source rank, token) order. Flat: sender s
  // is the source. Hierarchical: the node stage's sender is the forwarder with local index l,
  // its block b is what rail peer b (node b) sent it, so the source is b * P + l.
  std::vector<int64_t> row_order;
  if (hl.blocks > 1) {
    std::vector<std::pair<int64_t, int64_t>> blocks;  // (source rank, arrival block index)
    std::vector<int64_t> starts;
    int64_t start = 0;
    for (int64_t s = 0; s < senders; ++s) {
      for (int64_t b = 0; b < hl.blocks; ++b) {
        blocks.emplace_back(b * senders + s, s * hl.blocks + b);
        starts.push_back(start);
        start += got[s * hl.width() + hl.rows_col() + b];
      }
    }
    std::stable_sort(blocks.begin(), blocks.end());
    row_order.reserve(N);
    for (const auto& [source, block] : blocks) {
      const int64_t count = got[(block / hl.blocks) * hl.width() + hl.rows_col() + block % hl.blocks];
      for (int64_t r = 0; r < count; ++r) row_order.push_back(starts[block] + r);
    }
  }
  ExpandArgs a = prepare_outputs(x, topk, arrived[last], N, R, wire, *layout, out);
  Array order_on_device;
  if (!row_order.empty()) {
    order_on_device = device_->upload(row_order.data(), int64_t(row_order.size() * sizeof(int64_t)), *allocator_);
  }
  a.row_order = order_on_device.as<int64_t>();
  a.expert_offsets = expert_offsets.data();
  a.padded_offsets = layout->padded ? padded_offsets.data() : nullptr;
  std::vector<int64_t> source_starts(world_size_ + 1, 0);  // API-order rows of each source rank
  if (pad_to_capacity && layout->padded) {
    for (int64_t s = 0; s < senders; ++s) {
      for (int64_t b = 0; b < hl.blocks; ++b) {  // flat: one block, the sender is the source
        source_starts[b * senders + s + 1] = got[s * hl.width() + hl.rows_col() + b];
      }
    }
    std::partial_sum(source_starts.begin(), source_starts.end(), source_starts.begin());
    a.block_rows = block_rows;
    a.sources = world_size_;
    a.source_starts = source_starts.data();
  }
  // A mismatch is noticed where the rows are (on CUDA nothing waits for it): the next header
  // reports it on every rank, as a deferred combine status.
  a.status = reserve_pending(1);
  a.bad_status = (world_size_ - rank_) << 8 | kArrivalMismatch;
  launch();
  device_->expand(a, *allocator_);
  finish_layout(x, topk, N, R, *layout);
  out.layout = layout;
  return out;
}

ExpandArgs Engine::prepare_outputs(const RowsIn& x, int64_t topk, const uint8_t* arrived, int64_t N, int64_t R,
                                   const DispatchWire& wire, DispatchLayout& layout, DispatchResult& out) {
  const RowFormat fmt = dispatch_row_format(x.cols, layout.dtype_fact, topk, sizeof(SlotMeta));
  // Pre-quantized rows stay e4m3 bytes, with their scales beside; others are in x's dtype.
  out.recv_x = allocate(R * (wire.prequantized ? x.cols : x.cols * dtype_size(x.dtype)));
  if (wire.prequantized) out.recv_scales = allocate(R * fmt.scale_bytes);
  out.recv_weights = allocate(R * int64_t(sizeof(float)));
  layout.row_map = allocate(N * topk * int64_t(sizeof(int64_t)));
  layout.slot_weights = allocate(N * topk * int64_t(sizeof(float)));
  ExpandArgs a;
  a.rows = arrived;
  a.num_rows = N;
  a.fmt = fmt;
  a.topk = topk;
  a.experts_per_rank = experts_per_rank_;
  a.dtype = x.dtype;
  a.hidden = x.cols;
  a.row_map = layout.row_map.as<int64_t>();
  a.slot_weights = layout.slot_weights.as<float>();
  a.recv_weights = out.recv_weights.as<float>();
  a.recv_x = out.recv_x.data;
  a.recv_scales = out.recv_scales.data;
  return a;
}

void Engine::finish_layout(const RowsIn& x, int64_t topk, int64_t N, int64_t R, DispatchLayout& layout) {
  layout.num_tokens = x.rows;
  layout.hidden = x.cols;
  layout.topk = topk;
  layout.dtype = x.dtype;
  layout.num_last = N;
  layout.num_recv_rows = R;
  for (size_t j = 0; j < stages_.size(); ++j) {
    const StageSpec& stage = stages_[j];
    for (int64_t d = 0; d < stage.size; ++d) {
      if (d == stage.index) continue;  // rows a rank sends itself cross no link
      (stage.remote[d] ? layout.stats.rows_inter : layout.stats.rows_intra) += layout.plans[j].send_rows[d];
    }
  }
  // Payload bytes (FP8: with the scales), as API.md counts them; no metadata.
  const int64_t row_bytes = wire_format(layout).wire_payload_bytes();
  layout.stats.bytes_intra = layout.stats.rows_intra * row_bytes;
  layout.stats.bytes_inter = layout.stats.rows_inter * row_bytes;
  layout.counters = *current_;
}

// ---- the reverse path and the forward path reused -------------------------------------------

RowsIn Engine::send_along(const DispatchLayout& layout, const RowsIn& rows, const std::string& name,
                          int64_t* status) {
  const RowFormat fmt = make_row_format(rows.cols, dtype_size(rows.dtype), 0, 0);
  RowsIn in = rows;
  for (size_t j = 0; j < stages_.size(); ++j) {
    const StageSpec& stage = stages_[j];
    const StagePlan& plan = layout.plans[j];
    uint8_t* recv = pack_and_send(stage, plan, in, fmt, nullptr, nullptr, 0, status, name + "/" + stage.name);
    in = RowsIn{recv, fmt.row_bytes, plan.num_recv, rows.cols, rows.dtype};
  }
  return in;
}

void Engine::reduce_back(const DispatchLayout& layout, const RowsIn& rows, const int64_t* row_map,
                         const float* weights, const float* slot_scalars, const std::string& name, int64_t* status,
                         Array& y, Array& scalars_out) {
  const int64_t topk = layout.topk;
  const RowFormat fmt = make_row_format(rows.cols, dtype_size(rows.dtype), slot_scalars ? topk : 0, kScalarBytes);
  RowsIn src = rows;
  const int64_t* src_map = row_map;
  const float* src_weights = weights;
  const float* scalars = slot_scalars;
  // `scalars` is always dense [rows, topk]: collect_pairs makes it so after every stage.
  Array composed_map, composed_weights, collected;
  for (size_t jj = stages_.size(); jj-- > 0;) {
    const StageSpec& stage = stages_[jj];
    const StagePlan& plan = layout.plans[jj];
    if (stage.size == 1) {
      // No wire (world size 1, or one rank per node): compose the maps instead of
      // materialising partials that would only be summed once more.
      Array m = allocate(plan.num_in * topk * int64_t(sizeof(int64_t)));
      Array w = src_weights ? allocate(plan.num_in * topk * int64_t(sizeof(float))) : Array{};
      launch();
      device_->compose_own_slot(plan.first_slot.as<int64_t>(), plan.num_in, topk, src_map, src_weights,
                                m.as<int64_t>(), w.as<float>());
      composed_map = m;
      composed_weights = w;
      src_map = m.as<int64_t>();
      src_weights = w.as<float>();
      if (scalars) {
        Array c = allocate(plan.num_in * topk * int64_t(sizeof(float)));
        launch();
        device_->collect_pairs(scalars, topk, plan.pair_slot.as<int64_t>(), plan.num_in, topk, c.as<float>());
        collected = c;
        scalars = c.as<float>();
      }
      continue;
    }
    const std::string stage_name = name + "/" + stage.name;
    uint8_t* packed = workspace(stage_name + "/send", plan.num_recv * fmt.row_bytes);
    reduce_rows(src, src_map, src_weights, topk, plan.num_recv, packed, fmt.row_bytes, scalars, fmt.meta_offset);
    uint8_t* back = workspace(stage_name + "/recv", plan.num_send * fmt.row_bytes);
    exchange(stage, packed, plan.recv_rows, back, plan.send_rows, fmt.row_bytes, status, stage_name);
    src = RowsIn{back, fmt.row_bytes, plan.num_send, rows.cols, rows.dtype};
    src_map = plan.first_slot.as<int64_t>();
    src_weights = nullptr;
    if (scalars) {
      Array c = allocate(plan.num_in * topk * int64_t(sizeof(float)));
      launch();
      device_->collect_pairs(reinterpret_cast<const float*>(back + fmt.meta_offset), fmt.row_bytes / kScalarBytes,
                             plan.pair_slot.as<int64_t>(), plan.num_in, topk, c.as<float>());
      collected = c;
      scalars = c.as<float>();
    }
  }
  y = allocate(layout.num_tokens * rows.cols * dtype_size(rows.dtype));
  if (rows.cols > 0) {
    reduce_rows(src, src_map, src_weights, topk, layout.num_tokens, y.data, rows.cols * dtype_size(rows.dtype), nullptr,
                0);
  }
  scalars_out = collected;
}

CombineResult Engine::combine(const DispatchLayout& layout, const RowsIn& expert_y, const float* weights, bool reuse,
                              int64_t status_code) {
  begin("combine");
  CombineResult out;
  int64_t status = status_code > 0 ? ((world_size_ - rank_) << 8 | status_code) : 0;
  int64_t* carried = status_code >= 0 ? &status : nullptr;
  const int64_t N = layout.num_last, K = layout.topk;
  const float* slot_weights = nullptr;
  if (weights && reuse) {
    out.slot_weights = layout.slot_weights;
  } else if (weights) {
    // Receivers need this call's weights: each token's K weights go along the layout first,
    // and carry the status (every rank knows before any partial moves).
    const RowsIn sent = send_along(layout, RowsIn{reinterpret_cast<const uint8_t*>(weights),
                                                  K * int64_t(sizeof(float)), layout.num_tokens, K, DType::kFloat32},
                                   "combine-weights", carried);
    if (status != 0 && !defer_status_) {  // deferred: the peers do not know, so go on with zeros
      out.status = status;
      return out;
    }
    out.slot_weights = allocate(N * K * int64_t(sizeof(float)));
    launch();
    device_->mask_by_map(sent.data, sent.stride_bytes, layout.row_map.as<int64_t>(), N, K,
                         out.slot_weights.as<float>());
  }
  if (out.slot_weights.data) slot_weights = out.slot_weights.as<float>();
  RowsIn rows = expert_y;
  Array zeros;
  if (status_code > 0) {  // this rank rejected its input: it still joins, sending zeros
    rows = RowsIn{nullptr, layout.hidden * dtype_size(layout.dtype), layout.num_recv_rows, layout.hidden,
                  layout.dtype};
    zeros = allocate(std::max<int64_t>(layout.num_recv_rows * rows.stride_bytes, 16));
    launch();  // a memset on CUDA
    device_->fill_zero(zeros.data, zeros.bytes);
    rows.data = zeros.data;
  }
  Array unused;
  // The weights' pass carried the status already, when there was one.
  int64_t* carried_back = (weights && !reuse) ? nullptr : carried;
  reduce_back(layout, rows, layout.row_map.as<int64_t>(), slot_weights, nullptr, "combine", carried_back, out.y,
              unused);
  out.status = status;
  return out;
}

BackwardResult Engine::dispatch_backward(const DispatchLayout& layout, const RowsIn& grad_recv_x,
                                         const float* grad_recv_weights) {
  // The transpose of dispatch is an unweighted combine; router-weight gradients ride back in
  // the same rows.
  begin("dispatch_backward");
  BackwardResult out;
  Array slot_grads;
  if (grad_recv_weights) {
    slot_grads = allocate(layout.num_last * layout.topk * int64_t(sizeof(float)));
    launch();
    device_->gather_masked(grad_recv_weights, layout.row_map.as<int64_t>(), layout.num_last * layout.topk,
                           slot_grads.as<float>());
  }
  reduce_back(layout, grad_recv_x, layout.row_map.as<int64_t>(), nullptr,
              grad_recv_weights ? slot_grads.as<float>() : nullptr, "dispatch-backward", nullptr, out.grad_rows,
              out.grad_weights);
  return out;
}

BackwardResult Engine::combine_backward(const DispatchLayout& layout, const RowsIn& grad_y, const float* slot_weights,
                                        const RowsIn* expert_y) {
  // The transpose of combine is a dispatch of grad_y along the cached layout.
  begin("combine_backward");
  BackwardResult out;
  const RowsIn grad_rows = send_along(layout, grad_y, "combine-backward", nullptr);
  const int64_t R = layout.num_recv_rows, H = layout.hidden;
  out.grad_rows = allocate(R * H * dtype_size(grad_y.dtype));
  if (layout.padded) {  // no slot maps to a padding row: its gradient is zero
    launch();
    device_->fill_zero(out.grad_rows.data, out.grad_rows.bytes);
  }
  ScatterParams s;
  s.src = grad_rows.data;
  s.src_stride = grad_rows.stride_bytes;
  s.num_src = grad_rows.rows;
  s.row_map = layout.row_map.as<int64_t>();
  s.weights = slot_weights;
  s.topk = layout.topk;
  s.hidden = H;
  s.dtype = grad_y.dtype;
  s.dst = out.grad_rows.data;
  s.dst_stride = H * dtype_size(grad_y.dtype);
  launch();
  device_->scatter_rows(s);
  if (expert_y) {  // the gradient of combine's weights: dot(grad_y row, expert_y row) per slot
    Array dots = allocate(layout.num_last * layout.topk * int64_t(sizeof(float)));
    DotParams d;
    d.a = grad_rows.data;
    d.a_stride = grad_rows.stride_bytes;
    d.a_dtype = grad_rows.dtype;
    d.b = expert_y->data;
    d.b_stride = expert_y->stride_bytes;
    d.b_dtype = expert_y->dtype;
    d.map = layout.row_map.as<int64_t>();
    d.num_rows = layout.num_last;
    d.topk = layout.topk;
    d.hidden = H;
    d.out = dots.as<float>();
    launch();
    device_->row_dots(d);
    Array no_y;
    reduce_back(layout, RowsIn{nullptr, 0, R, 0, DType::kFloat32}, layout.row_map.as<int64_t>(), nullptr,
                dots.as<float>(), "combine-backward-weights", nullptr, no_y, out.grad_weights);
  }
  return out;
}

}  // namespace engine
}  // namespace moe_comm
