// Unit tests of the torch-free core (layout plan, row format, dtype conversion) and the CPU
// token kernels. No framework: each CHECK names what failed; main returns non-zero on failure.
#include <algorithm>
#include <cmath>
#include <memory>
#include <cstdio>
#include <cstring>
#include <vector>

#include "check.h"
#include "core/backoff.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/fp8.h"
#include "core/layout.h"
#include "cpu/cpu_device.h"
#include "engine/device.h"
#include "core/routing.h"
#include "core/row_format.h"
#include "cpu/token_ops.h"
#include "engine/header.h"

namespace {

using namespace moe_comm;

void test_row_format() {
  const RowFormat f = make_row_format(7, 2, 3, sizeof(SlotMeta));
  CHECK(f.payload_bytes == 14);
  CHECK(f.meta_offset == 16);
  CHECK(f.meta_bytes == 24);
  CHECK(f.row_bytes == 48);
  CHECK(make_row_format(0, 4, 0, 8).row_bytes == kRowAlignBytes);
}

void test_routing_problems() {
  const std::vector<int64_t> ok = {0, 3, -1, 2};
  Routing r{ok.data(), 2, 2, 4, 2};
  CHECK(find_routing_problem(r).kind == RoutingProblem::kOk);
  const std::vector<int64_t> out_of_range = {0, 4};
  r.topk_idx = out_of_range.data();
  r.num_tokens = 1;
  const RoutingProblem p = find_routing_problem(r);
  CHECK(p.kind == RoutingProblem::kOutOfRange && p.token == 0 && p.slot == 1 && p.value == 4);
  const std::vector<int64_t> duplicate = {2, 2};
  r.topk_idx = duplicate.data();
  CHECK(find_routing_problem(r).kind == RoutingProblem::kDuplicate);
}

// Host memory for the CPU backend's plans, kept until the test ends.
class HostAllocator final : public engine::Allocator {
 public:
  engine::Array allocate(int64_t bytes) override {
    auto block = std::make_shared<std::vector<uint8_t>>(size_t(std::max<int64_t>(bytes, 16)));
    engine::Array a;
    a.data = block->data();
    a.bytes = bytes;
    a.owner = block;
    return a;
  }
};

std::vector<int64_t> values(const engine::Array& a) {
  const int64_t* p = a.as<int64_t>();
  return std::vector<int64_t>(p, p + a.bytes / int64_t(sizeof(int64_t)));
}

// The send plan through the CPU backend, for every split of the tokens into workers.
void test_layout() {
  // 4 experts on 2 ranks (2 each). Token 0 -> experts 0, 1 (rank 0 twice), 3 (rank 1).
  const int64_t T = 3, K = 3, W = 2;
  const std::vector<int64_t> idx = {0, 1, 3, /**/ -1, -1, -1, /**/ 2, -1, 0};
  Routing r{idx.data(), T, K, 4, W};
  for (int64_t workers = 1; workers <= 4; ++workers) {
    cpu::set_emulated_lanes(workers);
    HostAllocator alloc;
    cpu::CpuDevice device;
    engine::StagePlan plan;
    device.plan_send(r, engine::Capacity{}, alloc, plan);
    CHECK((values(plan.rows_per_dest) == std::vector<int64_t>{2, 2}));
    CHECK((values(plan.pairs_per_expert) == std::vector<int64_t>{2, 1, 1, 1}));
    CHECK((values(plan.send_offsets) == std::vector<int64_t>{0, 2, 4}));
    CHECK((values(plan.send_token) == std::vector<int64_t>{0, 2, 0, 2}));
    CHECK((values(plan.pair_slot) == std::vector<int64_t>{0, 0, 2, -1, -1, -1, 3, -1, 1}));
    CHECK((values(plan.first_slot) == std::vector<int64_t>{0, -1, 2, -1, -1, -1, 3, -1, 1}));
    CHECK(values(plan.status)[0] == 0);
    std::vector<int64_t> tokens(W);
    device.count_tokens(r, alloc, tokens.data());
    CHECK((tokens == std::vector<int64_t>{2, 2}));
  }
  // An index out of range plans as masked, and the plan says the routing is bad.
  const std::vector<int64_t> bad = {0, 7, /**/ 3, -1};
  Routing rb{bad.data(), 2, 2, 4, W};
  HostAllocator alloc;
  cpu::CpuDevice device;
  engine::StagePlan plan;
  device.plan_send(rb, engine::Capacity{}, alloc, plan);
  CHECK(values(plan.status)[0] == engine::kRoutingCode);
  CHECK((values(plan.pair_slot) == std::vector<int64_t>{0, -1, 1, -1}));
  cpu::set_emulated_lanes(1);
}

void test_conversions() {
  CHECK(float_to_bf16(1.0f) == 0x3f80);
  CHECK(float_to_bf16(1.0f + 1.0f / 256) == 0x3f80);       // tie, to even
  CHECK(float_to_bf16(1.0f + 3.0f / 256) == 0x3f82);       // tie, to even (up)
  CHECK(float_to_fp16(1.0f) == 0x3c00);
  CHECK(float_to_fp16(65504.0f) == 0x7bff);
  CHECK(float_to_fp16(65520.0f) == 0x7c00);                // rounds to inf
  CHECK(float_to_fp16(5.9604644775390625e-08f) == 0x0001); // smallest subnormal
  CHECK(float_to_fp16(2.98e-08f) == 0x0000);               // below half of it
  CHECK(fp16_to_float(0x0001) == 5.9604644775390625e-08f);
  CHECK(std::isnan(fp16_to_float(float_to_fp16(std::nanf("")))));
  for (uint32_t h = 0; h < 0x7c00; ++h) {                  // every finite positive fp16
    CHECK(float_to_fp16(fp16_to_float(static_cast<uint16_t>(h))) == h);
    if (moe_comm_test::failures) break;
  }
  // e4m3 (float8_e4m3fn): every code but NaN round-trips; ties go to the even code.
  for (uint32_t q = 0; q < 256; ++q) {
    if ((q & 0x7f) == 0x7f) {
      CHECK(std::isnan(e4m3_to_float(static_cast<uint8_t>(q))));
    } else {
      CHECK(float_to_e4m3(e4m3_to_float(static_cast<uint8_t>(q))) == q);
    }
  }
  CHECK(e4m3_to_float(0x7e) == 448.0f && e4m3_to_float(0x01) == 0.001953125f && e4m3_to_float(0x08) == 0.015625f);
  CHECK(float_to_e4m3(1.0625f) == 0x38);          // tie between 1 and 1.125: to 1 (even)
  CHECK(float_to_e4m3(1.1875f) == 0x3a);          // tie between 1.125 and 1.25: to 1.25 (even)
  CHECK(float_to_e4m3(0.0009765625f) == 0x00);    // half the smallest subnormal: to 0 (even)
  CHECK(float_to_e4m3(0.0029296875f) == 0x02);    // 1.5 subnormal steps: to 2 (even)
  CHECK(float_to_e4m3(464.0f) == 0x7e);           // tie between 448 and 480: to 448
  CHECK(float_to_e4m3(-0.0f) == 0x80 && float_to_e4m3(500.0f) == 0x7f);
  CHECK(fp8_ratio(0.0f) == 448.0f / 1e-4f && fp8_scale(896.0f) == 2.0f);
}

void test_pack_expand_reduce() {
  // One source, 2 ranks of 2 experts; check the rank-1 segment end to end.
  const int64_t T = 3, K = 2, H = 3, W = 2;
  const std::vector<int64_t> idx = {3, 0, /**/ 2, 3, /**/ 1, -1};
  const std::vector<float> w = {0.5f, 0.25f, 1.0f, 2.0f, 4.0f, 0.0f};
  const std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  Routing r{idx.data(), T, K, 4, W};
  HostAllocator alloc;
  cpu::CpuDevice device;
  engine::StagePlan sent;
  device.plan_send(r, engine::Capacity{}, alloc, sent);
  const std::vector<int64_t> offsets = values(sent.send_offsets), send_token = values(sent.send_token);
  const std::vector<int64_t> per_rank = values(sent.rows_per_dest);

  PackParams pack;
  pack.fmt = make_row_format(H, 4, K, sizeof(SlotMeta));
  std::vector<uint8_t> rows(offsets[2] * pack.fmt.row_bytes);
  pack.src = reinterpret_cast<const uint8_t*>(x.data());
  pack.src_stride = H * 4;
  pack.send_token = send_token.data();
  pack.send_offsets = offsets.data();
  pack.num_ranks = W;
  pack.dst = rows.data();
  pack.topk_idx = idx.data();
  pack.topk_weights = w.data();
  pack.topk = K;
  pack.experts_per_rank = 2;
  cpu::pack_rows(pack);

  // Rank 1's rows (tokens 0, 1) expanded: expert 2 gets token 1, expert 3 tokens 0 and 1.
  const std::vector<int64_t> expert_offsets = {0, 1, 3};
  std::vector<int64_t> row_map(per_rank[1] * K);
  std::vector<float> slot_w(per_rank[1] * K), recv_w(3), recv_x(3 * H);
  engine::ExpandArgs e;
  e.rows = rows.data() + offsets[1] * pack.fmt.row_bytes;
  e.num_rows = per_rank[1];
  e.fmt = pack.fmt;
  e.topk = K;
  e.experts_per_rank = 2;
  e.hidden = H;
  e.expert_offsets = expert_offsets.data();
  e.row_map = row_map.data();
  e.slot_weights = slot_w.data();
  e.recv_weights = recv_w.data();
  e.recv_x = reinterpret_cast<uint8_t*>(recv_x.data());
  int64_t status = -1;
  e.status = &status;
  device.expand(e, alloc);
  CHECK(status == 0);
  CHECK((row_map == std::vector<int64_t>{1, -1, 0, 2}));
  CHECK((recv_w == std::vector<float>{1.0f, 0.5f, 2.0f}));
  bool refused = false;  // counts that disagree with the header's: an error, nothing placed
  const std::vector<int64_t> wrong = {0, 2, 3};
  e.expert_offsets = wrong.data();
  try {
    device.expand(e, alloc);
  } catch (const Error&) {
    refused = true;
  }
  CHECK(refused && status == 1);

  // Combine on rank 1 with expert_y = recv rows: partial[token 0] = 0.5 * x0,
  // partial[token 1] = 1 * x1 + 2 * x1.
  CHECK(recv_x[0] == 4 && recv_x[3] == 1 && recv_x[6] == 4);
  std::vector<float> partial(per_rank[1] * H);
  ReduceParams red;
  red.src = reinterpret_cast<const uint8_t*>(recv_x.data());
  red.src_stride = H * 4;
  red.map = row_map.data();
  red.weights = slot_w.data();
  red.num_out = per_rank[1];
  red.topk = K;
  red.hidden = H;
  red.dst = reinterpret_cast<uint8_t*>(partial.data());
  red.dst_stride = H * 4;
  cpu::reduce_rows(red);
  CHECK(partial[0] == 0.5f && partial[2] == 1.5f);
  CHECK(partial[3] == 12.0f && partial[5] == 18.0f);
}

void test_node_limited_select() {
  // 2 nodes x 3 experts. Node 1 holds the single best expert (5: 0.9), node 0 the best pair
  // (0.8 + 0.7 > 0.9 + 0.1), so with max_nodes = 1 and pairs scoring nodes, node 0 wins.
  const std::vector<float> scores = {0.8f, 0.7f, 0.0f, 0.1f, 0.0f, 0.9f};
  std::vector<int64_t> out(2);
  NodeLimitedParams p;
  p.scores = scores.data();
  p.num_tokens = 1;
  p.num_experts = 6;
  p.num_nodes = 2;
  p.max_nodes = 1;
  p.node_score_topk = 2;
  p.topk = 2;
  p.topk_idx = out.data();
  node_limited_select(p);
  CHECK((out == std::vector<int64_t>{0, 1}));
  p.node_score_topk = 1;  // scored by the best expert alone, node 1 wins
  node_limited_select(p);
  CHECK((out == std::vector<int64_t>{5, 3}));
  p.max_nodes = 2;
  node_limited_select(p);
  CHECK((out == std::vector<int64_t>{5, 0}));
}

void test_errors_carry_location() {
  bool thrown = false;
  try {
    MOE_HOST_ASSERT(1 == 2, "value " << 7);
  } catch (const Error& e) {
    thrown = std::strstr(e.what(), "value 7") && std::strstr(e.what(), "test_core.cpp");
  }
  CHECK(thrown);
}

}  // namespace

