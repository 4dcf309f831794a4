// The engine's CPU transport between ranks of one host: shared memory instead of gloo's TCP
// loopback (whose thread hand-offs cost 0.1-0.5 ms per all-to-all on a small box: docs/PERF.md).
// Each rank owns a control block and a data area per stage (POSIX shm, named by the Buffer's
// random token, the stage and the rank); an exchange copies this rank's rows into its data
// area and posts a sequence number, every peer copies its part out and acknowledges. Waits
// sleep on futexes, are bounded by the Buffer's timeout, notice a peer process that died, and
// call `on_slow` once after `sign_after_s` (the roll call). Torch-free.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "../engine/interfaces.h"

namespace moe_comm {
namespace cpu {

class ShmTransport final : public engine::Transport {
 public:
  // peers: the Buffer ranks of the stage's members, in stage order; me: this rank's index.
  ShmTransport(std::string token, std::string stage, std::vector<int64_t> peers, int64_t me, double timeout_s,
               double sign_after_s, std::function<void(const std::string&, int64_t)> on_slow);
  ~ShmTransport() override;
  ShmTransport(const ShmTransport&) = delete;
  ShmTransport& operator=(const ShmTransport&) = delete;

  void all_to_all(const uint8_t* send, const std::vector<int64_t>& send_bytes, uint8_t* recv,
                  const std::vector<int64_t>& recv_bytes, const int64_t* status_out, int64_t* status_in,
                  const std::string& stage, int64_t seq) override;

  struct Control;  // shm layout, shm_transport.cpp

 private:
  struct Mapping {
    void* base = nullptr;
    int64_t bytes = 0;
    uint64_t generation = 0;
  };
  std::string name(int64_t rank, const std::string& part) const;
  Control* control(int64_t p, const std::string& stage, int64_t seq);  // a peer's, opened on first use
  const uint8_t* data_of(int64_t p);                                    // mapped at its generation
  void grow(int64_t bytes);
  // Every peer has mapped what this rank posted: the names can go (the mappings stay), so
  // nothing is left in /dev/shm even if the process never closes its Buffer.
  void release_names();
  // Waits until done() (re-checked after every wake of `word`), bounded; names the peer.
  void wait_for(std::atomic<uint32_t>* word, const std::function<bool()>& done, int64_t peer,
                const std::string& stage, int64_t seq, const char* what);

  std::string token_, stage_;
  std::vector<int64_t> peers_;
  int64_t me_;
  double timeout_s_, sign_after_s_;
  std::function<void(const std::string&, int64_t)> on_slow_;
  std::vector<Mapping> controls_;  // per peer (own at me_)
  std::vector<Mapping> data_;      // per peer: the data area last mapped
  uint32_t sequence_ = 0;
  bool control_named_ = true, data_named_ = true;
};

}  // namespace cpu
}  // namespace moe_comm
