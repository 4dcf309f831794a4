// The project's one error header: every failure becomes a moe_comm::Error carrying file, line
// and a message; bindings turn it into a Python RuntimeError. Never exit() or abort().
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace moe_comm {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void throw_error(const char* file, int line, const std::string& what) {
  std::ostringstream out;
  out << "moe_comm: " << what << " (" << file << ":" << line << ")";
  throw Error(out.str());
}

}  // namespace moe_comm

// MOE_HOST_ASSERT(cond, stream-expression): a broken internal invariant or bad argument.
#define MOE_HOST_ASSERT(cond, msg)                                                  \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::ostringstream moe_msg_;                                                  \
      moe_msg_ << "check failed: " #cond ": " << msg;                               \
      ::moe_comm::throw_error(__FILE__, __LINE__, moe_msg_.str());                  \
    }                                                                               \
  } while (0)

#if defined(MOE_COMM_WITH_CUDA)
#include <cuda_runtime_api.h>
#define MOE_CUDA_CHECK(expr)                                                        \
  do {                                                                              \
    cudaError_t moe_err_ = (expr);                                                  \
    if (moe_err_ != cudaSuccess) {                                                  \
      ::moe_comm::throw_error(__FILE__, __LINE__,                                   \
                              std::string(#expr " failed: ") +                      \
                                  cudaGetErrorName(moe_err_) + ": " +               \
                                  cudaGetErrorString(moe_err_));                    \
    }                                                                               \
  } while (0)
#endif

#if defined(MOE_COMM_WITH_NCCL)
#include <nccl.h>
#define MOE_NCCL_CHECK(expr)                                                        \
  do {                                                                              \
    ncclResult_t moe_res_ = (expr);                                                 \
    if (moe_res_ != ncclSuccess) {                                                  \
      ::moe_comm::throw_error(__FILE__, __LINE__,                                   \
                              std::string(#expr " failed: ") +                      \
                                  ncclGetErrorString(moe_res_) + ": " +             \
                                  ncclGetLastError(nullptr));                       \
    }                                                                               \
  } while (0)
#endif