void test_poll_backoff() {
  // Yield through the spin window, then sleeps doubling to the cap.
  CHECK(PollBackoff::pause_micros(0, 0) == 0);
  CHECK(PollBackoff::pause_micros(PollBackoff::kSpinMicros - 1, 0) == 0);
  CHECK(PollBackoff::pause_micros(PollBackoff::kSpinMicros, 0) == PollBackoff::kFirstSleepMicros);
  CHECK(PollBackoff::pause_micros(PollBackoff::kSpinMicros, 2) == 4 * PollBackoff::kFirstSleepMicros);
  CHECK(PollBackoff::pause_micros(1000000, 60) == PollBackoff::kMaxSleepMicros);
}

void test_header_relay() {
  using namespace moe_comm::engine;
  // Two rail peers (ranks 1 and 3 of a 2x2 Buffer: base 1, step 2) told this forwarder, per
  // local index l, the rows to forward and the pairs of l's 2 experts.
  const HeaderLayout rail{1, 2, 4}, node{2, 0, 2};
  const CallFacts call{8, 0, 2, 8};
  std::vector<int64_t> received(2 * rail.width(), 0);
  for (int64_t b = 0; b < 2; ++b) {
    int64_t* row = received.data() + b * rail.width();
    for (int64_t f = kFirstAgreed; f < kNumFields; ++f) row[f] = call.get(f);
    row[rail.forward_col()] = 10 + b;      // rows for l = 0
    row[rail.forward_col() + 1] = 20 + b;  // rows for l = 1
    for (int64_t e = 0; e < 4; ++e) row[rail.experts_col() + e] = 100 * b + e;
  }
  std::vector<int64_t> header(2 * node.width(), -7);
  HeaderRelay relay{received.data(), rail, 2, 1, 2, header.data(), 2, node, HeaderFixed{call, 3, Problem{}, nullptr}};
  for (int64_t l = 0; l < 2; ++l) relay_header_row(relay, l);
  CHECK(header[node.rows_col()] == 10 && header[node.rows_col() + 1] == 11);
  CHECK(header[node.width() + node.rows_col()] == 20 && header[node.width() + node.rows_col() + 1] == 21);
  CHECK(header[node.experts_col()] == 0 + 100 && header[node.experts_col() + 1] == 1 + 101);
  CHECK(header[node.width() + node.experts_col()] == 2 + 102);
  CHECK(header[kStatus] == 0 && header[kBadRank] == 3);
  // A rail peer that disagrees on top-k: relayed as a disagreement naming it, seen by this rank.
  received[rail.width() + kTopk] = 4;
  for (int64_t l = 0; l < 2; ++l) relay_header_row(relay, l);
  CHECK(header[kStatus] == kDisagreement && header[kBadRank] == 3 && header[kSeenBy] == 3);
  // A status relayed from a rail peer wins over the disagreement; this rank's own wins over both.
  received[kStatus] = 2;
  received[kBadRank] = 5;
  received[kSeenBy] = 5;
  relay_header_row(relay, 1);
  CHECK(header[node.width() + kStatus] == 2 && header[node.width() + kBadRank] == 5);
  const int64_t own = 1;
  relay.fixed.status = &own;
  relay_header_row(relay, 1);
  CHECK(header[node.width() + kStatus] == 1 && header[node.width() + kBadRank] == 3);
  const std::vector<int64_t> senders = {1, 3};
  const Problem seen = find_problem(received.data(), 2, rail, call, senders, 3);
  CHECK(seen.code == 2 && seen.rank == 5);
}

int main() {
  test_poll_backoff();
  test_header_relay();
  test_row_format();
  test_routing_problems();
  test_layout();
  test_conversions();
  test_pack_expand_reduce();
  test_node_limited_select();
  test_errors_carry_location();
  return moe_comm_test::report_failures("core");
}
