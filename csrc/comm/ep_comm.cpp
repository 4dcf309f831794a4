#include "ep_comm.h"

#include <chrono>
#include <cstring>
#include <sstream>
#include <thread>

#include "../core/backoff.h"
#include "../core/error.h"

namespace moe_comm {
namespace comm {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

std::string make_unique_id() {
  ncclUniqueId id;
  MOE_NCCL_CHECK(ncclGetUniqueId(&id));
  return std::string(id.internal, sizeof(id.internal));
}

EpCommunicator::EpCommunicator(const std::string& unique_id, int size, int rank, int device, double timeout_s)
    : size_(size), rank_(rank), device_(device), timeout_s_(timeout_s) {
  MOE_HOST_ASSERT(unique_id.size() == sizeof(ncclUniqueId::internal),
                  "unique_id must be " << sizeof(ncclUniqueId::internal) << " bytes, got " << unique_id.size());
  MOE_HOST_ASSERT(size > 0 && rank >= 0 && rank < size, "rank " << rank << " of " << size);
  MOE_HOST_ASSERT(timeout_s > 0, "timeout must be positive, got " << timeout_s);
  MOE_CUDA_CHECK(cudaSetDevice(device_));
  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // so that a peer that never joins ends in our timeout, not a hang
  const ncclResult_t res = ncclCommInitRankConfig(&comm_, size, id, rank, &config);
  if (res != ncclSuccess && res != ncclInProgress) {
    fail("init", std::string("ncclCommInitRankConfig: ") + ncclGetErrorString(res));
  }
  wait_ready("init");
  MOE_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  std::ostringstream who;
  who << "rank " << rank_ << " of " << size_;
  watchdog_ = make_watchdog(device_, timeout_s_, comm_, who.str());
}

EpCommunicator::~EpCommunicator() {
  if (done_) cudaEventDestroy(done_);
  // In-flight exchanges finish first: aborting them would leave this rank's outputs silently
  // wrong and its peers waiting for rows that never come. Bounded by the timeout.
  const bool drained = watchdog_ ? watchdog_->drain(timeout_s_) : true;
  if (watchdog_) watchdog_->stop();  // from here on nothing else aborts comm_
  const bool watchdog_aborted = watchdog_ && watchdog_->aborted();
  watchdog_.reset();
  if (!comm_ || aborted_ || watchdog_aborted) return;  // already aborted: comm_ is gone
  cudaSetDevice(device_);
  if (drained && finalize()) {
    ncclCommDestroy(comm_);
  } else {
    ncclCommAbort(comm_);  // stuck or failed: the bounded way out
  }
}

bool EpCommunicator::finalize() {
  ncclResult_t res = ncclCommFinalize(comm_);
  const auto start = Clock::now();
  ncclResult_t state = res;
  PollBackoff backoff;
  while (res == ncclSuccess || res == ncclInProgress) {
    if (ncclCommGetAsyncError(comm_, &state) != ncclSuccess) return false;
    if (state != ncclInProgress) break;
    if (seconds_since(start) > timeout_s_) return false;
    backoff.pause();
  }
  return (res == ncclSuccess || res == ncclInProgress) && state == ncclSuccess;
}

void EpCommunicator::fail(const std::string& stage, const std::string& why) {
  std::ostringstream out;
  out << "rank " << rank_ << " of " << size_ << " failed in stage '" << stage << "': " << why;
  if (watchdog_) {
    watchdog_->abort(out.str());
  } else if (comm_ && !aborted_) {
    ncclCommAbort(comm_);
    aborted_ = true;
  }
  throw_error(__FILE__, __LINE__, out.str());
}

void EpCommunicator::throw_if_aborted(const std::string& stage) {
  MOE_HOST_ASSERT(!aborted_, "the communicator was aborted by an earlier failure (stage '" << stage << "')");
  const std::string failure = watchdog_ ? watchdog_->failure() : std::string();
  if (!failure.empty()) throw_error(__FILE__, __LINE__, failure + " (raised at stage '" + stage + "')");
}

bool EpCommunicator::nccl_in_progress(const std::string& stage) {
  ncclResult_t state = ncclSuccess;
  ncclResult_t res = ncclSuccess;
  std::string last_error;
  {
    std::unique_lock<std::mutex> guard;
    if (watchdog_) {
      guard = watchdog_->lock_comm();
      if (watchdog_->aborted()) {
        guard.unlock();
        throw_if_aborted(stage);
      }
    }
    res = ncclCommGetAsyncError(comm_, &state);
    if (state != ncclSuccess && state != ncclInProgress) last_error = ncclGetLastError(comm_);
  }
  // fail() aborts through the watchdog, which takes the communicator lock: call it unlocked.
  if (res != ncclSuccess) fail(stage, std::string("ncclCommGetAsyncError: ") + ncclGetErrorString(res));
  if (state != ncclSuccess && state != ncclInProgress) {
    fail(stage, std::string(ncclGetErrorString(state)) + ": " + last_error);
  }
  return state == ncclInProgress;
}

void EpCommunicator::check_deadline(double elapsed_s, const std::string& stage, const char* what) {
  if (elapsed_s <= timeout_s_) return;
  std::ostringstream why;
  why << what << " within " << timeout_s_ << " s";
  fail(stage, why.str());
}

void EpCommunicator::wait_ready(const std::string& stage) {
  const auto start = Clock::now();
  PollBackoff backoff;  // the launch thread usually finishes within the spin (review C2)
  while (nccl_in_progress(stage)) {
    check_deadline(seconds_since(start), stage, "peers did not arrive");
    backoff.pause();
  }
}

void EpCommunicator::all_to_all(const uint8_t* send, const std::vector<int64_t>& send_bytes,
                                const std::vector<int64_t>& send_offsets, uint8_t* recv,
                                const std::vector<int64_t>& recv_bytes, const std::vector<int64_t>& recv_offsets,
                                cudaStream_t stream, const std::string& stage, const int64_t* status_out,
                                int64_t* status_in) {
  throw_if_aborted(stage);
  MOE_HOST_ASSERT(int(send_bytes.size()) == size_ && int(send_offsets.size()) == size_ &&
                      int(recv_bytes.size()) == size_ && int(recv_offsets.size()) == size_,
                  "all_to_all needs one size and offset per peer (" << size_ << ")");
  MOE_CUDA_CHECK(cudaSetDevice(device_));
  // Enqueue every peer, remember the first failure, and always close the group: an open group
  // would swallow this thread's next NCCL calls. The watchdog cannot abort meanwhile.
  ncclResult_t first = ncclSuccess;
  const char* what = "";
  std::string last_error;
  {
    auto guard = watchdog_->lock_comm();
    if (watchdog_->aborted()) {
      guard.unlock();
      throw_if_aborted(stage);
    }
    auto keep = [&](ncclResult_t r, const char* call) {
      if (first == ncclSuccess && r != ncclSuccess && r != ncclInProgress) {
        first = r;
        what = call;
      }
    };
    keep(ncclGroupStart(), "ncclGroupStart");
    for (int peer = 0; peer < size_ && first == ncclSuccess; ++peer) {
      if (send_bytes[peer] > 0) {
        keep(ncclSend(send + send_offsets[peer], size_t(send_bytes[peer]), ncclUint8, peer, comm_, stream),
             "ncclSend");
      }
      if (recv_bytes[peer] > 0) {
        keep(ncclRecv(recv + recv_offsets[peer], size_t(recv_bytes[peer]), ncclUint8, peer, comm_, stream),
             "ncclRecv");
      }
      if (status_out) {  // combine's status: one word each way, in the rows' group
        keep(ncclSend(status_out + peer, 1, ncclInt64, peer, comm_, stream), "ncclSend");
        keep(ncclRecv(status_in + peer, 1, ncclInt64, peer, comm_, stream), "ncclRecv");
      }
    }
    keep(ncclGroupEnd(), "ncclGroupEnd");
    if (first != ncclSuccess) last_error = ncclGetLastError(comm_);
  }
  if (first != ncclSuccess) fail(stage, std::string(what) + ": " + ncclGetErrorString(first) + ": " + last_error);
  wait_ready(stage);
  // Under CUDA graph capture nothing runs now (the exchange runs at each replay): there is no
  // event to watch, and querying one recorded in a capture would fail.
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  MOE_CUDA_CHECK(cudaStreamIsCapturing(stream, &capturing));
  if (capturing == cudaStreamCaptureStatusNone) watch_stream(*watchdog_, stream, stage);
}

void EpCommunicator::wait(cudaStream_t stream, const std::string& stage) {
  throw_if_aborted(stage);
  MOE_CUDA_CHECK(cudaSetDevice(device_));
  MOE_CUDA_CHECK(cudaEventRecord(done_, stream));
  const auto start = Clock::now();
  PollBackoff backoff;  // review C3: no 88 us sleep granularity on the dispatch's one sync
  while (true) {
    const cudaError_t query = cudaEventQuery(done_);
    if (query == cudaSuccess) {
      // An abort by the watchdog (a peer's deadline) also lets the stream drain: done is not
      // success then, and what the stream produced must not be read.
      throw_if_aborted(stage);
      nccl_in_progress(stage);
      return;
    }
    if (query != cudaErrorNotReady) fail(stage, std::string("CUDA: ") + cudaGetErrorString(query));
    nccl_in_progress(stage);
    check_deadline(seconds_since(start), stage, "not done (a peer may have died or not arrived)");
    backoff.pause();
  }
}

}  // namespace comm
}  // namespace moe_comm
