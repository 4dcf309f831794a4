#include "watchdog.h"

#include <sstream>

namespace moe_comm {
namespace comm {

Watchdog::Watchdog(int device, double timeout_s, ncclComm_t comm, std::string who)
    : device_(device), timeout_s_(timeout_s), comm_(comm), who_(std::move(who)), thread_([this] { run(); }) {}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
  for (Pending& p : pending_) cudaEventDestroy(p.done);
}

void Watchdog::watch(cudaStream_t stream, const std::string& stage) {
  cudaEvent_t done = nullptr;
  if (cudaEventCreateWithFlags(&done, cudaEventDisableTiming) != cudaSuccess) return;
  if (cudaEventRecord(done, stream) != cudaSuccess) {
    cudaEventDestroy(done);
    return;
  }
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_s_));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    pending_.push_back({done, deadline, stage});
  }
  wake_.notify_all();
}

std::string Watchdog::failure() {
  std::lock_guard<std::mutex> lock(mutex_);
  return failure_;
}

void Watchdog::abort(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  abort_locked(reason);
}

void Watchdog::abort_locked(const std::string& reason) {
  if (!failure_.empty()) return;
  failure_ = reason;
  std::lock_guard<std::mutex> comm_lock(comm_mutex_);
  ncclCommAbort(comm_);  // ends the stuck kernels: the caller's stream drains
  aborted_ = true;
}

void Watchdog::run() {
  cudaSetDevice(device_);  // our static runtime's current device is per thread
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    if (pending_.empty() || !failure_.empty()) {
      wake_.wait(lock);
      continue;
    }
    Pending& oldest = pending_.front();
    const cudaError_t state = cudaEventQuery(oldest.done);
    if (state == cudaSuccess) {
      cudaEventDestroy(oldest.done);
      pending_.pop_front();
      continue;
    }
    ncclResult_t async = ncclSuccess;
    ncclCommGetAsyncError(comm_, &async);
    const bool late = std::chrono::steady_clock::now() > oldest.deadline;
    if (state != cudaErrorNotReady || (async != ncclSuccess && async != ncclInProgress) || late) {
      std::ostringstream why;
      why << who_ << " failed in stage '" << oldest.stage << "': ";
      if (state != cudaErrorNotReady) why << "CUDA: " << cudaGetErrorString(state);
      else if (late) why << "not done within " << timeout_s_ << " s (a peer may have died or not arrived)";
      else why << ncclGetErrorString(async);
      abort_locked(why.str() + "; the communicator was aborted, create a new Buffer");
      continue;
    }
    wake_.wait_for(lock, std::chrono::milliseconds(1));  // done events drain in one pass
  }
}

}  // namespace comm
}  // namespace moe_comm
