// Dispatch's header exchange: counts, plus a status that makes every rank raise when any rank
// rejected its input or the ranks disagree on the call. One header per stage, int64
// [stage size, width]; row d is what this rank tells destination d. Headers are built where
// the counts live (on the device on CUDA) by the single-source row bodies below, a thread per
// row on the GPU and a loop on the CPU, and read on the host once, after every stage's
// exchange: the dispatch's one host wait.
//
// Flat: row d = [fixed fields | rows for d | (token, expert) pairs per expert of d].
// Hierarchical: the rail header row n also carries, per local index l, the rows node n's
// forwarder passes on to rank (n, l); the forwarder turns what its rail peers told it into its
// node header (relay_header_row). Statuses travel the same way (own, then relayed, then a
// disagreement with a rail peer), so after both stages every rank knows of every problem and no
// token row moves once one is known.
#pragma once

#include <cstdint>
#include <vector>

#include "../core/hd.h"

namespace moe_comm {
namespace engine {

// kReads: this rank reads its headers on the host (always but in the static mode's repeated
// calls). kStaticRows: the static mode's rows per peer of each row exchange (0: not static).
// A rank that reads a problem joins the row exchanges of its peers that do not read
// (engine/static_dispatch.cpp), so that nobody waits for rows that never come.
enum Field : int64_t {
  kStatus = 0, kBadRank, kSeenBy, kReads, kHidden, kDtype, kTopk, kNumExperts, kBlockRows, kStaticRows, kNumFields
};
constexpr int64_t kFirstAgreed = kHidden;  // hidden ... static rows must agree
constexpr int64_t kDisagreement = 4;       // status code beside the argument codes (1 x, 2 topk_idx, 3 weights)
constexpr int64_t kRoutingCode = 2;        // topk_idx: a value out of range or repeated in a row
// A deferred combine status reported by the next dispatch: kEarlierCombine + the argument code
// the combine rejected (1 expert_y, 2 topk_weights).
constexpr int64_t kEarlierCombine = 32;  // past the dispatch argument codes
// Beside those: what arrived at a rank's expand disagreed with its headers (a corrupted
// exchange), reported by the next dispatch's header as kEarlierCombine + kArrivalMismatch.
constexpr int64_t kArrivalMismatch = 0x10;

// The call as this rank sees it (zeros but num_experts when its input was rejected).
struct CallFacts {
  int64_t hidden = 0, dtype = 0, topk = 0, num_experts = 0;
  int64_t block_rows = 0;   // pad_to_capacity's C + 1 (0: no blocks)
  int64_t static_rows = 0;  // the static mode's rows per peer (0: not static)
  MOE_HD int64_t get(int64_t field) const {
    return field == kHidden ? hidden : field == kDtype ? dtype : field == kTopk ? topk
           : field == kNumExperts ? num_experts : field == kBlockRows ? block_rows
           : field == kStaticRows ? static_rows : 0;
  }
};

struct HeaderLayout {
  int64_t blocks = 1;   // rows per block of the sender's input
  int64_t forward = 0;  // rows to forward per local index (hierarchical rail stage only)
  int64_t experts = 0;  // pairs per expert of the row's destination

