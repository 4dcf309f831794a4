// The engine's CUDA transport: a stage's all-to-all as one grouped ncclSend/ncclRecv on our
// communicator (ep_comm.h), on the stream the engine's CUDA device runs on. Failures become
// engine::CommFailure (stage and call number, for the roll call of the Python error).
// Combine's status words (device memory) travel in the same group as the rows.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "../engine/cuda_device.h"
#include "../engine/interfaces.h"
#include "ep_comm.h"

namespace moe_comm {
namespace comm {

class NcclTransport final : public engine::Transport {
 public:
  NcclTransport(std::shared_ptr<EpCommunicator> comm, std::shared_ptr<cuda::CudaDevice> device)
      : comm_(std::move(comm)), device_(std::move(device)) {}
  void all_to_all(const uint8_t* send, const std::vector<int64_t>& send_bytes, uint8_t* recv,
                  const std::vector<int64_t>& recv_bytes, const int64_t* status_out, int64_t* status_in,
                  const std::string& stage, int64_t seq) override;

 private:
  std::shared_ptr<EpCommunicator> comm_;
  std::shared_ptr<cuda::CudaDevice> device_;
};

}  // namespace comm
}  // namespace moe_comm
