#include "deadline_watch.h"

#include <sstream>

namespace moe_comm {

DeadlineWatch::DeadlineWatch(double timeout_s, std::string who, WatchHooks hooks)
    : timeout_s_(timeout_s), who_(std::move(who)), hooks_(std::move(hooks)), thread_([this] { run(); }) {}

DeadlineWatch::~DeadlineWatch() { stop(); }

void DeadlineWatch::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

bool DeadlineWatch::drain(double timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_s));
  std::unique_lock<std::mutex> lock(mutex_);
  while (!pending_.empty() && failure_.empty() && !stop_) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    // The watch thread pops finished work on its 1 ms polls; it does not signal us.
    lock.unlock();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    lock.lock();
  }
  return pending_.empty() && failure_.empty();
}

void DeadlineWatch::watch(std::unique_ptr<WatchedWork> work, const std::string& stage) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_s_));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    pending_.push_back({std::move(work), deadline, stage});
  }
  wake_.notify_all();
}

std::string DeadlineWatch::failure() {
  std::lock_guard<std::mutex> lock(mutex_);
  return failure_;
}

void DeadlineWatch::abort(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  abort_locked(reason);
}

void DeadlineWatch::abort_locked(const std::string& reason) {
  if (!failure_.empty()) return;
  failure_ = reason;
  std::lock_guard<std::mutex> comm_lock(comm_mutex_);
  if (hooks_.abort) hooks_.abort();  // ends the stuck work: the caller's stream drains
  aborted_ = true;
}

void DeadlineWatch::run() {
  if (hooks_.on_thread_start) hooks_.on_thread_start();
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    if (pending_.empty() || !failure_.empty()) {
      wake_.wait(lock);
      continue;
    }
    Pending& oldest = pending_.front();
    std::string work_error;
    const WorkState state = oldest.work->poll(&work_error);
    if (state == WorkState::kDone) {
      pending_.pop_front();
      continue;  // done work drains in one pass
    }
    std::string transport_error;
    if (hooks_.health) {
      std::lock_guard<std::mutex> comm_lock(comm_mutex_);  // C1: never beside a caller's NCCL call
      transport_error = hooks_.health();
    }
    const bool late = std::chrono::steady_clock::now() > oldest.deadline;
    if (state == WorkState::kFailed || !transport_error.empty() || late) {
      std::ostringstream why;
      why << who_ << " failed in stage '" << oldest.stage << "': ";
      if (state == WorkState::kFailed) why << work_error;
      else if (!transport_error.empty()) why << transport_error;
      else why << "not done within " << timeout_s_ << " s (a peer may have died or not arrived)";
      abort_locked(why.str() + "; the communicator was aborted, create a new Buffer");
      continue;
    }
    wake_.wait_for(lock, std::chrono::milliseconds(1));
  }
}

}  // namespace moe_comm
