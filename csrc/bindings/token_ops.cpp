// Bindings of the token ops that move rows: pack (dispatch send), scatter, reduce (combine),
// dots (router-weight gradients). Each runs on its tensors' device.
#include "../cpu/token_ops.h"
#include "tensor_args.h"

namespace moe_comm {
namespace bind {
namespace {

// Packs src rows (one per send slot) into uint8 rows `out` (a reused workspace); with topk_idx
// the dispatch SlotMeta block follows each payload. The row format comes from src's width and
// dtype and topk_idx's K; quantize: FP8 rows (e4m3 and per-128 scales) quantized from src. CPU
// or CUDA, by out's device.
void pack_rows(const Tensor& src, const Tensor& send_token, const Tensor& send_offsets,
               const std::optional<Tensor>& topk_idx, const std::optional<Tensor>& topk_weights,
               int64_t experts_per_rank, const Tensor& out, int64_t stream, bool quantize) {
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
  p.fmt = quantize ? make_fp8_row_format(in.cols, p.topk, sizeof(SlotMeta))
                   : make_row_format(in.cols, dtype_size(in.dtype), p.topk, sizeof(SlotMeta));
  p.quantize = quantize && p.fmt.fp8();  // H = 0: nothing to quantize
  p.quantize_from = in.dtype;
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

}  // namespace

void register_token_ops(py::module_& m) {
  // `stream` (a cudaStream_t as int) only matters on CUDA.
  m.def("pack_rows", &pack_rows, py::arg("src"), py::arg("send_token"), py::arg("send_offsets"),
        py::arg("topk_idx"), py::arg("topk_weights"), py::arg("experts_per_rank"), py::arg("out"),
        py::arg("stream") = 0, py::arg("quantize") = false);
  m.def("scatter_rows", &scatter_rows, py::arg("src"), py::arg("row_map"), py::arg("weights"), py::arg("dst"),
        py::arg("stream") = 0);
  m.def("reduce_rows", &reduce_rows, py::arg("src"), py::arg("map"), py::arg("weights"), py::arg("dst"),
        py::arg("stream") = 0);
  m.def("row_dots", &row_dots, py::arg("a"), py::arg("b"), py::arg("map"), py::arg("stream") = 0);
  // Emulated lanes of the CPU token kernels (tests: run the GPU's lane-strided code paths).
  m.def("set_cpu_lanes", &cpu::set_emulated_lanes, py::arg("lanes"));
  m.def("cpu_lanes", &cpu::emulated_lanes);
}

}  // namespace bind
}  // namespace moe_comm
