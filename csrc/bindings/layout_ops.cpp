// Bindings of the sender-side layout: row format, routing checks, the send plan, routing.
#include <tuple>

#include "../core/routing.h"
#include "tensor_args.h"

namespace moe_comm {
namespace bind {
namespace {

py::tuple row_format(int64_t hidden, int64_t elem_size, int64_t topk, int64_t meta_bytes_per_slot) {
  const RowFormat f = make_row_format(hidden, elem_size, topk, meta_bytes_per_slot);
  return py::make_tuple(f.payload_bytes, f.meta_offset, f.meta_bytes, f.row_bytes);
}

using SendPlan = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// -> tokens_per_rank [W], pairs_per_expert [E] of a CPU routing.
std::tuple<Tensor, Tensor> count_layout_cpu(const Routing& r) {
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  Tensor tokens_per_rank = torch::empty({r.num_ranks}, i64);
  Tensor pairs_per_expert = torch::empty({r.num_experts}, i64);
  count_layout(r, tokens_per_rank.data_ptr<int64_t>(), pairs_per_expert.data_ptr<int64_t>());
  return {tokens_per_rank, pairs_per_expert};
}

SendPlan plan_send_cpu(const Tensor& topk_idx, int64_t num_experts, int64_t num_ranks) {
  const Routing r = routing_of(topk_idx, num_experts, num_ranks);
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  auto [tokens_per_rank, pairs_per_expert] = count_layout_cpu(r);
  Tensor send_offsets = torch::zeros({num_ranks + 1}, i64);
  send_offsets.slice(0, 1).copy_(tokens_per_rank.cumsum(0));
  const int64_t num_send = send_offsets[num_ranks].item<int64_t>();
  Tensor send_token = torch::empty({num_send}, i64);
  Tensor pair_slot = torch::empty({r.num_tokens, r.topk}, i64);
  Tensor first_slot = torch::empty({r.num_tokens, r.topk}, i64);
  fill_send_plan(r, send_offsets.data_ptr<int64_t>(), send_token.data_ptr<int64_t>(),
                 pair_slot.data_ptr<int64_t>(), first_slot.data_ptr<int64_t>());
  return {tokens_per_rank, pairs_per_expert, send_offsets, send_token, pair_slot, first_slot};
}

#if defined(MOE_COMM_WITH_CUDA)
cuda::LayoutKernelParams layout_params(const Tensor& topk_idx, int64_t num_experts, int64_t num_ranks,
                                       Tensor& tokens_per_rank, Tensor& pairs_per_expert, Tensor& token_in_rank) {
  const Routing r = routing_of(topk_idx, num_experts, num_ranks, topk_idx.device());
  auto on = topk_idx.options();
  tokens_per_rank = torch::empty({num_ranks}, on);
  pairs_per_expert = torch::empty({num_experts}, on);
  token_in_rank = torch::empty({r.num_tokens, num_ranks}, on.dtype(torch::kBool));
  cuda::LayoutKernelParams p;
  p.topk_idx = r.topk_idx;
  p.num_tokens = r.num_tokens;
  p.topk = r.topk;
  p.num_experts = num_experts;
  p.num_ranks = num_ranks;
  p.tokens_per_rank = tokens_per_rank.data_ptr<int64_t>();
  p.pairs_per_expert = pairs_per_expert.data_ptr<int64_t>();
  p.token_in_rank = token_in_rank.data_ptr<bool>();
  return p;
}

// -> tokens_per_rank [W], pairs_per_expert [E], token_in_rank [T, W] bool, on topk_idx's device
std::tuple<Tensor, Tensor, Tensor> count_layout_cuda(const Tensor& topk_idx, int64_t num_experts,
                                                     int64_t num_ranks, int64_t stream) {
  MOE_HOST_ASSERT(topk_idx.is_cuda(), "topk_idx must be a CUDA tensor, got " << topk_idx.device());
  DeviceGuard device_guard(topk_idx.device());
  Tensor tokens_per_rank, pairs_per_expert, token_in_rank;
  const auto p = layout_params(topk_idx, num_experts, num_ranks, tokens_per_rank, pairs_per_expert, token_in_rank);
  MOE_CUDA_CHECK(cuda::launch_count_layout(p, as_stream(stream)));
  return {tokens_per_rank, pairs_per_expert, token_in_rank};
}

// The CPU plan's device twin, with no host synchronisation: send_token has room for W * T
// slots (its first send_offsets[W] are used; the caller learns that number with the header).
SendPlan plan_send_cuda(const Tensor& topk_idx, int64_t num_experts, int64_t num_ranks, int64_t stream) {
  DeviceGuard device_guard(topk_idx.device());
  const cudaStream_t s = as_stream(stream);
  Tensor tokens_per_rank, pairs_per_expert, token_in_rank;
  const auto lp = layout_params(topk_idx, num_experts, num_ranks, tokens_per_rank, pairs_per_expert, token_in_rank);
  MOE_CUDA_CHECK(cuda::launch_count_layout(lp, s));

  const int64_t T = lp.num_tokens, K = lp.topk, pairs = num_ranks * T;
  auto i64 = topk_idx.options();
  Tensor flags = torch::empty({pairs}, i64);
  Tensor positions = torch::empty({pairs}, i64);
  Tensor send_offsets = torch::empty({num_ranks + 1}, i64);
  Tensor send_token = torch::empty({pairs}, i64);
  Tensor pair_slot = torch::empty({T, K}, i64);
  Tensor first_slot = torch::empty({T, K}, i64);
  cuda::SendPlanKernelParams p;
  p.topk_idx = lp.topk_idx;
  p.token_in_rank = lp.token_in_rank;
  p.num_tokens = T;
  p.topk = K;
  p.num_experts = num_experts;
  p.num_ranks = num_ranks;
  p.flags = flags.data_ptr<int64_t>();
  p.positions = positions.data_ptr<int64_t>();
  p.send_offsets = send_offsets.data_ptr<int64_t>();
  p.send_token = send_token.data_ptr<int64_t>();
  p.pair_slot = pair_slot.data_ptr<int64_t>();
  p.first_slot = first_slot.data_ptr<int64_t>();
  MOE_CUDA_CHECK(cuda::launch_send_plan_flags(p, s));
  const size_t scratch_bytes = cuda::exclusive_scan_workspace_bytes(pairs);
  Tensor scratch = torch::empty({static_cast<int64_t>(scratch_bytes) + 1}, i64.dtype(torch::kUInt8));
  MOE_CUDA_CHECK(cuda::launch_exclusive_scan(p.flags, p.positions, pairs, scratch.data_ptr(), scratch_bytes, s));
  MOE_CUDA_CHECK(cuda::launch_send_plan_fill(p, s));
  return {tokens_per_rank, pairs_per_expert, send_offsets, send_token, pair_slot, first_slot};
}
#endif

// -> tokens_per_rank [W], pairs_per_expert [E], send_offsets [W + 1], send_token [>= n_send],
//    pair_slot [T, K], first_slot [T, K], on topk_idx's device. On the CPU send_token holds
//    exactly n_send = send_offsets[W] slots; on CUDA it has room for W * T.
SendPlan plan_send(const Tensor& topk_idx, int64_t num_experts, int64_t num_ranks, int64_t stream) {
  if (topk_idx.is_cpu()) return plan_send_cpu(topk_idx, num_experts, num_ranks);
#if defined(MOE_COMM_WITH_CUDA)
  return plan_send_cuda(topk_idx, num_experts, num_ranks, stream);
#else
  (void)stream;
  fail_without_cuda("topk_idx", topk_idx.device());
#endif
}

// -> tokens_per_rank [W], pairs_per_expert [E] on topk_idx's device.
std::tuple<Tensor, Tensor> count_layout_any(const Tensor& topk_idx, int64_t num_experts, int64_t num_ranks,
                                            int64_t stream) {
  if (topk_idx.is_cpu()) return count_layout_cpu(routing_of(topk_idx, num_experts, num_ranks));
#if defined(MOE_COMM_WITH_CUDA)
  auto counts = count_layout_cuda(topk_idx, num_experts, num_ranks, stream);
  return {std::get<0>(counts), std::get<1>(counts)};
#else
  (void)stream;
  fail_without_cuda("topk_idx", topk_idx.device());
#endif
}

// -> topk_idx [T, topk] int64 on scores' device: node-limited selection on float32 scores [T, E].
Tensor node_limited_select(const Tensor& scores, int64_t topk, int64_t num_nodes, int64_t max_nodes,
                           int64_t node_score_topk, int64_t stream) {
  expect(scores, "scores", torch::kFloat32, 2, scores.device());
  Tensor out = torch::empty({scores.size(0), topk}, scores.options().dtype(torch::kInt64));
  NodeLimitedParams p;
  p.scores = scores.data_ptr<float>();
  p.num_tokens = scores.size(0);
  p.num_experts = scores.size(1);
  p.num_nodes = num_nodes;
  p.max_nodes = max_nodes;
  p.node_score_topk = node_score_topk;
  p.topk = topk;
  p.topk_idx = out.data_ptr<int64_t>();
  if (scores.is_cpu()) {
    node_limited_select(p);
    return out;
  }
#if defined(MOE_COMM_WITH_CUDA)
  check_node_limited(p);
  MOE_HOST_ASSERT(num_nodes <= cuda::kMaxRoutingNodes,
                  "num_nodes " << num_nodes << " exceeds the " << cuda::kMaxRoutingNodes << " the CUDA routing supports");
  DeviceGuard device_guard(scores.device());
  MOE_CUDA_CHECK(cuda::launch_node_limited_select(p, as_stream(stream)));
#else
  (void)stream;
  fail_without_cuda("scores", scores.device());
#endif
  return out;
}

}  // namespace

void register_layout_ops(py::module_& m) {
  m.def("row_format", &row_format, "(payload_bytes, meta_offset, meta_bytes, row_bytes)");
  m.def("count_layout", &count_layout_any, py::arg("topk_idx"), py::arg("num_experts"), py::arg("num_ranks"),
        py::arg("stream") = 0);
  m.def("plan_send", &plan_send, py::arg("topk_idx"), py::arg("num_experts"), py::arg("num_ranks"),
        py::arg("stream") = 0);
  m.def("node_limited_select", &node_limited_select, py::arg("scores"), py::arg("topk"), py::arg("num_nodes"),
        py::arg("max_nodes"), py::arg("node_score_topk"), py::arg("stream") = 0);
#if defined(MOE_COMM_WITH_CUDA)
  m.def("count_layout_cuda", &count_layout_cuda);
#endif
}

}  // namespace bind
}  // namespace moe_comm
