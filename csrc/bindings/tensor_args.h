// Shared by the binding files (the only C++ that sees torch): checks tensors and turns them
// into pointers, sizes and strides for the torch-free kernels; runs an op on its tensors' device.
#pragma once

#include <torch/extension.h>

#include <optional>

#include "../core/error.h"
#include "../core/layout.h"
#include "../core/row_format.h"
#include "../core/token_params.h"
#if defined(MOE_COMM_WITH_CUDA)
#include "../kernels/launchers.h"
#endif

namespace moe_comm {
namespace bind {

namespace py = pybind11;
using torch::Tensor;

inline DType to_dtype(c10::ScalarType t, const char* name) {
  switch (t) {
    case torch::kFloat32: return DType::kFloat32;
    case torch::kBFloat16: return DType::kBFloat16;
    case torch::kFloat16: return DType::kFloat16;
    default: break;
  }
  MOE_HOST_ASSERT(false, name << " must be float32, bfloat16 or float16, got " << t);
  return DType::kFloat32;  // unreachable
}

inline void expect_device(const Tensor& t, const char* name, const c10::Device& device) {
  MOE_HOST_ASSERT(t.device() == device, name << " must be on " << device << ", got " << t.device());
}

inline void expect(const Tensor& t, const char* name, c10::ScalarType dtype, int64_t dim,
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

inline RowView row_view(const Tensor& t, const char* name, const c10::Device& device) {
  expect_device(t, name, device);
  MOE_HOST_ASSERT(t.dim() == 2, name << " must be 2-D, got " << t.dim() << " dims");
  // Empty tensors touch no memory (and keep any strides through .contiguous()).
  MOE_HOST_ASSERT(t.numel() == 0 || t.size(1) <= 1 || t.stride(1) == 1, name << " rows must be contiguous");
  return {static_cast<uint8_t*>(t.data_ptr()), t.stride(0) * int64_t(t.element_size()), t.size(0),
          t.size(1), to_dtype(t.scalar_type(), name)};
}

// topk_idx [T, K] int64 on `device` (the pointer is only read on that device).
inline Routing routing_of(const Tensor& topk_idx, int64_t num_experts, int64_t num_ranks,
                          const c10::Device& device = c10::Device(c10::kCPU)) {
  expect(topk_idx, "topk_idx", torch::kInt64, 2, device);
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

inline const float* optional_weights(const std::optional<Tensor>& w, int64_t rows, int64_t topk, const char* name,
                                     const c10::Device& device) {
  if (!w) return nullptr;
  expect(*w, name, torch::kFloat32, 2, device);
  MOE_HOST_ASSERT(w->size(0) == rows && w->size(1) == topk,
                  name << " must be [" << rows << ", " << topk << "], got " << w->sizes());
  return w->data_ptr<float>();
}

// For a CPU-only build handed tensors on another device.
[[noreturn]] inline void fail_without_cuda(const char* name, const c10::Device& device) {
  std::ostringstream msg;
  msg << "moe_comm was built without CUDA: " << name << " on " << device << " is not supported";
  throw_error(__FILE__, __LINE__, msg.str());
}

#if defined(MOE_COMM_WITH_CUDA)
// Makes the tensors' device current for our launches and restores the caller's on exit
// (CUDA review R2): every runtime in the process (torch's, our static one, NCCL's) follows the
// driver's current context, so a bare cudaSetDevice here would also move torch's current
// device under the caller.
class DeviceGuard {
 public:
  explicit DeviceGuard(const c10::Device& device) {
    MOE_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device.index()) {
      MOE_CUDA_CHECK(cudaSetDevice(device.index()));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);  // no throw from a destructor
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

inline cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Runs the CPU kernel for CPU tensors, the CUDA launcher on `stream` for CUDA tensors.
#define MOE_RUN(dev, stream, cpu_fn, cuda_fn, params)            \
  do {                                                           \
    if ((dev).is_cpu()) {                                        \
      cpu_fn(params);                                            \
    } else {                                                     \
      ::moe_comm::bind::DeviceGuard moe_guard_(dev);             \
      MOE_CUDA_CHECK(cuda_fn(params, ::moe_comm::bind::as_stream(stream))); \
    }                                                            \
  } while (0)
#else
#define MOE_RUN(dev, stream, cpu_fn, cuda_fn, params)                            \
  do {                                                                           \
    (void)(stream);                                                              \
    if (!(dev).is_cpu()) ::moe_comm::bind::fail_without_cuda("tensors", (dev)); \
    cpu_fn(params);                                                              \
  } while (0)
#endif

// One register function per binding file; module.cpp calls them all.
void register_layout_ops(py::module_& m);
void register_token_ops(py::module_& m);
void register_plan_ops(py::module_& m);
void register_nccl_ops(py::module_& m);
void register_engine_ops(py::module_& m);

}  // namespace bind
}  // namespace moe_comm
