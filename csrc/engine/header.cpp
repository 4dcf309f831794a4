#include "header.h"

namespace moe_comm {
namespace engine {

int64_t CallFacts::get(int64_t field) const {
  switch (field) {
    case kHidden: return hidden;
    case kDtype: return dtype;
    case kTopk: return topk;
    case kNumExperts: return num_experts;
    default: return 0;
  }
}

void fill_fixed(int64_t* header, int64_t size, const HeaderLayout& layout, const CallFacts& call, int64_t rank,
                const Problem& problem) {
  const int64_t width = layout.width();
  for (int64_t d = 0; d < size; ++d) {
    int64_t* row = header + d * width;
    for (int64_t c = 0; c < width; ++c) row[c] = 0;
    for (int64_t f = kFirstAgreed; f < kNumFields; ++f) row[f] = call.get(f);
    row[kStatus] = problem.code;
    row[kBadRank] = problem.any() ? problem.rank : rank;
    row[kSeenBy] = problem.any() ? problem.seen_by : rank;
  }
}

namespace {
int64_t disagreeing_field(const int64_t* row, const CallFacts& call) {
  for (int64_t f = kFirstAgreed; f < kNumFields; ++f) {
    if (row[f] != call.get(f)) return f;
  }
  return -1;
}
}  // namespace

void relay_header(const int64_t* received, const HeaderLayout& received_layout, const std::vector<int64_t>& senders,
                  int64_t* header, int64_t size, const HeaderLayout& layout, const CallFacts& call, int64_t rank,
                  const Problem& own) {
  fill_fixed(header, size, layout, call, rank, own);
  if (own.any()) return;
  const int64_t width = layout.width(), in_width = received_layout.width();
  const int64_t senders_n = static_cast<int64_t>(senders.size());
  for (int64_t l = 0; l < size; ++l) {
    int64_t* row = header + l * width;
    for (int64_t b = 0; b < senders_n; ++b) {
      row[layout.rows_col() + b] = received[b * in_width + received_layout.forward_col() + l];
    }
    for (int64_t e = 0; e < layout.experts; ++e) {
      int64_t pairs = 0;
      for (int64_t b = 0; b < senders_n; ++b) {
        pairs += received[b * in_width + received_layout.experts_col() + l * layout.experts + e];
      }
      row[layout.experts_col() + e] = pairs;
    }
  }
  Problem relayed;
  for (int64_t b = 0; b < senders_n && !relayed.any(); ++b) {
    const int64_t* in = received + b * in_width;
    if (in[kStatus] != 0) relayed = Problem{in[kStatus], in[kBadRank], in[kSeenBy]};
  }
  for (int64_t b = 0; b < senders_n && !relayed.any(); ++b) {
    if (disagreeing_field(received + b * in_width, call) >= 0) relayed = Problem{kDisagreement, senders[b], rank};
  }
  if (!relayed.any()) return;
  for (int64_t l = 0; l < size; ++l) {
    header[l * width + kStatus] = relayed.code;
    header[l * width + kBadRank] = relayed.rank;
    header[l * width + kSeenBy] = relayed.seen_by;
  }
}

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
