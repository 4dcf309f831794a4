// Device token kernels: one block per row, its threads as the lanes of the single-source bodies
// (bodies/token_rows.h) that the CPU backend runs too. Only the launch geometry and row_dots'
// warp shuffle are written here.
#include "bodies/token_rows.h"
#include "launchers.h"

namespace moe_comm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxBlocks = 65535LL * 64;  // grid-stride loops past this

// Calls fn(Elem<T>{}) with the element type of a DType (the bodies' storage types).
template <typename Fn>
cudaError_t with_type(DType t, Fn&& fn) {
  return bodies::with_elem(t, fn) ? cudaSuccess : cudaErrorInvalidValue;
}

int64_t grid_for(int64_t rows) { return rows < kMaxBlocks ? (rows > 0 ? rows : 1) : kMaxBlocks; }

__device__ __forceinline__ bodies::Lanes block_lanes() { return {int64_t(threadIdx.x), int64_t(blockDim.x)}; }

__global__ void pack_rows_kernel(PackParams p) {
  for (int64_t j = blockIdx.x; j < p.num_rows; j += gridDim.x) {
    bodies::pack_row(p, j, bodies::rank_of_slot(p.send_offsets, p.num_ranks, j), block_lanes());
  }
}

// A quantizing pack: the block's threads write what pack_row writes; its warps quantize the
// 128-element blocks of the row, a warp per block, the amax shared by a butterfly of shuffles.
template <typename E>
__global__ void pack_fp8_rows_kernel(PackParams p) {
  const int64_t warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t blocks = fp8_scale_count(p.fmt.payload_bytes);
  for (int64_t j = blockIdx.x; j < p.num_rows; j += gridDim.x) {
    bodies::pack_row(p, j, bodies::rank_of_slot(p.send_offsets, p.num_ranks, j), block_lanes());
    for (int64_t b = warp; b < blocks; b += warps) {
      float amax = bodies::fp8_amax_part<E>(p, j, b, lane, kWarp);
      for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
      }
      bodies::fp8_store_part<E>(p, j, b, lane, kWarp, amax);
    }
  }
}

template <typename E>
__global__ void scatter_rows_kernel(ScatterParams p) {
  for (int64_t i = blockIdx.x; i < p.num_src; i += gridDim.x) bodies::scatter_row<E>(p, i, block_lanes());
}

template <typename S, typename D>
__global__ void reduce_rows_kernel(ReduceParams p, bool vectorized) {
  for (int64_t i = blockIdx.x; i < p.num_out; i += gridDim.x) {
    bodies::reduce_row<S, D>(p, i, vectorized, block_lanes());
  }
}

// One warp per (row, slot): the lanes' parts of the dot, then the shuffle tree that the CPU
// backend emulates with bodies::sum_lane_parts.
template <typename A, typename B>
__global__ void row_dots_kernel(DotParams p) {
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t pairs = p.num_rows * p.topk;
  for (int64_t pair = blockIdx.x * warps_per_block + threadIdx.x / kWarp; pair < pairs;
       pair += int64_t(gridDim.x) * warps_per_block) {
    float dot = bodies::dot_part<A, B>(p, pair, bodies::Lanes{lane, kWarp});
    for (int offset = kWarp / 2; offset > 0; offset /= 2) dot += __shfl_down_sync(0xffffffffu, dot, offset);
    if (lane == 0) p.out[pair] = dot;
  }
}

}  // namespace

cudaError_t launch_pack_rows(const PackParams& p, cudaStream_t stream) {
  static_assert(bodies::kFp8WarpLanes == kWarp, "a warp quantizes one FP8 block");
  if (p.num_rows == 0) return cudaSuccess;
  if (!p.quantize) {
    pack_rows_kernel<<<grid_for(p.num_rows), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  if (!p.fmt.fp8()) return cudaErrorInvalidValue;
  const cudaError_t err = with_type(p.quantize_from, [&](auto elem) {
    pack_fp8_rows_kernel<decltype(elem)><<<grid_for(p.num_rows), kThreads, 0, stream>>>(p);
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

cudaError_t launch_scatter_rows(const ScatterParams& p, cudaStream_t stream) {
  if (p.num_src == 0 || p.topk == 0) return cudaSuccess;
  cudaError_t err = with_type(p.dtype, [&](auto elem) {
    scatter_rows_kernel<decltype(elem)><<<grid_for(p.num_src), kThreads, 0, stream>>>(p);
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

cudaError_t launch_reduce_rows(const ReduceParams& p, cudaStream_t stream) {
  if (p.num_out == 0) return cudaSuccess;
  cudaError_t inner = cudaSuccess;
  const cudaError_t outer = with_type(p.src_dtype, [&](auto src) {
    inner = with_type(p.dst_dtype, [&](auto dst) {
      using S = decltype(src);
      using D = decltype(dst);
      const bool vectorized = bodies::reduce_vectorizable<S, D>(p);
      reduce_rows_kernel<S, D><<<grid_for(p.num_out), kThreads, 0, stream>>>(p, vectorized);
    });
  });
  if (outer != cudaSuccess) return outer;
  return inner != cudaSuccess ? inner : cudaGetLastError();
}

cudaError_t launch_row_dots(const DotParams& p, cudaStream_t stream) {
  const int64_t pairs = p.num_rows * p.topk;
  if (pairs == 0) return cudaSuccess;
  const int64_t warps_per_block = kThreads / kWarp;
  cudaError_t inner = cudaSuccess;
  const cudaError_t outer = with_type(p.a_dtype, [&](auto a) {
    inner = with_type(p.b_dtype, [&](auto b) {
      row_dots_kernel<decltype(a), decltype(b)>
          <<<grid_for((pairs + warps_per_block - 1) / warps_per_block), kThreads, 0, stream>>>(p);
    });
  });
  if (outer != cudaSuccess) return outer;
  return inner != cudaSuccess ? inner : cudaGetLastError();
}

// Loads every instantiation now (lazy module loading would load each at its first launch,
// under the context lock, waiting for the device: CUDA review R1).
cudaError_t preload_token_kernels() {
  cudaFuncAttributes attributes;
  cudaError_t first = cudaFuncGetAttributes(&attributes, pack_rows_kernel);
  auto keep = [&](cudaError_t err) {
    if (first == cudaSuccess) first = err;
  };
  const DType types[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  for (DType a : types) {
    with_type(a, [&](auto ea) {
      using A = decltype(ea);
      keep(cudaFuncGetAttributes(&attributes, scatter_rows_kernel<A>));
      keep(cudaFuncGetAttributes(&attributes, pack_fp8_rows_kernel<A>));
      for (DType b : types) {
        with_type(b, [&](auto eb) {
          using B = decltype(eb);
          keep(cudaFuncGetAttributes(&attributes, reduce_rows_kernel<A, B>));
          keep(cudaFuncGetAttributes(&attributes, row_dots_kernel<A, B>));
        });
      }
    });
  }
  return first;
}

}  // namespace cuda
}  // namespace moe_comm
