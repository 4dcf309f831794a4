// Dispatch's header exchange: counts, plus a status that makes every rank raise when any rank
// rejected its input or the ranks disagree on the call. One header per stage, int64
// [stage size, width]; row d is what this rank tells destination d.
//
// Flat: row d = [fixed fields | rows for d | (token, expert) pairs per expert of d].
// Hierarchical: the rail header row n also carries, per local index l, the rows node n's
// forwarder passes on to rank (n, l); the forwarder turns what its rail peers told it into its
// node header (relay_header). Statuses travel the same way (own, then relayed, then a
// disagreement with a rail peer), so after both stages every rank knows of every problem and no
// token row moves once one is known.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moe_comm {
namespace engine {

enum Field : int64_t { kStatus = 0, kBadRank, kSeenBy, kHidden, kDtype, kTopk, kNumExperts, kNumFields };
constexpr int64_t kFirstAgreed = kHidden;  // hidden, dtype, topk, num_experts must agree
constexpr int64_t kDisagreement = 4;       // status code beside the argument codes (1 x, 2 topk_idx, 3 weights)

// The call as this rank sees it (zeros but num_experts when its input was rejected).
struct CallFacts {
  int64_t hidden = 0, dtype = 0, topk = 0, num_experts = 0;
  int64_t get(int64_t field) const;
};

struct HeaderLayout {
  int64_t blocks = 1;   // rows per block of the sender's input
  int64_t forward = 0;  // rows to forward per local index (hierarchical rail stage only)
  int64_t experts = 0;  // pairs per expert of the row's destination

  int64_t width() const { return kNumFields + blocks + forward + experts; }
  int64_t rows_col() const { return kNumFields; }
  int64_t forward_col() const { return kNumFields + blocks; }
  int64_t experts_col() const { return kNumFields + blocks + forward; }
};

// A problem every rank agrees on (or this rank found), for the Python layer to raise.
struct Problem {
  int64_t code = 0;     // 0: none; 1-3 the argument a rank rejected; kDisagreement
  int64_t rank = -1;    // the rank (Buffer group) whose call was bad
  int64_t seen_by = -1;
  // A disagreement seen directly: which fact, this rank's value and the other rank's.
  int64_t field = -1, mine = 0, theirs = 0;
  bool any() const { return code != 0; }
};

// The fixed fields of every row: the call, and a status (problem) or this rank as reporter.
void fill_fixed(int64_t* header, int64_t size, const HeaderLayout& layout, const CallFacts& call, int64_t rank,
                const Problem& problem);

// A forwarder's node header from the rail header it received ([senders, .], row b from rail
// peer senders[b]): rows from each source node for local index l, pairs of l's experts summed
// over the sources, and the first status: own, relayed, or a disagreement with a rail peer.
void relay_header(const int64_t* received, const HeaderLayout& received_layout, const std::vector<int64_t>& senders,
                  int64_t* header, int64_t size, const HeaderLayout& layout, const CallFacts& call, int64_t rank,
                  const Problem& own);

// The first problem a received header reveals: a sender's status, or a sender that disagrees
// with this rank on the call (senders[s] is the Buffer rank of row s).
Problem find_problem(const int64_t* received, int64_t size, const HeaderLayout& layout, const CallFacts& call,
                     const std::vector<int64_t>& senders, int64_t rank);

}  // namespace engine
}  // namespace moe_comm
