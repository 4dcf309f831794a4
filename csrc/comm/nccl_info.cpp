#include "nccl_info.h"

#include "../core/error.h"

namespace moe_comm {
namespace comm {

std::string nccl_version_string() {
  int code = 0;
  MOE_NCCL_CHECK(ncclGetVersion(&code));
  // Since NCCL 2.9 the code is major*10000 + minor*100 + patch.
  const int major = code / 10000, minor = (code % 10000) / 100, patch = code % 100;
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

}  // namespace comm
}  // namespace moe_comm
