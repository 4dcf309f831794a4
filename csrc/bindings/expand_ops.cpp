// Binding of the receiver side of dispatch: arrived rows -> expert-major recv_x, recv_weights,
// and the maps combine and the backwards reuse.
#include <tuple>

#include "../cpu/token_ops.h"
#include "tensor_args.h"

namespace moe_comm {
namespace bind {
namespace {

using Expanded = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// The counts of the header exchange, when given, on the CPU: [experts_per_rank] int64.
const int64_t* known_counts(const std::optional<Tensor>& tokens_per_expert, int64_t experts_per_rank) {
  if (!tokens_per_expert) return nullptr;
  expect(*tokens_per_expert, "tokens_per_expert", torch::kInt64, 1);
  MOE_HOST_ASSERT(tokens_per_expert->size(0) == experts_per_rank,
                  "tokens_per_expert has " << tokens_per_expert->size(0) << " entries for " << experts_per_rank
                                           << " local experts");
  return tokens_per_expert->data_ptr<int64_t>();
}

ScatterParams expand_scatter(const uint8_t* rows, const RowFormat& f, int64_t num_rows, const Tensor& row_map,
                             int64_t topk, DType dt, Tensor& recv_x) {
  ScatterParams s;
  s.src = rows;
  s.src_stride = f.row_bytes;
  s.num_src = num_rows;
  s.row_map = row_map.data_ptr<int64_t>();
  s.topk = topk;
  s.hidden = recv_x.size(1);
  s.dtype = dt;
  s.dst = static_cast<uint8_t*>(recv_x.data_ptr());
  s.dst_stride = recv_x.size(1) * dtype_size(dt);
  return s;
}

Expanded expand_rows_cpu(const Tensor& rows, int64_t hidden, c10::ScalarType dtype, int64_t topk,
                         int64_t experts_per_rank, const std::optional<Tensor>& row_order, const int64_t* known) {
  expect(rows, "rows", torch::kUInt8, 2);
  const DType dt = to_dtype(dtype, "dtype");
  cpu::ExpandPlanParams plan;
  plan.fmt = make_row_format(hidden, dtype_size(dt), topk, sizeof(SlotMeta));
  MOE_HOST_ASSERT(rows.size(1) == plan.fmt.row_bytes,
                  "rows are " << rows.size(1) << " bytes wide, expected " << plan.fmt.row_bytes);
  plan.rows = rows.data_ptr<uint8_t>();
  plan.num_rows = rows.size(0);
  plan.topk = topk;
  plan.experts_per_rank = experts_per_rank;
  if (row_order) {
    expect(*row_order, "row_order", torch::kInt64, 1);
    MOE_HOST_ASSERT(row_order->size(0) == plan.num_rows,
                    "row_order has " << row_order->size(0) << " entries for " << plan.num_rows << " rows");
    Tensor seen = torch::zeros({plan.num_rows}, torch::TensorOptions().dtype(torch::kInt64));
    if (plan.num_rows) seen.index_add_(0, *row_order, torch::ones_like(*row_order));
    MOE_HOST_ASSERT(plan.num_rows == 0 || (seen == 1).all().item<bool>(), "row_order is not a permutation");
    plan.row_order = row_order->data_ptr<int64_t>();
  }

  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  Tensor tokens_per_expert = torch::empty({experts_per_rank}, i64);
  cpu::count_recv_experts(plan, tokens_per_expert.data_ptr<int64_t>());
  for (int64_t e = 0; known && e < experts_per_rank; ++e) {
    // The CUDA path sizes its outputs from the header's counts: on the CPU, prove them right.
    MOE_HOST_ASSERT(known[e] == tokens_per_expert[e].item<int64_t>(),
                    "the header announced " << known[e] << " rows for local expert " << e << ", "
                                            << tokens_per_expert[e].item<int64_t>() << " arrived");
  }
  Tensor expert_offsets = torch::zeros({experts_per_rank + 1}, i64);
  expert_offsets.slice(0, 1).copy_(tokens_per_expert.cumsum(0));
  const int64_t total = expert_offsets[experts_per_rank].item<int64_t>();

  Tensor recv_x = torch::empty({total, hidden}, torch::TensorOptions().dtype(dtype));
  Tensor recv_weights = torch::empty({total}, torch::TensorOptions().dtype(torch::kFloat32));
  Tensor row_map = torch::empty({plan.num_rows, topk}, i64);
  Tensor slot_weights = torch::empty({plan.num_rows, topk}, torch::TensorOptions().dtype(torch::kFloat32));
  cpu::fill_expand_plan(plan, expert_offsets.data_ptr<int64_t>(), row_map.data_ptr<int64_t>(),
                        slot_weights.data_ptr<float>(), recv_weights.data_ptr<float>());
  cpu::scatter_rows(expand_scatter(plan.rows, plan.fmt, plan.num_rows, row_map, topk, dt, recv_x));
  return {recv_x, recv_weights, tokens_per_expert, row_map, slot_weights};
}

#if defined(MOE_COMM_WITH_CUDA)
// Device twin. With the header's counts nothing waits on the device; without them one host
// synchronisation reads the counts to size recv_x.
Expanded expand_rows_cuda(const Tensor& rows, int64_t hidden, c10::ScalarType dtype, int64_t topk,
                          int64_t experts_per_rank, const std::optional<Tensor>& row_order, const int64_t* known,
                          int64_t stream) {
  const c10::Device dev = rows.device();
  DeviceGuard device_guard(dev);
  expect(rows, "rows", torch::kUInt8, 2, dev);
  const DType dt = to_dtype(dtype, "dtype");
  const RowFormat f = make_row_format(hidden, dtype_size(dt), topk, sizeof(SlotMeta));
  MOE_HOST_ASSERT(rows.size(1) == f.row_bytes, "rows are " << rows.size(1) << " bytes wide, expected " << f.row_bytes);
  const int64_t N = rows.size(0);
  auto i64 = rows.options().dtype(torch::kInt64);
  cuda::ExpandPlanKernelParams p;
  if (row_order) {
    expect(*row_order, "row_order", torch::kInt64, 1, dev);
    MOE_HOST_ASSERT(row_order->size(0) == N, "row_order has " << row_order->size(0) << " entries for " << N << " rows");
    p.row_order = row_order->data_ptr<int64_t>();
  }
  Tensor flags = torch::empty({experts_per_rank * N}, i64);
  Tensor positions = torch::empty({experts_per_rank * N}, i64);
  Tensor device_counts = torch::empty({experts_per_rank}, i64);
  Tensor row_map = torch::empty({N, topk}, i64);
  Tensor slot_weights = torch::empty({N, topk}, rows.options().dtype(torch::kFloat32));
  p.rows = rows.data_ptr<uint8_t>();
  p.num_rows = N;
  p.row_bytes = f.row_bytes;
  p.meta_offset = f.meta_offset;
  p.topk = topk;
  p.experts_per_rank = experts_per_rank;
  p.flags = flags.data_ptr<int64_t>();
  p.positions = positions.data_ptr<int64_t>();
  p.tokens_per_expert = device_counts.data_ptr<int64_t>();
  p.row_map = row_map.data_ptr<int64_t>();
  p.slot_weights = slot_weights.data_ptr<float>();
  const cudaStream_t s = as_stream(stream);
  MOE_CUDA_CHECK(cuda::launch_expand_count(p, s));
  const int64_t count = experts_per_rank * N;
  const size_t scratch_bytes = cuda::exclusive_scan_workspace_bytes(count);
  Tensor scratch = torch::empty({static_cast<int64_t>(scratch_bytes) + 1}, rows.options());
  MOE_CUDA_CHECK(cuda::launch_exclusive_scan(p.flags, p.positions, count, scratch.data_ptr(), scratch_bytes, s));
  Tensor counts = torch::empty({experts_per_rank}, torch::TensorOptions().dtype(torch::kInt64));
  if (known) {
    std::copy(known, known + experts_per_rank, counts.data_ptr<int64_t>());
  } else {
    MOE_CUDA_CHECK(cudaMemcpyAsync(counts.data_ptr<int64_t>(), p.tokens_per_expert,
                                   experts_per_rank * sizeof(int64_t), cudaMemcpyDeviceToHost, s));
    MOE_CUDA_CHECK(cudaStreamSynchronize(s));
  }
  const int64_t total = counts.sum().item<int64_t>();
  Tensor recv_x = torch::empty({total, hidden}, rows.options().dtype(dtype));
  Tensor recv_weights = torch::empty({total}, rows.options().dtype(torch::kFloat32));
  p.recv_weights = recv_weights.data_ptr<float>();
  MOE_CUDA_CHECK(cuda::launch_expand_fill(p, s));
  MOE_CUDA_CHECK(cuda::launch_scatter_rows(expand_scatter(p.rows, f, N, row_map, topk, dt, recv_x), s));
  return {recv_x, recv_weights, counts, row_map, slot_weights};
}
#endif

// -> recv_x [R, H], recv_weights [R], tokens_per_expert [E_local] (CPU), row_map [N, K],
//    slot_weights [N, K]. row_order: optional permutation of the rows giving (source rank,
//    source token) order. tokens_per_expert: the counts the header exchange announced.
Expanded expand_rows(const Tensor& rows, int64_t hidden, c10::ScalarType dtype, int64_t topk,
                     int64_t experts_per_rank, const std::optional<Tensor>& row_order,
                     const std::optional<Tensor>& tokens_per_expert, int64_t stream) {
  const int64_t* known = known_counts(tokens_per_expert, experts_per_rank);
  if (rows.is_cpu()) return expand_rows_cpu(rows, hidden, dtype, topk, experts_per_rank, row_order, known);
#if defined(MOE_COMM_WITH_CUDA)
  return expand_rows_cuda(rows, hidden, dtype, topk, experts_per_rank, row_order, known, stream);
#else
  (void)stream;
  fail_without_cuda("rows", rows.device());
#endif
}

}  // namespace

void register_expand_ops(py::module_& m) {
  m.def("expand_rows", &expand_rows, py::arg("rows"), py::arg("hidden"), py::arg("dtype"), py::arg("topk"),
        py::arg("experts_per_rank"), py::arg("row_order"), py::arg("tokens_per_expert") = py::none(),
        py::arg("stream") = 0);
}

}  // namespace bind
}  // namespace moe_comm
