// The NCCL/CUDA side of core/deadline_watch.h: an exchange is watched through an event recorded
// after it on its stream; a late, failed or errored exchange aborts the communicator
// (ncclCommAbort ends NCCL's kernels, so the caller's stream drains instead of hanging). Once it
// exists, the watch is the one place that aborts the communicator.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <memory>
#include <string>

#include "../core/deadline_watch.h"

namespace moe_comm {
namespace comm {

// who: "rank r of n".
std::unique_ptr<DeadlineWatch> make_watchdog(int device, double timeout_s, ncclComm_t comm, std::string who);

// Watches the work enqueued on `stream` so far, under the name of `stage` (throws if CUDA
// cannot record the event: unwatched work would be unbounded).
void watch_stream(DeadlineWatch& watch, cudaStream_t stream, const std::string& stage);

}  // namespace comm
}  // namespace moe_comm
