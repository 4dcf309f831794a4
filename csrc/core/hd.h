// MOE_HD marks code compiled twice: by nvcc into the CUDA kernels and by the host compiler into
// the CPU backend (csrc/kernels/bodies). One body, so CI runs what the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__ __forceinline__
#else
#define MOE_HD inline
#endif

// Unrolls a fixed-trip loop in device code (the host compiler unrolls on its own).
#if defined(__CUDACC__)
#define MOE_UNROLL _Pragma("unroll")
#else
#define MOE_UNROLL
#endif
