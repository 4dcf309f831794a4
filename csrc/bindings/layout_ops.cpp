// Bindings of the row format and of node-limited routing.
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

py::tuple fp8_row_format(int64_t hidden, int64_t topk, int64_t meta_bytes_per_slot) {
  const RowFormat f = make_fp8_row_format(hidden, topk, meta_bytes_per_slot);
  return py::make_tuple(f.payload_bytes, f.meta_offset, f.meta_bytes, f.row_bytes, f.scale_offset, f.scale_bytes);
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
  m.def("fp8_row_format", &fp8_row_format,
        "FP8 dispatch rows: (payload_bytes, meta_offset, meta_bytes, row_bytes, scale_offset, scale_bytes)");
  m.def("node_limited_select", &node_limited_select, py::arg("scores"), py::arg("topk"), py::arg("num_nodes"),
        py::arg("max_nodes"), py::arg("node_score_topk"), py::arg("stream") = 0);
}

}  // namespace bind
}  // namespace moe_comm
