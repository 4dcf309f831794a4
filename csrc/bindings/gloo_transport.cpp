#include "gloo_transport.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstring>

namespace moe_comm {
namespace bind {
namespace {

constexpr int64_t kStatusBytes = 16;  // one int64 status per peer, padded to keep rows aligned

at::Tensor bytes_at(uint8_t* data, int64_t n) {
  static uint8_t empty[kStatusBytes];  // from_blob wants memory even for 0 bytes
  return torch::from_blob(n ? data : empty, {n}, torch::TensorOptions().dtype(torch::kUInt8));
}

int64_t total(const std::vector<int64_t>& v) {
  int64_t t = 0;
  for (int64_t x : v) t += x;
  return t;
}

}  // namespace

void sign_roll(const RollCall& roll_call, const std::string& stage, int64_t seq) {
  if (!roll_call.store) return;
  try {
    const std::string rank = std::to_string(roll_call.rank);
    const std::string key = "moe_comm/roll/" + roll_call.buffer_uid + "/" + stage + "/" + std::to_string(seq) + "/" + rank;
    const std::string value = "arrived";
    roll_call.store->set(key, std::vector<uint8_t>(value.begin(), value.end()));
    // Where this rank is stuck, and since when (Unix ms): a peer that names it as missing from
    // another stage can say it was itself waiting here (roll_call.waiting_in).
    const auto now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::system_clock::now().time_since_epoch()).count();
    const std::string where = stage + "@" + std::to_string(now_ms);
    roll_call.store->set("moe_comm/waiting/" + roll_call.buffer_uid + "/" + rank,
                         std::vector<uint8_t>(where.begin(), where.end()));
  } catch (const std::exception&) {  // best effort: the store may be gone with failed peers
  }
}

void GlooTransport::run(uint8_t* send, std::vector<int64_t> send_bytes, uint8_t* recv,
                        std::vector<int64_t> recv_bytes, const std::string& stage, int64_t seq) {
  try {
    at::Tensor in = bytes_at(send, total(send_bytes));
    at::Tensor out = bytes_at(recv, total(recv_bytes));
    c10::intrusive_ptr<c10d::Work> work = group_->alltoall_base(out, in, recv_bytes, send_bytes);
    // At least 1 ms: a wait of 0 means "no timeout" to c10d.
    const auto first = std::chrono::milliseconds(std::max<int64_t>(1, int64_t(roll_call_.sign_after_s * 1000)));
    try {
      work->wait(first);
      return;
    } catch (const std::exception&) {
      if (work->isCompleted()) {  // it failed on its own: the second wait raises that error
        work->wait();
        return;
      }
    }
    sign_roll(roll_call_, stage, seq);  // slow: sign as arrived, so that a stuck but present rank is not named
    work->wait();  // bounded by the group's timeout, the Buffer's
  } catch (const engine::CommFailure&) {
    throw;
  } catch (const std::exception& e) {
    throw engine::CommFailure(e.what(), stage, seq);
  }
}

void GlooTransport::all_to_all(const uint8_t* send, const std::vector<int64_t>& send_bytes, uint8_t* recv,
                               const std::vector<int64_t>& recv_bytes, const int64_t* status_out, int64_t* status_in,
                               const std::string& stage, int64_t seq) {
  uint8_t* writable = const_cast<uint8_t*>(send);  // gloo only reads its input
  if (!status_out) {
    run(writable, send_bytes, recv, recv_bytes, stage, seq);
    return;
  }
  // The status travels in front of each peer's segment: one collective, staged copies.
  const size_t peers = send_bytes.size();
  std::vector<int64_t> staged_send_bytes(peers), staged_recv_bytes(peers);
  for (size_t p = 0; p < peers; ++p) {
    staged_send_bytes[p] = send_bytes[p] + kStatusBytes;
    staged_recv_bytes[p] = recv_bytes[p] + kStatusBytes;
  }
  staged_send_.resize(total(staged_send_bytes));
  staged_recv_.resize(total(staged_recv_bytes));
  int64_t from = 0, to = 0;
  for (size_t p = 0; p < peers; ++p) {
    std::memset(staged_send_.data() + to, 0, kStatusBytes);
    std::memcpy(staged_send_.data() + to, &status_out[p], sizeof(int64_t));
    if (send_bytes[p]) std::memcpy(staged_send_.data() + to + kStatusBytes, send + from, send_bytes[p]);
    from += send_bytes[p];
    to += staged_send_bytes[p];
  }
  run(staged_send_.data(), staged_send_bytes, staged_recv_.data(), staged_recv_bytes, stage, seq);
  from = to = 0;
  for (size_t p = 0; p < peers; ++p) {
    std::memcpy(&status_in[p], staged_recv_.data() + from, sizeof(int64_t));
    if (recv_bytes[p]) std::memcpy(recv + to, staged_recv_.data() + from + kStatusBytes, recv_bytes[p]);
    from += staged_recv_bytes[p];
    to += recv_bytes[p];
  }
}

}  // namespace bind
}  // namespace moe_comm
