// The engine's CUDA backend: each device call launches the kernels of csrc/kernels on the
// caller's stream (set per engine call). Torch-free: memory comes from the engine's allocator.
// Compiled where CUDA is; it has not run on a GPU yet.
#pragma once

#if defined(MOE_COMM_WITH_CUDA)
#include <cuda_runtime_api.h>

#include <functional>
#include <memory>
#include <string>

#include "device.h"

namespace moe_comm {
namespace cuda {

class CudaDevice final : public engine::Device {
 public:
  // wait: blocks until `stream` has passed everything enqueued so far, bounded (our NCCL
  // communicator's wait: its deadline and async errors, blaming `stage`), or null for a plain
  // synchronisation.
  using BoundedWait = std::function<void(cudaStream_t, const std::string& stage)>;
  explicit CudaDevice(int device);  // loads every kernel now (CUDA review R1)
  ~CudaDevice() override;
  void set_stream(cudaStream_t stream) { stream_ = stream; }
  cudaStream_t stream() const { return stream_; }
  void set_wait(BoundedWait wait) { wait_ = std::move(wait); }

  bool host_readable() const override { return false; }
  bool capturing() const override;
  void plan_send(const Routing& r, const engine::Capacity& capacity, engine::Allocator& alloc,
                 engine::StagePlan& plan) override;
  void count_tokens(const Routing& r, engine::Allocator& alloc, int64_t* tokens_per_rank) override;
  engine::Array upload(const void* host, int64_t bytes, engine::Allocator& alloc) override;
  void fill_header(const engine::HeaderFill& h) override;
  void relay_header(const engine::HeaderRelay& h) override;
  void download(const std::vector<Transfer>& items, const std::string& stage) override;
  void fill_zero(void* data, int64_t bytes) override;
  void pack_rows(const PackParams& p) override;
  void read_slot_meta(const uint8_t* rows, int64_t num_rows, const RowFormat& fmt, int64_t topk, int64_t* idx,
                      float* weights) override;
  void expand(const engine::ExpandArgs& a, engine::Allocator& alloc) override;
  void scatter_rows(const ScatterParams& p) override;
  void reduce_rows(const ReduceParams& p) override;
  void row_dots(const DotParams& p) override;
  void compose_own_slot(const int64_t* first_slot, int64_t num_in, int64_t topk, const int64_t* map,
                        const float* weights, int64_t* out_map, float* out_weights) override;
  void collect_pairs(const float* per_slot, int64_t per_slot_stride, const int64_t* pair_slot, int64_t num_in,
                     int64_t topk, float* out) override;
  void gather_masked(const float* values, const int64_t* index, int64_t count, float* out) override;
  void mask_by_map(const uint8_t* rows, int64_t stride, const int64_t* map, int64_t num_rows, int64_t topk,
                   float* out) override;

 private:
  uint8_t* pinned(int64_t bytes);  // host staging for download, grown on demand

  int device_;
  cudaStream_t stream_ = nullptr;
  BoundedWait wait_;
  void* pinned_ = nullptr;
  int64_t pinned_bytes_ = 0;
};

}  // namespace cuda
}  // namespace moe_comm
#endif
