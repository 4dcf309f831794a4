// The only C++ file that sees torch: checks tensors, turns them into pointers, sizes and
// strides, calls the torch-free kernels (csrc/core, csrc/cpu, csrc/kernels, csrc/comm).
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

#include "core/error.h"
#include "core/layout.h"
#include "core/routing.h"
#include "core/row_format.h"
#include "cpu/token_ops.h"
#if defined(MOE_COMM_WITH_CUDA)
#include "kernels/launchers.h"
#endif
#if defined(MOE_COMM_WITH_NCCL)
#include "comm/ep_comm.h"
#include "comm/nccl_info.h"
#endif

namespace py = pybind11;
using torch::Tensor;

namespace moe_comm {
namespace {

DType to_dtype(c10::ScalarType t, const char* name) {
  switch (t) {
    case torch::kFloat32: return DType::kFloat32;
    case torch::kBFloat16: return DType::kBFloat16;
    case torch::kFloat16: return DType::kFloat16;
    default: break;
  }
  MOE_HOST_ASSERT(false, name << " must be float32, bfloat16 or float16, got " << t);
  return DType::kFloat32;  // unreachable
}

void expect_device(const Tensor& t, const char* name, const c10::Device& device) {
  MOE_HOST_ASSERT(t.device() == device, name << " must be on " << device << ", got " << t.device());
}

void expect(const Tensor& t, const char* name, c10::ScalarType dtype, int64_t dim,
            const c10::Device& device = c10::Device(c10::kCPU)) {
  expect_device(t, name, device);
  MOE_HOST_ASSERT(t.scalar_type() == dtype, name << " must be " << dtype << ", got " << t.scalar_type());
  MOE_HOST_ASSERT(t.dim() == dim, name << " must have " << dim << " dims, got " << t.dim());
  MOE_HOST_ASSERT(t.is_contiguous(), name << " must be contiguous");
}

// A 2-D row view: unit stride inside a row, any stride between rows (a view into packed rows).
struct RowView {
  uint8_t* data;
  int64_t stride_bytes;
  int64_t rows;
  int64_t cols;
  DType dtype;
};

RowView row_view(const Tensor& t, const char* name, const c10::Device& device = c10::Device(c10::kCPU)) {
  expect_device(t, name, device);
  MOE_HOST_ASSERT(t.dim() == 2, name << " must be 2-D, got " << t.dim() << " dims");
  // Empty tensors touch no memory (and keep any strides through .contiguous()).
  MOE_HOST_ASSERT(t.numel() == 0 || t.size(1) <= 1 || t.stride(1) == 1, name << " rows must be contiguous");
  return {static_cast<uint8_t*>(t.data_ptr()), t.stride(0) * int64_t(t.element_size()), t.size(0),
          t.size(1), to_dtype(t.scalar_type(), name)};
}

Routing routing_of(const Tensor& topk_idx, int64_t num_experts, int64_t num_ranks) {
  expect(topk_idx, "topk_idx", torch::kInt64, 2);
  MOE_HOST_ASSERT(num_ranks > 0 && num_experts % num_ranks == 0,
                  "num_experts " << num_experts << " must be divisible by the group size " << num_ranks);
  Routing r;
  r.topk_idx = topk_idx.data_ptr<int64_t>();
  r.num_tokens = topk_idx.size(0);
  r.topk = topk_idx.size(1);
  r.num_experts = num_experts;
  r.num_ranks = num_ranks;
  return r;
}

const float* optional_weights(const std::optional<Tensor>& w, int64_t rows, int64_t topk, const char* name,
                              const c10::Device& device = c10::Device(c10::kCPU)) {
  if (!w) return nullptr;
  expect(*w, name, torch::kFloat32, 2, device);
  MOE_HOST_ASSERT(w->size(0) == rows && w->size(1) == topk,
                  name << " must be [" << rows << ", " << topk << "], got " << w->sizes());
  return w->data_ptr<float>();
}

#if defined(MOE_COMM_WITH_CUDA)
// Our CUDA runtime is linked statically: its current device is its own, not torch's. Select the
// tensors' device before every launch, or a rank on GPU 3 would launch on GPU 0.
void use_device(const c10::Device& device) { MOE_CUDA_CHECK(cudaSetDevice(device.index())); }
cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Runs the CPU kernel for CPU tensors, the CUDA launcher on `stream` for CUDA tensors.
#define MOE_RUN(dev, stream, cpu_fn, cuda_fn, params)            \
  do {                                                           \
    if ((dev).is_cpu()) {                                        \
      cpu_fn(params);                                            \
    } else {                                                     \
      use_device(dev);                                           \
      MOE_CUDA_CHECK(cuda_fn(params, as_stream(stream)));        \
    }                                                            \
  } while (0)
#else
#define MOE_RUN(dev, stream, cpu_fn, cuda_fn, params)                                        \
  do {                                                                                       \
    MOE_HOST_ASSERT((dev).is_cpu(), "moe_comm was built without CUDA: tensors on " << (dev) \
                                                                                 << " are not supported"); \
    cpu_fn(params);                                                                          \
  } while (0)
#endif

py::tuple row_format(int64_t hidden, int64_t elem_size, int64_t topk, int64_t meta_bytes_per_slot) {
  const RowFormat f = make_row_format(hidden, elem_size, topk, meta_bytes_per_slot);
  return py::make_tuple(f.payload_bytes, f.meta_offset, f.meta_bytes, f.row_bytes);
}

py::tuple check_routing(const Tensor& topk_idx, int64_t num_experts) {
  const RoutingProblem p = find_routing_problem(routing_of(topk_idx, num_experts, 1));
  return py::make_tuple(static_cast<int>(p.kind), p.token, p.slot, p.value);
}

// -> tokens_per_rank [W], pairs_per_expert [E], send_offsets [W + 1], send_token [n_send],
//    pair_slot [T, K], first_slot [T, K]
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> plan_send(const Tensor& topk_idx,
                                                                     int64_t num_experts,
                                                                     int64_t num_ranks) {
  const Routing r = routing_of(topk_idx, num_experts, num_ranks);
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  Tensor tokens_per_rank = torch::empty({num_ranks}, i64);
  Tensor pairs_per_expert = torch::empty({num_experts}, i64);
  count_layout(r, tokens_per_rank.data_ptr<int64_t>(), pairs_per_expert.data_ptr<int64_t>());
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

// Packs src rows (one per send slot) into uint8 rows `out` (a reused workspace); with topk_idx
// the dispatch SlotMeta block follows each payload. The row format comes from src's width and
// dtype and topk_idx's K. CPU or CUDA, by out's device.
void pack_rows(const Tensor& src, const Tensor& send_token, const Tensor& send_offsets,
               const std::optional<Tensor>& topk_idx, const std::optional<Tensor>& topk_weights,
               int64_t experts_per_rank, const Tensor& out, int64_t stream) {
  const c10::Device dev = out.device();
  const RowView in = row_view(src, "src", dev);
  expect(send_token, "send_token", torch::kInt64, 1, dev);
  expect(send_offsets, "send_offsets", torch::kInt64, 1, dev);
  PackParams p;
  p.num_ranks = send_offsets.size(0) - 1;
  p.num_rows = send_token.size(0);
  if (topk_idx) {
    expect(*topk_idx, "topk_idx", torch::kInt64, 2, dev);
    MOE_HOST_ASSERT(topk_idx->size(0) == in.rows, "topk_idx has " << topk_idx->size(0)
                                                      << " rows, src has " << in.rows);
    p.topk_idx = topk_idx->data_ptr<int64_t>();
    p.topk = topk_idx->size(1);
    p.topk_weights = optional_weights(topk_weights, in.rows, p.topk, "topk_weights", dev);
  }
  p.fmt = make_row_format(in.cols, dtype_size(in.dtype), p.topk, sizeof(SlotMeta));
  expect(out, "out", torch::kUInt8, 2, dev);
  MOE_HOST_ASSERT(out.size(0) == p.num_rows && out.size(1) == p.fmt.row_bytes,
                  "out must be [" << p.num_rows << ", " << p.fmt.row_bytes << "], got " << out.sizes());
  if (dev.is_cpu()) {  // our own plans; checked where it costs no device sync
    MOE_HOST_ASSERT(send_offsets[p.num_ranks].item<int64_t>() == p.num_rows,
                    "send_offsets end at " << send_offsets[p.num_ranks].item<int64_t>() << ", not " << p.num_rows);
    const int64_t* tokens = send_token.data_ptr<int64_t>();
    for (int64_t j = 0; j < p.num_rows; ++j) {
      MOE_HOST_ASSERT(tokens[j] >= 0 && tokens[j] < in.rows, "send_token[" << j << "] out of range");
    }
  }
  p.src = in.data;
  p.src_stride = in.stride_bytes;
  p.send_token = send_token.data_ptr<int64_t>();
  p.send_offsets = send_offsets.data_ptr<int64_t>();
  p.dst = out.data_ptr<uint8_t>();
  p.experts_per_rank = experts_per_rank;
  MOE_RUN(dev, stream, cpu::pack_rows, cuda::launch_pack_rows, p);
}

#if defined(MOE_COMM_WITH_CUDA)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> expand_rows_cuda(const Tensor& rows, int64_t hidden,
                                                                   c10::ScalarType dtype, int64_t topk,
                                                                   int64_t experts_per_rank,
                                                                   const std::optional<Tensor>& row_order,
                                                                   int64_t stream);
#endif

// Receiver side of dispatch: -> recv_x [R, H], recv_weights [R], tokens_per_expert [E_local],
//    row_map [N, K], slot_weights [N, K]
//    row_order: optional permutation of the rows giving (source rank, source token) order.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> expand_rows(const Tensor& rows, int64_t hidden,
                                                              c10::ScalarType dtype, int64_t topk,
                                                              int64_t experts_per_rank,
                                                              const std::optional<Tensor>& row_order,
                                                              int64_t stream) {
#if defined(MOE_COMM_WITH_CUDA)
  if (rows.is_cuda()) return expand_rows_cuda(rows, hidden, dtype, topk, experts_per_rank, row_order, stream);
#endif
  (void)stream;
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
  Tensor expert_offsets = torch::zeros({experts_per_rank + 1}, i64);
  expert_offsets.slice(0, 1).copy_(tokens_per_expert.cumsum(0));
  const int64_t total = expert_offsets[experts_per_rank].item<int64_t>();

  Tensor recv_x = torch::empty({total, hidden}, torch::TensorOptions().dtype(dtype));
  Tensor recv_weights = torch::empty({total}, torch::TensorOptions().dtype(torch::kFloat32));
  Tensor row_map = torch::empty({plan.num_rows, topk}, i64);
  Tensor slot_weights = torch::empty({plan.num_rows, topk}, torch::TensorOptions().dtype(torch::kFloat32));
  cpu::fill_expand_plan(plan, expert_offsets.data_ptr<int64_t>(), row_map.data_ptr<int64_t>(),
                        slot_weights.data_ptr<float>(), recv_weights.data_ptr<float>());

  ScatterParams s;
  s.src = plan.rows;
  s.src_stride = plan.fmt.row_bytes;
  s.num_src = plan.num_rows;
  s.row_map = row_map.data_ptr<int64_t>();
  s.topk = topk;
  s.hidden = hidden;
  s.dtype = dt;
  s.dst = static_cast<uint8_t*>(recv_x.data_ptr());
  s.dst_stride = hidden * dtype_size(dt);
  cpu::scatter_rows(s);
  return {recv_x, recv_weights, tokens_per_expert, row_map, slot_weights};
}

void check_map(const Tensor& map, int64_t rows, const char* name, const c10::Device& dev) {
  expect(map, name, torch::kInt64, 2, dev);
  MOE_HOST_ASSERT(map.size(0) == rows, name << " has " << map.size(0) << " rows, expected " << rows);
}

// Index bounds of our own maps, checked where it costs no device sync.
void check_map_targets(const Tensor& map, int64_t target_rows, const char* name) {
  if (map.numel() == 0 || !map.device().is_cpu()) return;
  MOE_HOST_ASSERT(map.max().item<int64_t>() < target_rows,
                  name << " points past the " << target_rows << " rows it indexes");
}

// dst[row_map[i, k]] = weights[i, k] * src[i]   (dst: [R, H], every row written once)
void scatter_rows(const Tensor& src, const Tensor& row_map, const std::optional<Tensor>& weights,
                  const Tensor& dst, int64_t stream) {
  const c10::Device dev = dst.device();
  const RowView in = row_view(src, "src", dev);
  const RowView out = row_view(dst, "dst", dev);
  check_map(row_map, in.rows, "row_map", dev);
  check_map_targets(row_map, out.rows, "row_map");
  MOE_HOST_ASSERT(in.dtype == out.dtype && in.cols == out.cols, "src and dst rows must match");
  ScatterParams p;
  p.src = in.data;
  p.src_stride = in.stride_bytes;
  p.num_src = in.rows;
  p.row_map = row_map.data_ptr<int64_t>();
  p.topk = row_map.size(1);
  p.weights = optional_weights(weights, in.rows, p.topk, "weights", dev);
  p.hidden = in.cols;
  p.dtype = in.dtype;
  p.dst = out.data;
  p.dst_stride = out.stride_bytes;
  MOE_RUN(dev, stream, cpu::scatter_rows, cuda::launch_scatter_rows, p);
}

// dst[i] = sum_k weights[i, k] * src[map[i, k]]   (float32 accumulation)
void reduce_rows(const Tensor& src, const Tensor& map, const std::optional<Tensor>& weights,
                 const Tensor& dst, int64_t stream) {
  const c10::Device dev = dst.device();
  const RowView in = row_view(src, "src", dev);
  const RowView out = row_view(dst, "dst", dev);
  check_map(map, out.rows, "map", dev);
  check_map_targets(map, in.rows, "map");
  MOE_HOST_ASSERT(in.cols == out.cols, "src has " << in.cols << " columns, dst " << out.cols);
  ReduceParams p;
  p.src = in.data;
  p.src_stride = in.stride_bytes;
  p.src_dtype = in.dtype;
  p.map = map.data_ptr<int64_t>();
  p.num_out = out.rows;
  p.topk = map.size(1);
  p.weights = optional_weights(weights, out.rows, p.topk, "weights", dev);
  p.hidden = in.cols;
  p.dst = out.data;
  p.dst_stride = out.stride_bytes;
  p.dst_dtype = out.dtype;
  MOE_RUN(dev, stream, cpu::reduce_rows, cuda::launch_reduce_rows, p);
}

// -> [N, K] float32: dot(a[i], b[map[i, k]])
Tensor row_dots(const Tensor& a, const Tensor& b, const Tensor& map, int64_t stream) {
  const c10::Device dev = a.device();
  const RowView va = row_view(a, "a", dev);
  const RowView vb = row_view(b, "b", dev);
  check_map(map, va.rows, "map", dev);
  check_map_targets(map, vb.rows, "map");
  MOE_HOST_ASSERT(va.cols == vb.cols, "a has " << va.cols << " columns, b " << vb.cols);
  Tensor out = torch::empty({va.rows, map.size(1)}, a.options().dtype(torch::kFloat32));
  DotParams p;
  p.a = va.data;
  p.a_stride = va.stride_bytes;
  p.a_dtype = va.dtype;
  p.b = vb.data;
  p.b_stride = vb.stride_bytes;
  p.b_dtype = vb.dtype;
  p.map = map.data_ptr<int64_t>();
  p.num_rows = va.rows;
  p.topk = map.size(1);
  p.hidden = va.cols;
  p.out = out.data_ptr<float>();
  MOE_RUN(dev, stream, cpu::row_dots, cuda::launch_row_dots, p);
  return out;
}

// -> topk_idx [T, topk] int64: node-limited selection on float32 scores [T, E].
Tensor node_limited_select_cpu(const Tensor& scores, int64_t topk, int64_t num_nodes, int64_t max_nodes,
                           int64_t node_score_topk) {
  expect(scores, "scores", torch::kFloat32, 2);
  Tensor out = torch::empty({scores.size(0), topk}, torch::TensorOptions().dtype(torch::kInt64));
  NodeLimitedParams p;
  p.scores = scores.data_ptr<float>();
  p.num_tokens = scores.size(0);
  p.num_experts = scores.size(1);
  p.num_nodes = num_nodes;
  p.max_nodes = max_nodes;
  p.node_score_topk = node_score_topk;
  p.topk = topk;
  p.topk_idx = out.data_ptr<int64_t>();
  node_limited_select(p);
  return out;
}

#if defined(MOE_COMM_WITH_CUDA)
// -> tokens_per_rank [W], pairs_per_expert [E], token_in_rank [T, W] bool, on topk_idx's device
std::tuple<Tensor, Tensor, Tensor> count_layout_cuda(const Tensor& topk_idx, int64_t num_experts,
                                                     int64_t num_ranks, int64_t stream) {
  MOE_HOST_ASSERT(topk_idx.is_cuda(), "topk_idx must be a CUDA tensor, got " << topk_idx.device());
  use_device(topk_idx.device());
  MOE_HOST_ASSERT(topk_idx.scalar_type() == torch::kInt64 && topk_idx.dim() == 2 && topk_idx.is_contiguous(),
                  "topk_idx must be a contiguous 2-D int64 tensor");
  MOE_HOST_ASSERT(num_ranks > 0 && num_experts % num_ranks == 0,
                  "num_experts " << num_experts << " must be divisible by the group size " << num_ranks);
  auto on = topk_idx.options();
  Tensor tokens_per_rank = torch::empty({num_ranks}, on);
  Tensor pairs_per_expert = torch::empty({num_experts}, on);
  Tensor token_in_rank = torch::empty({topk_idx.size(0), num_ranks}, on.dtype(torch::kBool));
  cuda::LayoutKernelParams p;
  p.topk_idx = topk_idx.data_ptr<int64_t>();
  p.num_tokens = topk_idx.size(0);
  p.topk = topk_idx.size(1);
  p.num_experts = num_experts;
  p.num_ranks = num_ranks;
  p.tokens_per_rank = tokens_per_rank.data_ptr<int64_t>();
  p.pairs_per_expert = pairs_per_expert.data_ptr<int64_t>();
  p.token_in_rank = token_in_rank.data_ptr<bool>();
  MOE_CUDA_CHECK(cuda::launch_count_layout(p, reinterpret_cast<cudaStream_t>(stream)));
  return {tokens_per_rank, pairs_per_expert, token_in_rank};
}

// Device twin of expand_rows: -> recv_x [R, H], recv_weights [R], tokens_per_expert [E_local]
// (on the CPU, as the API promises: the one host synchronisation, which sizes the outputs),
// row_map [N, K], slot_weights [N, K].
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> expand_rows_cuda(const Tensor& rows, int64_t hidden,
                                                                   c10::ScalarType dtype, int64_t topk,
                                                                   int64_t experts_per_rank,
                                                                   const std::optional<Tensor>& row_order,
                                                                   int64_t stream) {
  const c10::Device dev = rows.device();
  MOE_HOST_ASSERT(dev.is_cuda(), "rows must be a CUDA tensor, got " << dev);
  use_device(dev);
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
  Tensor tokens_per_expert = torch::empty({experts_per_rank}, i64);
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
  p.tokens_per_expert = tokens_per_expert.data_ptr<int64_t>();
  p.row_map = row_map.data_ptr<int64_t>();
  p.slot_weights = slot_weights.data_ptr<float>();
  const cudaStream_t s = as_stream(stream);
  MOE_CUDA_CHECK(cuda::launch_expand_count(p, s));
  const size_t scratch_bytes = cuda::expand_scan_workspace_bytes(experts_per_rank * N);
  Tensor scratch = torch::empty({static_cast<int64_t>(scratch_bytes) + 1}, rows.options());
  MOE_CUDA_CHECK(cuda::launch_expand_scan(p, scratch.data_ptr(), scratch_bytes, s));
  Tensor counts = torch::empty({experts_per_rank}, torch::TensorOptions().dtype(torch::kInt64));
  MOE_CUDA_CHECK(cudaMemcpyAsync(counts.data_ptr<int64_t>(), p.tokens_per_expert,
                                 experts_per_rank * sizeof(int64_t), cudaMemcpyDeviceToHost, s));
  MOE_CUDA_CHECK(cudaStreamSynchronize(s));
  const int64_t total = counts.sum().item<int64_t>();
  Tensor recv_x = torch::empty({total, hidden}, rows.options().dtype(dtype));
  Tensor recv_weights = torch::empty({total}, rows.options().dtype(torch::kFloat32));
  p.recv_weights = recv_weights.data_ptr<float>();
  MOE_CUDA_CHECK(cuda::launch_expand_fill(p, s));
  ScatterParams c;
  c.src = p.rows;
  c.src_stride = f.row_bytes;
  c.num_src = N;
  c.row_map = p.row_map;
  c.topk = topk;
  c.hidden = hidden;
  c.dtype = dt;
  c.dst = static_cast<uint8_t*>(recv_x.data_ptr());
  c.dst_stride = hidden * dtype_size(dt);
  MOE_CUDA_CHECK(cuda::launch_scatter_rows(c, s));
  return {recv_x, recv_weights, counts, row_map, slot_weights};
}

#endif

#if defined(MOE_COMM_WITH_NCCL)
// Byte ranges of one uint8 CUDA buffer, one per peer, checked against its size.
void check_ranges(const Tensor& buf, const char* name, const std::vector<int64_t>& bytes,
                  const std::vector<int64_t>& offsets) {
  MOE_HOST_ASSERT(buf.is_cuda() && buf.scalar_type() == torch::kUInt8 && buf.is_contiguous(),
                  name << " must be a contiguous uint8 CUDA tensor");
  for (size_t p = 0; p < bytes.size(); ++p) {
    MOE_HOST_ASSERT(bytes[p] >= 0 && offsets[p] >= 0 && offsets[p] + bytes[p] <= buf.numel(),
                    name << " range of peer " << p << " [" << offsets[p] << ", +" << bytes[p]
                         << ") exceeds its " << buf.numel() << " bytes");
  }
}

void register_nccl(py::module_& m) {
  m.def("nccl_unique_id", [] { return py::bytes(comm::make_unique_id()); });
  py::class_<comm::EpCommunicator>(m, "NcclCommunicator")
      .def(py::init([](const py::bytes& id, int size, int rank, int device, double timeout_s) {
             std::string raw = id;
             py::gil_scoped_release release;
             return new comm::EpCommunicator(raw, size, rank, device, timeout_s);
           }),
           py::arg("unique_id"), py::arg("size"), py::arg("rank"), py::arg("device"), py::arg("timeout_s"))
      .def("all_to_all",
           [](comm::EpCommunicator& c, const Tensor& send, const std::vector<int64_t>& send_bytes,
              const std::vector<int64_t>& send_offsets, const Tensor& recv, const std::vector<int64_t>& recv_bytes,
              const std::vector<int64_t>& recv_offsets, int64_t stream, const std::string& stage) {
             check_ranges(send, "send", send_bytes, send_offsets);
             check_ranges(recv, "recv", recv_bytes, recv_offsets);
             MOE_HOST_ASSERT(send.device() == recv.device(), "send and recv must be on one device");
             c.all_to_all(send.data_ptr<uint8_t>(), send_bytes, send_offsets, recv.data_ptr<uint8_t>(), recv_bytes,
                          recv_offsets, as_stream(stream), stage);
           },
           py::arg("send"), py::arg("send_bytes"), py::arg("send_offsets"), py::arg("recv"), py::arg("recv_bytes"),
           py::arg("recv_offsets"), py::arg("stream"), py::arg("stage"))
      .def("wait", [](comm::EpCommunicator& c, int64_t stream, const std::string& stage) {
             py::gil_scoped_release release;
             c.wait(as_stream(stream), stage);
           }, py::arg("stream"), py::arg("stage"))
      .def_property_readonly("rank", &comm::EpCommunicator::rank)
      .def_property_readonly("size", &comm::EpCommunicator::size);
}
#endif

py::dict native_build_info() {
  py::dict info;
#if defined(MOE_COMM_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_archs_compiled"] = std::string(MOE_COMM_CUDA_ARCHS);
  info["cuda_runtime"] = cuda::runtime_version();
#else
  info["cuda"] = false;
  info["cuda_archs_compiled"] = std::string();
  info["cuda_runtime"] = py::none();
#endif
#if defined(MOE_COMM_WITH_NCCL)
  info["nccl"] = comm::nccl_version_string();
#else
  info["nccl"] = py::none();
#endif
  return info;
}

}  // namespace
}  // namespace moe_comm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace moe_comm;
  py::register_exception<Error>(m, "NativeError", PyExc_RuntimeError);
  m.def("native_build_info", &native_build_info);
  m.def("row_format", &row_format, "(payload_bytes, meta_offset, meta_bytes, row_bytes)");
  m.def("check_routing", &check_routing);
  m.def("plan_send", &plan_send);
  // Token ops run on the tensors' device; `stream` (a cudaStream_t as int) only matters on CUDA.
  m.def("pack_rows", &pack_rows, py::arg("src"), py::arg("send_token"), py::arg("send_offsets"),
        py::arg("topk_idx"), py::arg("topk_weights"), py::arg("experts_per_rank"), py::arg("out"),
        py::arg("stream") = 0);
  m.def("expand_rows", &expand_rows, py::arg("rows"), py::arg("hidden"), py::arg("dtype"), py::arg("topk"),
        py::arg("experts_per_rank"), py::arg("row_order"), py::arg("stream") = 0);
  m.def("scatter_rows", &scatter_rows, py::arg("src"), py::arg("row_map"), py::arg("weights"), py::arg("dst"),
        py::arg("stream") = 0);
  m.def("reduce_rows", &reduce_rows, py::arg("src"), py::arg("map"), py::arg("weights"), py::arg("dst"),
        py::arg("stream") = 0);
  m.def("row_dots", &row_dots, py::arg("a"), py::arg("b"), py::arg("map"), py::arg("stream") = 0);
  m.def("node_limited_select", &node_limited_select_cpu);
#if defined(MOE_COMM_WITH_NCCL)
  register_nccl(m);
#endif
#if defined(MOE_COMM_WITH_CUDA)
  m.def("count_layout_cuda", &count_layout_cuda);

#endif
}
