// Device token kernels: one block per row, threads across the row. Same parameters and
// contracts as the CPU kernels (core/token_params.h; tests/gpu compares them).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"

namespace moe_comm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxBlocks = 65535LL * 64;  // grid-stride loops past this
constexpr int64_t kMaxStagedBytes = 32 * 1024;  // a row's map + weights in shared memory

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Calls fn(T{}) with the device storage type of a DType.
template <typename Fn>
cudaError_t with_type(DType t, Fn&& fn) {
  switch (t) {
    case DType::kFloat32: fn(float{}); return cudaSuccess;
    case DType::kBFloat16: fn(__nv_bfloat16{}); return cudaSuccess;
    case DType::kFloat16: fn(__half{}); return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

int64_t grid_for(int64_t rows) { return rows < kMaxBlocks ? (rows > 0 ? rows : 1) : kMaxBlocks; }

// Copies `bytes` from src to dst; 16-byte vectors when both are 16-byte aligned.
__device__ __forceinline__ void copy_row(uint8_t* dst, const uint8_t* src, int64_t bytes) {
  const bool aligned = ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0;
  int64_t done = 0;
  if (aligned) {
    const int64_t vectors = bytes / 16;
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) d[v] = s[v];
    done = vectors * 16;
  }
  for (int64_t b = done + threadIdx.x; b < bytes; b += blockDim.x) dst[b] = src[b];
}

__global__ void pack_rows_kernel(PackParams p) {
  const RowFormat& f = p.fmt;
  for (int64_t j = blockIdx.x; j < p.num_rows; j += gridDim.x) {
    const int64_t t = p.send_token[j];
    uint8_t* out = p.dst + j * f.row_bytes;
    copy_row(out, p.src + t * p.src_stride, f.payload_bytes);
    // Zero the padding (and the metadata block when there is no metadata).
    const int64_t meta_end = f.meta_offset + (p.topk_idx ? f.meta_bytes : 0);
    for (int64_t b = f.payload_bytes + threadIdx.x; b < f.row_bytes; b += blockDim.x) {
      if (b < f.meta_offset || b >= meta_end) out[b] = 0;
    }
    if (!p.topk_idx) continue;
    // Destination rank of slot j: the segment of send_offsets holding it (binary search).
    int64_t lo = 0, hi = p.num_ranks;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (p.send_offsets[mid] <= j) lo = mid; else hi = mid;
    }
    const int64_t first = lo * p.experts_per_rank;
    SlotMeta* meta = reinterpret_cast<SlotMeta*>(out + f.meta_offset);
    for (int64_t k = threadIdx.x; k < p.topk; k += blockDim.x) {
      const int64_t e = p.topk_idx[t * p.topk + k];
      SlotMeta m;
      m.local_expert = (e >= first && e < first + p.experts_per_rank) ? int32_t(e - first) : -1;
      m.weight = p.topk_weights ? p.topk_weights[t * p.topk + k] : 1.0f;
      meta[k] = m;
    }
  }
}

template <typename T>
__global__ void scatter_rows_kernel(ScatterParams p) {
  const int64_t bytes = p.hidden * int64_t(sizeof(T));
  for (int64_t i = blockIdx.x; i < p.num_src; i += gridDim.x) {
    const uint8_t* in = p.src + i * p.src_stride;
    for (int64_t k = 0; k < p.topk; ++k) {
      const int64_t row = p.row_map[i * p.topk + k];
      if (row < 0) continue;
      uint8_t* out = p.dst + row * p.dst_stride;
      if (!p.weights) {
        copy_row(out, in, bytes);
        continue;
      }
      const float w = p.weights[i * p.topk + k];
      const T* s = reinterpret_cast<const T*>(in);
      T* d = reinterpret_cast<T*>(out);
      int64_t done = 0;
      if (((reinterpret_cast<uintptr_t>(in) | reinterpret_cast<uintptr_t>(out)) & 15) == 0) {
        constexpr int V = 16 / sizeof(T);  // scale V elements per 16-byte load and store
        const int64_t vectors = p.hidden / V;
        for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
          uint4 raw = reinterpret_cast<const uint4*>(in)[v];
          T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
          for (int j = 0; j < V; ++j) e[j] = from_float<T>(w * to_float(e[j]));
          reinterpret_cast<uint4*>(out)[v] = raw;
        }
        done = vectors * V;
      }
      for (int64_t h = done + threadIdx.x; h < p.hidden; h += blockDim.x) d[h] = from_float<T>(w * to_float(s[h]));
    }
  }
}

template <typename S, typename D>
__global__ void reduce_rows_kernel(ReduceParams p) {
  for (int64_t i = blockIdx.x; i < p.num_out; i += gridDim.x) {
    D* out = reinterpret_cast<D*>(p.dst + i * p.dst_stride);
    for (int64_t h = threadIdx.x; h < p.hidden; h += blockDim.x) {
      float acc = 0.0f;  // k in order, as on the CPU
      for (int64_t k = 0; k < p.topk; ++k) {
        const int64_t row = p.map[i * p.topk + k];
        if (row < 0) continue;
        const float w = p.weights ? p.weights[i * p.topk + k] : 1.0f;
        acc += w * to_float(reinterpret_cast<const S*>(p.src + row * p.src_stride)[h]);
      }
      out[h] = from_float<D>(acc);
    }
  }
}

