// Bounds the exchanges nobody waits for on the host (combine, the backwards): each enqueued
// exchange is watched through an event; if it is not done by its deadline (a peer died or never
// came), the watchdog thread aborts the communicator, which ends NCCL's kernels so the caller's
// stream drains instead of hanging, and keeps the reason for the next call to raise. Once it
// exists, it is the one place that aborts the communicator (abort() is safe from any thread).
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
#include <thread>

namespace moe_comm {
namespace comm {

class Watchdog {
 public:
  // who: "rank r of n", for the messages.
  Watchdog(int device, double timeout_s, ncclComm_t comm, std::string who);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Watches the work enqueued on `stream` so far, under the name of `stage`.
  void watch(cudaStream_t stream, const std::string& stage);
  // Empty while healthy; else why the communicator was aborted.
  std::string failure();
  // Aborts the communicator once, keeping `reason` (a later reason is dropped).
  void abort(const std::string& reason);

  // Whoever calls into the communicator holds this lock, and checks aborted() under it: the
  // abort takes the same lock, so nobody uses a communicator while (or after) it is freed.
  // Lock order: the watchdog's state lock, then this one; never the other way round.
  std::unique_lock<std::mutex> lock_comm() { return std::unique_lock<std::mutex>(comm_mutex_); }
  bool aborted() const { return aborted_.load(); }

 private:
  struct Pending {
    cudaEvent_t done;
    std::chrono::steady_clock::time_point deadline;
    std::string stage;
  };
  void run();
  void abort_locked(const std::string& reason);

  int device_;
  double timeout_s_;
  ncclComm_t comm_;
  std::string who_;  // "rank r of n"
  std::mutex mutex_;       // pending_, failure_, stop_
  std::mutex comm_mutex_;  // calls into comm_
  std::atomic<bool> aborted_{false};
  std::condition_variable wake_;
  std::deque<Pending> pending_;
  std::string failure_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace comm
}  // namespace moe_comm
