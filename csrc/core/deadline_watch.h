// Bounds work that nobody waits for on the host (combine and the backwards enqueue their
// exchanges and return). Each watched piece of work gets a deadline; a thread polls the oldest.
// Past its deadline, or when the work or the transport reports an error, the thread aborts the
// transport once (the first reason wins) and keeps the reason for the next call to raise.
// Torch-free and CUDA-free, so that its timing is tested on any machine (tests/cpp); the NCCL
// side (an event per exchange, ncclCommAbort) is csrc/comm/watchdog.h.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace moe_comm {

enum class WorkState { kDone, kRunning, kFailed };

class WatchedWork {
 public:
  virtual ~WatchedWork() = default;
  // kFailed sets *error to what went wrong.
  virtual WorkState poll(std::string* error) = 0;
};

struct WatchHooks {
  std::function<void()> on_thread_start;  // e.g. select the device on the watch thread
  std::function<std::string()> health;    // "" while the transport is healthy, else its error
  std::function<void()> abort;            // ends the transport's stuck work; called at most once
};

class DeadlineWatch {
 public:
  // who: "rank r of n", for the messages.
  DeadlineWatch(double timeout_s, std::string who, WatchHooks hooks);
  ~DeadlineWatch();
  DeadlineWatch(const DeadlineWatch&) = delete;
  DeadlineWatch& operator=(const DeadlineWatch&) = delete;

  // Watches `work` (enqueued just now) under the name of `stage`, for timeout_s from now.
  void watch(std::unique_ptr<WatchedWork> work, const std::string& stage);
  // Empty while healthy; else why the transport was aborted.
  std::string failure();
  // Aborts once, keeping `reason` (a later reason is dropped).
  void abort(const std::string& reason);
  // Teardown: waits until every watched work is done, the transport failed or timeout_s
  // passed. -> true when everything finished (nothing pending, no failure).
  bool drain(double timeout_s);
  // Joins the watch thread (idempotent). Afterwards nothing aborts any more, so aborted() is
  // final: whoever destroys the transport reads it after stop(), never before (no double abort).
  void stop();

  // Whoever calls into the transport holds this lock and checks aborted() under it: the abort
  // takes the same lock, so nobody uses a transport while (or after) it is torn down.
  // The watch thread takes it too for the health check (NCCL's ncclCommGetAsyncError is not a
  // pure read: it can complete and free the communicator's group job).
  // Lock order: the watch's state lock, then this one; never the other way round.
  std::unique_lock<std::mutex> lock_comm() { return std::unique_lock<std::mutex>(comm_mutex_); }
  bool aborted() const { return aborted_.load(); }

 private:
  struct Pending {
    std::unique_ptr<WatchedWork> work;
    std::chrono::steady_clock::time_point deadline;
    std::string stage;
  };
  void run();
  void abort_locked(const std::string& reason);

  double timeout_s_;
  std::string who_;
  WatchHooks hooks_;
  std::mutex mutex_;       // pending_, failure_, stop_
  std::mutex comm_mutex_;  // calls into the transport
  std::atomic<bool> aborted_{false};
  std::condition_variable wake_;
  std::deque<Pending> pending_;
  std::string failure_;
  bool stop_ = false;
  std::thread thread_;  // last: starts once everything above exists
};

}  // namespace moe_comm