// The same sums with 16-byte loads: each thread owns V = 16 / sizeof(S) consecutive elements
// and reads them from every source row at once; a row's map and weights are staged in shared
// memory once. Needs 16-byte aligned rows (the launcher checks); the tail past the last full
// vector is summed element by element, in the same k order, so results equal the plain kernel.
template <typename S, typename D>
__global__ void reduce_rows_vec_kernel(ReduceParams p) {
  constexpr int V = 16 / sizeof(S);
  extern __shared__ unsigned char staged[];
  int64_t* rows = reinterpret_cast<int64_t*>(staged);
  float* weights = reinterpret_cast<float*>(rows + p.topk);
  const int64_t vectors = p.hidden / V;
  for (int64_t i = blockIdx.x; i < p.num_out; i += gridDim.x) {
    for (int64_t k = threadIdx.x; k < p.topk; k += blockDim.x) {
      rows[k] = p.map[i * p.topk + k];
      weights[k] = p.weights ? p.weights[i * p.topk + k] : 1.0f;
    }
    __syncthreads();
    D* out = reinterpret_cast<D*>(p.dst + i * p.dst_stride);
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      float acc[V];
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = 0.0f;
      for (int64_t k = 0; k < p.topk; ++k) {
        if (rows[k] < 0) continue;
        const uint4 raw = reinterpret_cast<const uint4*>(p.src + rows[k] * p.src_stride)[v];
        const S* e = reinterpret_cast<const S*>(&raw);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += weights[k] * to_float(e[j]);
      }
      // V elements of D are 16 * sizeof(D) / sizeof(S) bytes: whole 16-byte stores.
      constexpr int kStores = V * sizeof(D) / 16;
      uint4 packed[kStores];
      D* o = reinterpret_cast<D*>(packed);
#pragma unroll
      for (int j = 0; j < V; ++j) o[j] = from_float<D>(acc[j]);
      uint4* dst = reinterpret_cast<uint4*>(out + v * V);
#pragma unroll
      for (int j = 0; j < kStores; ++j) dst[j] = packed[j];
    }
    for (int64_t h = vectors * V + threadIdx.x; h < p.hidden; h += blockDim.x) {
      float acc = 0.0f;
      for (int64_t k = 0; k < p.topk; ++k) {
        if (rows[k] < 0) continue;
        acc += weights[k] * to_float(reinterpret_cast<const S*>(p.src + rows[k] * p.src_stride)[h]);
      }
      out[h] = from_float<D>(acc);
    }
    __syncthreads();  // before the next row overwrites the staged map
  }
}

bool aligned16(const void* ptr, int64_t stride) {
  return ((reinterpret_cast<uintptr_t>(ptr) | static_cast<uintptr_t>(stride)) & 15) == 0;
}

// One warp per (row, slot): lanes stride the hidden dimension, then a shuffle reduction.
template <typename A, typename B>
__global__ void row_dots_kernel(DotParams p) {
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t pairs = p.num_rows * p.topk;
  for (int64_t pair = blockIdx.x * warps_per_block + threadIdx.x / kWarp; pair < pairs;
       pair += int64_t(gridDim.x) * warps_per_block) {
    const int64_t i = pair / p.topk;
    const int64_t row = p.map[pair];
    float dot = 0.0f;
    if (row >= 0) {
      const A* a = reinterpret_cast<const A*>(p.a + i * p.a_stride);
      const B* b = reinterpret_cast<const B*>(p.b + row * p.b_stride);
      for (int64_t h = lane; h < p.hidden; h += kWarp) dot += to_float(a[h]) * to_float(b[h]);
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) dot += __shfl_down_sync(0xffffffffu, dot, offset);
    if (lane == 0) p.out[pair] = dot;
  }
}

}  // namespace

cudaError_t launch_pack_rows(const PackParams& p, cudaStream_t stream) {
  if (p.num_rows == 0) return cudaSuccess;
  pack_rows_kernel<<<grid_for(p.num_rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
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
      // Vector path: 16-byte aligned rows, and V elements of D fill whole 16-byte stores
      // (all pairs but float32 -> 16-bit, which takes the plain kernel).
      if constexpr ((16 / sizeof(S)) * sizeof(D) % 16 == 0) {
        const int64_t staged = p.topk * int64_t(sizeof(int64_t) + sizeof(float));
        if (aligned16(p.src, p.src_stride) && aligned16(p.dst, p.dst_stride) && staged <= kMaxStagedBytes) {
          reduce_rows_vec_kernel<S, D><<<grid_for(p.num_out), kThreads, staged, stream>>>(p);
          return;
        }
      }
      reduce_rows_kernel<S, D><<<grid_for(p.num_out), kThreads, 0, stream>>>(p);
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

}  // namespace cuda
}  // namespace moe_comm
