// Bindings of our NCCL communicator (csrc/comm): one per Buffer stage on CUDA.
#include "tensor_args.h"

#if defined(MOE_COMM_WITH_NCCL)
#include <memory>
#include <string>
#include <vector>

#include "../comm/ep_comm.h"
#endif

namespace moe_comm {
namespace bind {

#if defined(MOE_COMM_WITH_NCCL)
namespace {

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

}  // namespace

void register_nccl_ops(py::module_& m) {
  m.def("nccl_unique_id", [] { return py::bytes(comm::make_unique_id()); });
  py::class_<comm::EpCommunicator, std::shared_ptr<comm::EpCommunicator>>(m, "NcclCommunicator")
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
             py::gil_scoped_release release;
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
#else
void register_nccl_ops(py::module_&) {}
#endif

}  // namespace bind
}  // namespace moe_comm
