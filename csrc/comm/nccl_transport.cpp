#include "nccl_transport.h"

#include "../core/error.h"

namespace moe_comm {
namespace comm {
namespace {

std::vector<int64_t> offsets_of(const std::vector<int64_t>& bytes) {
  std::vector<int64_t> offsets(bytes.size(), 0);
  for (size_t p = 1; p < bytes.size(); ++p) offsets[p] = offsets[p - 1] + bytes[p - 1];
  return offsets;
}

}  // namespace

void NcclTransport::all_to_all(const uint8_t* send, const std::vector<int64_t>& send_bytes, uint8_t* recv,
                               const std::vector<int64_t>& recv_bytes, const int64_t* status_out, int64_t* status_in,
                               const std::string& stage, int64_t seq) {
  MOE_HOST_ASSERT(!status_out == !status_in, "stage " << stage << ": a status goes both ways or not at all");
  try {
    comm_->all_to_all(send, send_bytes, offsets_of(send_bytes), recv, recv_bytes, offsets_of(recv_bytes),
                      device_->stream(), stage, status_out, status_in);
  } catch (const engine::CommFailure&) {
    throw;
  } catch (const std::exception& e) {
    throw engine::CommFailure(e.what(), stage, seq);
  }
}

}  // namespace comm
}  // namespace moe_comm
