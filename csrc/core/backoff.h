// How a host wait on a peer or the device polls: yield for the first kSpinMicros (a NCCL group
// launch or a header sync usually completes within it, and a 20-50 us sleep really sleeps
// 88-119 us on Linux: CUDA review C2, C3), then sleep, doubling from kFirstSleepMicros up to
// kMaxSleepMicros, so that a long wait costs no core. Torch- and CUDA-free (ctest).
#pragma once

#include <chrono>
#include <cstdint>
#include <thread>

namespace moe_comm {

class PollBackoff {
 public:
  static constexpr int64_t kSpinMicros = 200;
  static constexpr int64_t kFirstSleepMicros = 10;
  static constexpr int64_t kMaxSleepMicros = 1000;

  // The pause after `elapsed_us` of waiting and `sleeps` sleeps so far: 0 = yield.
  static int64_t pause_micros(int64_t elapsed_us, int64_t sleeps) {
    if (elapsed_us < kSpinMicros) return 0;
    int64_t pause = kFirstSleepMicros;
    for (int64_t i = 0; i < sleeps && pause < kMaxSleepMicros; ++i) pause *= 2;
    return pause < kMaxSleepMicros ? pause : kMaxSleepMicros;
  }

  // One pause of a poll loop.
  void pause() {
    const int64_t elapsed =
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start_).count();
    const int64_t micros = pause_micros(elapsed, sleeps_);
    if (micros == 0) {
      std::this_thread::yield();
      return;
    }
    ++sleeps_;
    std::this_thread::sleep_for(std::chrono::microseconds(micros));
  }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  int64_t sleeps_ = 0;
};

}  // namespace moe_comm
