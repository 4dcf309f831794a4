// Bindings of the two plans for tests and bench/bench_kernels.py: the send plan, its counts,
// and the receiver's expand, run through the engine's own backends (cpu/cpu_device,
// engine/cuda_device), so what these check is what a dispatch runs.
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "../cpu/cpu_device.h"
#include "../engine/cuda_device.h"
#include "tensor_args.h"
#include "torch_allocator.h"

namespace moe_comm {
namespace bind {
namespace {

#if defined(MOE_COMM_WITH_CUDA)
// One backend per GPU (its kernels load once), on the caller's stream for each call.
cuda::CudaDevice& cuda_device(const c10::Device& dev, int64_t stream) {
  static std::mutex mutex;
  static std::map<int, std::unique_ptr<cuda::CudaDevice>> devices;
  std::lock_guard<std::mutex> lock(mutex);
  std::unique_ptr<cuda::CudaDevice>& d = devices[dev.index()];
  if (!d) d = std::make_unique<cuda::CudaDevice>(dev.index());
  d->set_stream(as_stream(stream));
  return *d;
}
#endif

// Runs fn(device backend) for tensors on `dev`, with the device current (R2).
template <typename Fn>
auto on_backend(const c10::Device& dev, int64_t stream, const char* name, Fn&& fn) {
  if (dev.is_cpu()) {
    cpu::CpuDevice cpu_backend;
    return fn(static_cast<engine::Device&>(cpu_backend));
  }
#if defined(MOE_COMM_WITH_CUDA)
  DeviceGuard guard(dev);
  return fn(static_cast<engine::Device&>(cuda_device(dev, stream)));
#else
  (void)stream;
  fail_without_cuda(name, dev);
#endif
}

using SendPlan = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// -> tokens_per_rank [W], pairs_per_expert [E], send_offsets [W + 1], send_token [>= n_send],
//    pair_slot [T, K], first_slot [T, K], on topk_idx's device. On the CPU send_token holds
//    exactly n_send = send_offsets[W] slots; on CUDA it has room for W * T.
SendPlan plan_send(const Tensor& topk_idx, int64_t num_experts, int64_t num_ranks, int64_t stream) {
  const Routing r = routing_of(topk_idx, num_experts, num_ranks, topk_idx.device());
  return on_backend(topk_idx.device(), stream, "topk_idx", [&](engine::Device& device) {
    TorchAllocator alloc(topk_idx.device());
    engine::StagePlan plan;
    device.plan_send(r, engine::Capacity{}, alloc, plan);
    const int64_t slots = plan.send_token.bytes / int64_t(sizeof(int64_t));
    return SendPlan{as_tensor(plan.rows_per_dest, torch::kInt64, {num_ranks}),
                    as_tensor(plan.pairs_per_expert, torch::kInt64, {num_experts}),
                    as_tensor(plan.send_offsets, torch::kInt64, {num_ranks + 1}),
                    as_tensor(plan.send_token, torch::kInt64, {slots}),
                    as_tensor(plan.pair_slot, torch::kInt64, {r.num_tokens, r.topk}),
                    as_tensor(plan.first_slot, torch::kInt64, {r.num_tokens, r.topk})};
  });
}

// -> kept_idx [T, K] (pairs past `capacity` per expert as -1), dropped [1], on topk_idx's
//    device: the capacity passes of the send plan (by_weight: the largest weights stay).
std::tuple<Tensor, Tensor> drop_by_capacity(const Tensor& topk_idx, const std::optional<Tensor>& weights,
                                            int64_t num_experts, int64_t capacity, bool by_weight, int64_t stream) {
  const Routing r = routing_of(topk_idx, num_experts, 1, topk_idx.device());
  MOE_HOST_ASSERT(capacity >= 0, "capacity must be >= 0, got " << capacity);
  const float* w = optional_weights(weights, r.num_tokens, r.topk, "weights", topk_idx.device());
  MOE_HOST_ASSERT(!by_weight || weights, "by_weight needs weights");
  return on_backend(topk_idx.device(), stream, "topk_idx", [&](engine::Device& device) {
    TorchAllocator alloc(topk_idx.device());
    engine::StagePlan plan;
    device.plan_send(r, engine::Capacity{capacity, by_weight, w}, alloc, plan);
    return std::tuple<Tensor, Tensor>{as_tensor(plan.kept_idx, torch::kInt64, {r.num_tokens, r.topk}),
                                      as_tensor(plan.dropped, torch::kInt64, {1})};
  });
}

// -> tokens_per_rank [W] on topk_idx's device: the counts-only plan (the hierarchical header's).
Tensor count_tokens(const Tensor& topk_idx, int64_t num_experts, int64_t num_ranks, int64_t stream) {
  const Routing r = routing_of(topk_idx, num_experts, num_ranks, topk_idx.device());
  Tensor out = torch::empty({num_ranks}, topk_idx.options());
  on_backend(topk_idx.device(), stream, "topk_idx", [&](engine::Device& device) {
    TorchAllocator alloc(topk_idx.device());
    device.count_tokens(r, alloc, out.data_ptr<int64_t>());
    return 0;
  });
  return out;
}

// Rows per local expert, read from the rows' slot metadata (for callers without a header).
Tensor count_arrivals(const Tensor& rows, const RowFormat& f, int64_t topk, int64_t experts) {
  Tensor meta = rows.narrow(1, f.meta_offset, f.meta_bytes).contiguous().view(torch::kInt32);
  Tensor local = meta.view({rows.size(0), topk, 2}).select(2, 0).reshape({-1});
  local = local.masked_select(local >= 0).to(torch::kInt64);
  return torch::bincount(local, {}, experts).narrow(0, 0, experts).cpu();
}

using Expanded = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// -> recv_x [R, H], recv_weights [R], tokens_per_expert [E_local] (CPU), row_map [N, K],
//    slot_weights [N, K]. row_order: optional permutation of the rows giving (source rank,
//    source token) order. tokens_per_expert: the counts the header exchange announced (then
//    nothing waits on the device).
Expanded expand_rows(const Tensor& rows, int64_t hidden, c10::ScalarType dtype, int64_t topk,
                     int64_t experts_per_rank, const std::optional<Tensor>& row_order,
                     const std::optional<Tensor>& tokens_per_expert, int64_t stream) {
  const c10::Device dev = rows.device();
  expect(rows, "rows", torch::kUInt8, 2, dev);
  const DType dt = to_dtype(dtype, "dtype");
  const RowFormat f = make_row_format(hidden, dtype_size(dt), topk, sizeof(SlotMeta));
  MOE_HOST_ASSERT(rows.size(1) == f.row_bytes, "rows are " << rows.size(1) << " bytes wide, expected " << f.row_bytes);
  const int64_t N = rows.size(0);
  if (row_order) {
    expect(*row_order, "row_order", torch::kInt64, 1, dev);
    MOE_HOST_ASSERT(row_order->size(0) == N, "row_order has " << row_order->size(0) << " entries for " << N << " rows");
    Tensor seen = torch::zeros({N}, row_order->options());
    if (N) seen.index_add_(0, *row_order, torch::ones_like(*row_order));
    MOE_HOST_ASSERT(N == 0 || (seen == 1).all().item<bool>(), "row_order is not a permutation");
  }
  Tensor counts;
  if (tokens_per_expert) {
    expect(*tokens_per_expert, "tokens_per_expert", torch::kInt64, 1);
    MOE_HOST_ASSERT(tokens_per_expert->size(0) == experts_per_rank,
                    "tokens_per_expert has " << tokens_per_expert->size(0) << " entries for " << experts_per_rank
                                             << " local experts");
    counts = tokens_per_expert->contiguous();
  } else {
    counts = count_arrivals(rows, f, topk, experts_per_rank);
  }
  std::vector<int64_t> offsets(experts_per_rank + 1, 0);
  for (int64_t e = 0; e < experts_per_rank; ++e) offsets[e + 1] = offsets[e] + counts[e].item<int64_t>();
  const int64_t R = offsets.back();
  Tensor recv_x = torch::empty({R, hidden}, rows.options().dtype(dtype));
  Tensor recv_weights = torch::empty({R}, rows.options().dtype(torch::kFloat32));
  Tensor row_map = torch::empty({N, topk}, rows.options().dtype(torch::kInt64));
  Tensor slot_weights = torch::empty({N, topk}, rows.options().dtype(torch::kFloat32));
  engine::ExpandArgs a;
  a.rows = rows.data_ptr<uint8_t>();
  a.num_rows = N;
  a.fmt = f;
  a.topk = topk;
  a.experts_per_rank = experts_per_rank;
  a.dtype = dt;
  a.hidden = hidden;
  a.row_order = row_order ? row_order->data_ptr<int64_t>() : nullptr;
  a.expert_offsets = offsets.data();
  a.row_map = row_map.data_ptr<int64_t>();
  a.slot_weights = slot_weights.data_ptr<float>();
  a.recv_weights = recv_weights.data_ptr<float>();
  a.recv_x = static_cast<uint8_t*>(recv_x.data_ptr());
  on_backend(dev, stream, "rows", [&](engine::Device& device) {
    TorchAllocator alloc(dev);
    engine::Array status = alloc.allocate(int64_t(sizeof(int64_t)));
    a.status = status.as<int64_t>();
    device.expand(a, alloc);
    return 0;
  });
  return {recv_x, recv_weights, counts, row_map, slot_weights};
}

}  // namespace

void register_plan_ops(py::module_& m) {
  m.def("plan_send", &plan_send, py::arg("topk_idx"), py::arg("num_experts"), py::arg("num_ranks"),
        py::arg("stream") = 0);
  m.def("drop_by_capacity", &drop_by_capacity, py::arg("topk_idx"), py::arg("weights"), py::arg("num_experts"),
        py::arg("capacity"), py::arg("by_weight"), py::arg("stream") = 0);
  m.def("count_tokens", &count_tokens, py::arg("topk_idx"), py::arg("num_experts"), py::arg("num_ranks"),
        py::arg("stream") = 0);
  m.def("expand_rows", &expand_rows, py::arg("rows"), py::arg("hidden"), py::arg("dtype"), py::arg("topk"),
        py::arg("experts_per_rank"), py::arg("row_order"), py::arg("tokens_per_expert") = py::none(),
        py::arg("stream") = 0);
}

}  // namespace bind
}  // namespace moe_comm
