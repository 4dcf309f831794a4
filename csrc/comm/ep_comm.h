// The expert-parallel NCCL communicator a Buffer owns (one per stage): never torch's own.
// Variable-size all-to-all as grouped ncclSend/ncclRecv of bytes, and bounded waits: every wait
// polls ncclCommGetAsyncError and a deadline, aborts the communicator on timeout and throws an
// error naming the rank and the stage, instead of hanging.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "watchdog.h"

namespace moe_comm {
namespace comm {

// A fresh ncclUniqueId as bytes (rank 0 makes it; the group shares it).
std::string make_unique_id();

class EpCommunicator {
 public:
  // Joins the communicator of `size` ranks; gives up after timeout_s seconds.
  EpCommunicator(const std::string& unique_id, int size, int rank, int device, double timeout_s);
  // Lets the watched exchanges finish (bounded by the timeout), then finalizes and destroys the
  // communicator; aborts only when they do not finish or NCCL reports an error.
  ~EpCommunicator();
  EpCommunicator(const EpCommunicator&) = delete;
  EpCommunicator& operator=(const EpCommunicator&) = delete;

  // Enqueues on `stream`: to peer p, send_bytes[p] bytes from send + send_offsets[p]; from peer
  // p, recv_bytes[p] bytes into recv + recv_offsets[p]; and, when status_out is given (device
  // memory, one int64 per peer, this rank included), status_out[p] into peer p's status_in[me],
  // in the same group. Returns once enqueued; the watchdog bounds it. Throws first if the
  // watchdog aborted an earlier exchange.
  void all_to_all(const uint8_t* send, const std::vector<int64_t>& send_bytes,
                  const std::vector<int64_t>& send_offsets, uint8_t* recv,
                  const std::vector<int64_t>& recv_bytes, const std::vector<int64_t>& recv_offsets,
                  cudaStream_t stream, const std::string& stage, const int64_t* status_out = nullptr,
                  int64_t* status_in = nullptr);

  // Blocks until the work enqueued on `stream` so far is done, the communicator reports an error,
  // or the deadline passes (then aborts and throws naming rank and stage).
  void wait(cudaStream_t stream, const std::string& stage);

  int rank() const { return rank_; }
  int size() const { return size_; }

 private:
  void wait_ready(const std::string& stage);  // non-blocking NCCL calls in progress
  // Fails on an asynchronous NCCL error; -> true while a non-blocking call is in progress.
  bool nccl_in_progress(const std::string& stage);
  // Fails (aborting) once elapsed_s passes the timeout; `what` says what did not happen.
  void check_deadline(double elapsed_s, const std::string& stage, const char* what);
  [[noreturn]] void fail(const std::string& stage, const std::string& why);
  // ncclCommFinalize, polled to completion within the timeout. -> false on error or timeout.
  bool finalize();

  ncclComm_t comm_ = nullptr;
  int size_ = 0;
  int rank_ = 0;
  int device_ = 0;
  double timeout_s_ = 0;
  cudaEvent_t done_ = nullptr;
  bool aborted_ = false;                 // before the watchdog exists (init)
  std::unique_ptr<DeadlineWatch> watchdog_;  // then it owns aborting
  void throw_if_aborted(const std::string& stage);
};

}  // namespace comm
}  // namespace moe_comm