  MOE_HD int64_t width() const { return kNumFields + blocks + forward + experts; }
  MOE_HD int64_t rows_col() const { return kNumFields; }
  MOE_HD int64_t forward_col() const { return kNumFields + blocks; }
  MOE_HD int64_t experts_col() const { return kNumFields + blocks + forward; }
};

// A problem every rank agrees on (or this rank found), for the Python layer to raise.
struct Problem {
  int64_t code = 0;     // 0: none; 1-3 the argument a rank rejected; kDisagreement
  int64_t rank = -1;    // the rank (Buffer group) whose call was bad
  int64_t seen_by = -1;
  // A disagreement seen directly: which fact, this rank's value and the other rank's.
  int64_t field = -1, mine = 0, theirs = 0;
  MOE_HD bool any() const { return code != 0; }
};

// What every row of a header starts with: the call and a status (this rank as reporter when
// there is none). `local` is a problem known on the host; `status` (may be null) this rank's
// routing status, a word where the counts live.
struct HeaderFixed {
  CallFacts call;
  int64_t rank = 0;
  Problem local;
  const int64_t* status = nullptr;
  // Deferred combine statuses ((world - bad rank) << 8 | argument code, 0 ok) that landed since
  // the last header, where the wire put them; and the MAX of any read back early.
  int64_t world = 0;
  const int64_t* pending = nullptr;
  int64_t pending_count = 0;
  int64_t pending_folded = 0;
  // The static mode's sticky problem (bodies/plan.h ExpandPlanArgs), where it lives, reported
  // by a header that is read (null: none); and whether this rank reads its headers.
  const int64_t* sticky = nullptr;
  bool reads = true;
};

// The first stage's header: counts from the send plan (null when `local` is set).
struct HeaderFill {
  int64_t* header = nullptr;
  int64_t size = 0;
  HeaderLayout layout;
  HeaderFixed fixed;
  const int64_t* rows_per_dest = nullptr;  // [size]
  const int64_t* forward = nullptr;        // [size * layout.forward]
  const int64_t* pairs = nullptr;          // [size * layout.experts]
};

// A forwarder's node header from the rail header it received (row b from rail peer
// sender_base + b * sender_step): rows from each source node for local index l, pairs of l's
// experts summed over the sources, and the first status: own, relayed, or a disagreement with
// a rail peer.
struct HeaderRelay {
  const int64_t* received = nullptr;  // [senders, received_layout.width()]
  HeaderLayout received_layout;
  int64_t senders = 0, sender_base = 0, sender_step = 1;
  int64_t* header = nullptr;
  int64_t size = 0;
  HeaderLayout layout;
  HeaderFixed fixed;
};

MOE_HD void fill_fixed_row(int64_t* row, const HeaderLayout& layout, const HeaderFixed& f) {
  for (int64_t c = 0; c < layout.width(); ++c) row[c] = 0;
  for (int64_t field = kFirstAgreed; field < kNumFields; ++field) row[field] = f.call.get(field);
  const int64_t own = f.local.any() ? f.local.code : (f.status ? *f.status : 0);
  row[kStatus] = own;
  row[kBadRank] = f.local.any() ? f.local.rank : f.rank;
  row[kSeenBy] = f.local.any() ? f.local.seen_by : f.rank;
  row[kReads] = f.reads ? 1 : 0;
  if (!f.local.any() && f.sticky && *f.sticky != 0) {  // an earlier static call's problem first
    row[kStatus] = *f.sticky & 0xFF;
    row[kBadRank] = f.world - (*f.sticky >> 8);
    return;
  }
  if (own != 0) return;
  int64_t combine = f.pending_folded;
  for (int64_t i = 0; i < f.pending_count; ++i) combine = f.pending[i] > combine ? f.pending[i] : combine;
  if (combine != 0) {
    row[kStatus] = kEarlierCombine + (combine & 0xFF);
    row[kBadRank] = f.world - (combine >> 8);
  }
}

MOE_HD void fill_header_row(const HeaderFill& h, int64_t d) {
  int64_t* row = h.header + d * h.layout.width();
  fill_fixed_row(row, h.layout, h.fixed);
  if (h.fixed.local.any()) return;
  row[h.layout.rows_col()] = h.rows_per_dest[d];
  for (int64_t l = 0; l < h.layout.forward; ++l) row[h.layout.forward_col() + l] = h.forward[d * h.layout.forward + l];
  for (int64_t e = 0; e < h.layout.experts; ++e) row[h.layout.experts_col() + e] = h.pairs[d * h.layout.experts + e];
}

MOE_HD void relay_header_row(const HeaderRelay& h, int64_t l) {
  int64_t* row = h.header + l * h.layout.width();
  fill_fixed_row(row, h.layout, h.fixed);
  if (h.fixed.local.any() || row[kStatus] != 0) return;  // own problem first
  const int64_t in_width = h.received_layout.width();
  for (int64_t b = 0; b < h.senders; ++b) {
    row[h.layout.rows_col() + b] = h.received[b * in_width + h.received_layout.forward_col() + l];
  }
  for (int64_t e = 0; e < h.layout.experts; ++e) {
    int64_t pairs = 0;
    for (int64_t b = 0; b < h.senders; ++b) {
      pairs += h.received[b * in_width + h.received_layout.experts_col() + l * h.layout.experts + e];
    }
    row[h.layout.experts_col() + e] = pairs;
  }
  for (int64_t b = 0; b < h.senders; ++b) {  // the first rail peer with a status
    const int64_t* in = h.received + b * in_width;
    if (in[kStatus] != 0) {
      row[kStatus] = in[kStatus];
      row[kBadRank] = in[kBadRank];
      row[kSeenBy] = in[kSeenBy];
      return;
    }
  }
  for (int64_t b = 0; b < h.senders; ++b) {  // else the first rail peer that disagrees
    const int64_t* in = h.received + b * in_width;
    for (int64_t field = kFirstAgreed; field < kNumFields; ++field) {
      if (in[field] != h.fixed.call.get(field)) {
        row[kStatus] = kDisagreement;
        row[kBadRank] = h.sender_base + b * h.sender_step;
        row[kSeenBy] = h.fixed.rank;
        return;
      }
    }
  }
}

// A problem a static call found, reported later: kStaticFlag | the header status code.
constexpr int64_t kStaticFlag = 0x80;

// The static mode's check of the headers a flat stage received, where they landed (no host
// read): the first sender with a status, else the first whose call differs from this rank's,
// as a sticky word ((world - bad rank) << 8 | kStaticFlag | status code; 0: none). Sender s is
// rank s.
MOE_HD int64_t received_status(const int64_t* received, int64_t senders, const HeaderLayout& layout,
                               const CallFacts& call, int64_t world) {
  const int64_t width = layout.width();
  for (int64_t s = 0; s < senders; ++s) {
    const int64_t* row = received + s * width;
    if (row[kStatus] != 0) return (world - row[kBadRank]) << 8 | kStaticFlag | (row[kStatus] & 0x7F);
  }
  for (int64_t s = 0; s < senders; ++s) {
    for (int64_t field = kFirstAgreed; field < kNumFields; ++field) {
      if (received[s * width + field] != call.get(field)) return (world - s) << 8 | kStaticFlag | kDisagreement;
    }
  }
  return 0;
}

// The static mode's expand (bodies/plan.h), which reads no header on the host: source s's rows
// are arrival rows [s * source_stride, (s + 1) * source_stride) (unused ones name no expert),
// expert e's segment starts at e * segment_rows, and the received headers are checked where
// they landed (received_status): a problem places nothing, zeroes the outputs and is kept in
// *sticky (the first one, for Buffer.check()).
struct StaticExpand {
  int64_t source_stride = 0;  // 0: not static
  int64_t segment_rows = 0;
  const int64_t* headers = nullptr;  // [senders, header_layout.width()]
  HeaderLayout header_layout;
  CallFacts call;
  int64_t world = 0;
  int64_t* sticky = nullptr;
  MOE_HD bool on() const { return source_stride > 0; }
};

// The first problem a received header (on the host) reveals: a sender's status, or a sender
// that disagrees with this rank on the call (senders[s] is the Buffer rank of row s).
Problem find_problem(const int64_t* received, int64_t size, const HeaderLayout& layout, const CallFacts& call,
                     const std::vector<int64_t>& senders, int64_t rank);

}  // namespace engine
}  // namespace moe_comm
