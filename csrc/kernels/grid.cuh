// Launch geometry and the loop shared by the kernels that loop with a grid stride.
#pragma once

#include <cstdint>

namespace moe_comm {
namespace cuda {

// Blocks of `threads` for `work` items: one item per thread up to a cap past which the
// grid-stride loops cover the rest; at least one block.
inline unsigned grid_blocks(int64_t work, int threads) {
  constexpr int64_t kMaxBlocks = 65535LL * 8;
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < kMaxBlocks ? blocks : kMaxBlocks));
}

}  // namespace cuda
}  // namespace moe_comm

// for (int64_t i = this thread's first item; i < n; i += all threads of the grid)
#define MOE_GRID_STRIDE(i, n)                                                        \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); \
       i += int64_t(gridDim.x) * blockDim.x)
