#include "watchdog.h"

#include "../core/error.h"

namespace moe_comm {
namespace comm {
namespace {

class EventWork : public WatchedWork {
 public:
  explicit EventWork(cudaEvent_t done) : done_(done) {}
  ~EventWork() override { cudaEventDestroy(done_); }

  WorkState poll(std::string* error) override {
    const cudaError_t state = cudaEventQuery(done_);
    if (state == cudaSuccess) return WorkState::kDone;
    if (state == cudaErrorNotReady) return WorkState::kRunning;
    *error = std::string("CUDA: ") + cudaGetErrorString(state);
    return WorkState::kFailed;
  }

 private:
  cudaEvent_t done_;
};

}  // namespace

std::unique_ptr<DeadlineWatch> make_watchdog(int device, double timeout_s, ncclComm_t comm, std::string who) {
  WatchHooks hooks;
  hooks.on_thread_start = [device] {
    cudaSetDevice(device);  // the static runtime's device is per thread
    // Its event queries must not count as unsafe calls while another thread captures a CUDA
    // graph (global capture mode would refuse them and invalidate the capture).
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
  };
  hooks.health = [comm]() -> std::string {
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(comm, &state);
    return state == ncclSuccess || state == ncclInProgress ? std::string() : ncclGetErrorString(state);
  };
  hooks.abort = [comm] { ncclCommAbort(comm); };
  return std::make_unique<DeadlineWatch>(timeout_s, std::move(who), std::move(hooks));
}

void watch_stream(DeadlineWatch& watch, cudaStream_t stream, const std::string& stage) {
  cudaEvent_t done = nullptr;
  MOE_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  auto work = std::make_unique<EventWork>(done);  // owns the event from here on
  MOE_CUDA_CHECK(cudaEventRecord(done, stream));
  watch.watch(std::move(work), stage);
}

}  // namespace comm
}  // namespace moe_comm
