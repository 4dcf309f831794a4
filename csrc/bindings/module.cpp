// The extension module moe_comm._C: build facts plus the ops of the other binding files.
#include "tensor_args.h"

#if defined(MOE_COMM_WITH_NCCL)
#include "../comm/nccl_info.h"
#endif

namespace moe_comm {
namespace bind {
namespace {

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
}  // namespace bind
}  // namespace moe_comm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace moe_comm::bind;
  py::register_exception<moe_comm::Error>(m, "NativeError", PyExc_RuntimeError);
  m.def("native_build_info", &native_build_info);
  m.attr("SLOT_META_BYTES") = py::int_(sizeof(moe_comm::SlotMeta));  // per top-k slot on the dispatch wire
  register_layout_ops(m);
  register_token_ops(m);
  register_plan_ops(m);
  register_nccl_ops(m);
  register_engine_ops(m);
}
