// What the linked NCCL library is. The EP communicator itself (an ncclUniqueId shared over
// the torch.distributed group, grouped send/recv) belongs to the CUDA path and lives here too.
#pragma once

#include <string>

namespace moe_comm {
namespace comm {

// "major.minor.patch" of the NCCL library loaded at run time.
std::string nccl_version_string();

}  // namespace comm
}  // namespace moe_comm
