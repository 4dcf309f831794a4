// The engines' memory: torch tensors on the engine's device (the caching allocator on CUDA),
// kept alive by the Array that hands them out.
#pragma once

#include <algorithm>
#include <memory>
#include <vector>

#include "../engine/interfaces.h"
#include "tensor_args.h"

namespace moe_comm {
namespace bind {

class TorchAllocator final : public engine::Allocator {
 public:
  explicit TorchAllocator(c10::Device device) : device_(device) {}
  // Never a null pointer, even for 0 bytes: the engine reads "null" as "absent" (no weights).
  engine::Array allocate(int64_t bytes) override {
    Tensor storage = torch::empty({std::max<int64_t>(bytes, 16)}, torch::TensorOptions().dtype(torch::kUInt8).device(device_));
    engine::Array a;
    a.data = static_cast<uint8_t*>(storage.data_ptr());
    a.bytes = bytes;
    a.owner = std::make_shared<Tensor>(storage.narrow(0, 0, bytes));
    return a;
  }

 private:
  c10::Device device_;
};

// The tensor behind an engine Array, as [rows, cols] of `dtype`.
inline Tensor as_tensor(const engine::Array& a, c10::ScalarType dtype, std::vector<int64_t> shape) {
  MOE_HOST_ASSERT(a.owner, "an engine output was never allocated");
  return std::static_pointer_cast<Tensor>(a.owner)->view(dtype).view(shape);
}

}  // namespace bind
}  // namespace moe_comm
