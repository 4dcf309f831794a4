#include "header.h"

namespace moe_comm {
namespace engine {

Problem find_problem(const int64_t* received, int64_t size, const HeaderLayout& layout, const CallFacts& call,
                     const std::vector<int64_t>& senders, int64_t rank) {
  const int64_t width = layout.width();
  for (int64_t s = 0; s < size; ++s) {
    const int64_t* row = received + s * width;
    if (row[kStatus] != 0) return Problem{row[kStatus], row[kBadRank], row[kSeenBy]};
  }
  // In field order, so that the message names the first fact that differs.
  for (int64_t f = kFirstAgreed; f < kNumFields; ++f) {
    for (int64_t s = 0; s < size; ++s) {
      const int64_t theirs = received[s * width + f];
      if (theirs != call.get(f)) return Problem{kDisagreement, senders[s], rank, f, call.get(f), theirs};
    }
  }
  return Problem{};
}

}  // namespace engine
}  // namespace moe_comm
