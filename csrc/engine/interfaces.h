// What the engine (csrc/engine) sees of the world: memory, device work and the wire, as three
// small interfaces. The bindings implement memory with torch tensors and the wire with the
// Buffer's gloo groups (CPU) or our NCCL communicators (CUDA); csrc/cpu implements the CPU
// device work. Torch-free: raw pointers, sizes, byte counts.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/error.h"

namespace moe_comm {
namespace engine {

// A block of memory on the engine's device. `owner` keeps it alive (a torch tensor in the
// bindings, which also hand it back to Python as that tensor).
struct Array {
  std::shared_ptr<void> owner;
  uint8_t* data = nullptr;
  int64_t bytes = 0;

  template <typename T>
  T* as() const { return reinterpret_cast<T*>(data); }
};

class Allocator {
 public:
  virtual ~Allocator() = default;
  // 16-byte aligned, contents undefined, data never null (0 bytes included): the engine
  // passes null pointers to mean "absent".
  virtual Array allocate(int64_t bytes) = 0;
};

// Events of one call, counted by the engine as it drives the backend (CPU and CUDA alike):
// the budgets of README "Engine" are asserted on them.
struct Counters {
  int64_t launches = 0;          // device-work calls: one kernel each on CUDA
  int64_t exchanges = 0;         // transport calls: one NCCL group each on CUDA
  int64_t host_waits = 0;        // the host waits for the device (the dispatch header)
  int64_t host_collectives = 0;  // collectives outside the exchanges (none by design)
};

// A failed or timed-out exchange: the stage and its call number, for the roll call of the
// Python error (transport.describe_failure).
class CommFailure : public Error {
 public:
  CommFailure(const std::string& what, std::string stage_name, int64_t sequence)
      : Error(what), stage(std::move(stage_name)), seq(sequence) {}
  std::string stage;
  int64_t seq;
};

// One stage's all-to-all: destination-major contiguous segments, bytes per peer. status_out
// (one int64 per peer, may be null; in the wire's memory: the host for the CPU wires, the
// device for NCCL) travels in the same exchange and lands in status_in: combine's status. `seq` numbers this rank's exchanges of `stage` (roll call).
class Transport {
 public:
  virtual ~Transport() = default;
  virtual void all_to_all(const uint8_t* send, const std::vector<int64_t>& send_bytes, uint8_t* recv,
                          const std::vector<int64_t>& recv_bytes, const int64_t* status_out, int64_t* status_in,
                          const std::string& stage, int64_t seq) = 0;
};

}  // namespace engine
}  // namespace moe_comm
