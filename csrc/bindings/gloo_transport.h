// The engine's CPU transport: a stage's all-to-all over one of the Buffer's gloo groups
// (c10d's ProcessGroupGloo, driven from C++). A collective still running after a short while
// signs the roll call in the default store (as moe_comm/roll_call.py reads it), so a failure's
// error can name the ranks that never arrived; a failure becomes engine::CommFailure.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <string>
#include <vector>

#include "../engine/interfaces.h"

namespace moe_comm {
namespace bind {

struct RollCall {
  c10::intrusive_ptr<c10d::Store> store;  // null: nobody signs
  std::string buffer_uid;
  int64_t rank = 0;                       // in the Buffer's group
  double sign_after_s = 1.0;
};

// Signs the roll call of exchange `seq` of `stage` as arrived (best effort).
void sign_roll(const RollCall& roll_call, const std::string& stage, int64_t seq);

class GlooTransport final : public engine::Transport {
 public:
  GlooTransport(c10::intrusive_ptr<c10d::Backend> group, RollCall roll_call)
      : group_(std::move(group)), roll_call_(std::move(roll_call)) {}
  void all_to_all(const uint8_t* send, const std::vector<int64_t>& send_bytes, uint8_t* recv,
                  const std::vector<int64_t>& recv_bytes, const int64_t* status_out, int64_t* status_in,
                  const std::string& stage, int64_t seq) override;

 private:
  void run(uint8_t* send, std::vector<int64_t> send_bytes, uint8_t* recv, std::vector<int64_t> recv_bytes,
           const std::string& stage, int64_t seq);
  c10::intrusive_ptr<c10d::Backend> group_;
  RollCall roll_call_;
  std::vector<uint8_t> staged_send_, staged_recv_;
};

}  // namespace bind
}  // namespace moe_comm
