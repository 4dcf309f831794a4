// The two plans of a dispatch, written once for both backends: where each token goes on the
// sender (send plan) and where each arrived row lands on the receiver (expand plan).
//
// Both hand out positions by counting, in passes separated by a barrier (a grid-wide sync in
// one cooperative CUDA launch, kernels/plan.cu; plain sequence on the CPU, cpu/cpu_device.cpp):
//   1. count:   the items are split into `workers` contiguous chunks; each worker counts its
//               chunk's items per bucket into its row of a [workers, buckets] table;
//   2. columns: a scan down each bucket's column turns the counts into each worker's first
//               index inside the bucket, and gives the bucket's total;
//   3. starts:  one worker turns the totals into each bucket's start (an exclusive scan);
//   4. fill:    each worker walks its chunk again, handing out positions in item order.
// The result is the same for any number of workers (the CPU tests vary it, the GPU picks it for
// occupancy), so the GPU's positions are the ones the CPU suite checks.
#pragma once

#include <cmath>
#include <cstdint>

#include "../../core/hd.h"
#include "../../core/row_format.h"
#include "../../engine/header.h"
#include "layout.h"
#include "token_rows.h"

namespace moe_comm {
namespace bodies {

// `items` split into `workers` contiguous chunks (the last ones may be empty).
struct WorkSplit {
  int64_t items = 0;
  int64_t workers = 1;

  MOE_HD int64_t chunk() const { return (items + workers - 1) / workers; }
  MOE_HD int64_t begin(int64_t w) const { return w * chunk() < items ? w * chunk() : items; }
  MOE_HD int64_t end(int64_t w) const { return (w + 1) * chunk() < items ? (w + 1) * chunk() : items; }
};

// Counters the GPU's workers share (a total over tokens): atomic there, plain on the CPU, where
// one thread runs every worker.
MOE_HD void add_count(int64_t* counter, int64_t value) {
#if defined(__CUDA_ARCH__)
  atomicAdd(reinterpret_cast<unsigned long long*>(counter), static_cast<unsigned long long>(value));
#else
  *counter += value;
#endif
}

// Column c of a [workers, columns] table of counts becomes the exclusive prefix down the
// column (each worker's first index in bucket c). Returns the column's total.
MOE_HD int64_t scan_column(int64_t* table, int64_t workers, int64_t columns, int64_t c) {
  int64_t running = 0;
  for (int64_t w = 0; w < workers; ++w) {
    const int64_t count = table[w * columns + c];
    table[w * columns + c] = running;
    running += count;
  }
  return running;
}

// starts[b] = totals[0] + ... + totals[b - 1] for b in [0, n]; starts may be totals.
MOE_HD void scan_starts(const int64_t* totals, int64_t n, int64_t* starts) {
  int64_t running = 0;
  for (int64_t b = 0; b < n; ++b) {
    const int64_t total = totals[b];
    starts[b] = running;
    running += total;
  }
  starts[n] = running;
}

// ---- capacity: each expert keeps at most `capacity` of this rank's (token, expert) pairs -------
// The pairs are grouped by expert (the counted passes above, over pairs in token order). By
// token ("position"), a pair's rank is its place in its expert's group. By weight ("probs":
// larger first, ties to the lower token), a worker per expert selects the pair ranked last
// inside the capacity (quickselect, linear on average) and every pair compares itself with it.
// Pairs past the capacity become -1 in kept_idx, which the send plan then plans as masked: a
// dropped pair is never sent.

struct CapacityArgs {
  const int64_t* topk_idx = nullptr;  // [num_tokens, topk]
  const float* weights = nullptr;     // [num_tokens, topk]; read when by_weight
  int64_t num_tokens = 0, topk = 0, num_experts = 0;
  int64_t capacity = 0;
  bool by_weight = false;
  WorkSplit split;                    // over pairs, t * topk + k
  int64_t* table = nullptr;           // [workers, num_experts] scratch
  int64_t* starts = nullptr;          // [num_experts + 1] scratch
  int64_t* grouped = nullptr;         // [num_tokens * topk] scratch: valid pairs by expert
  int64_t* last_kept = nullptr;       // [num_experts] scratch: by weight, the last pair kept
                                      // (-1 every pair is kept, -2 none is)
  int64_t* kept_idx = nullptr;        // [num_tokens, topk] out
  int64_t* dropped = nullptr;         // [1] out: pairs dropped (zeroed by capacity_starts)
};

MOE_HD void capacity_count(const CapacityArgs& a, int64_t w) {
  int64_t* mine = a.table + w * a.num_experts;
  for (int64_t e = 0; e < a.num_experts; ++e) mine[e] = 0;
  for (int64_t p = a.split.begin(w); p < a.split.end(w); ++p) {
    if (valid_expert(a.topk_idx[p], a.num_experts)) ++mine[a.topk_idx[p]];
  }
}

// One column per call, for e in [0, num_experts).
MOE_HD void capacity_column(const CapacityArgs& a, int64_t e) {
  a.starts[e] = scan_column(a.table, a.split.workers, a.num_experts, e);
}

MOE_HD void capacity_starts(const CapacityArgs& a) {
  scan_starts(a.starts, a.num_experts, a.starts);
  *a.dropped = 0;
}

MOE_HD void capacity_group(const CapacityArgs& a, int64_t w) {
  int64_t* cursor = a.table + w * a.num_experts;
  for (int64_t e = 0; e < a.num_experts; ++e) cursor[e] += a.starts[e];
  for (int64_t p = a.split.begin(w); p < a.split.end(w); ++p) {
    if (valid_expert(a.topk_idx[p], a.num_experts)) a.grouped[cursor[a.topk_idx[p]]++] = p;
  }
}

// Pair q of the same expert ranks ahead of pair p.
MOE_HD bool ranks_ahead(const CapacityArgs& a, int64_t q, int64_t p) {
  if (!a.by_weight) return q < p;
  // A NaN weight ranks below every number (a total order, so the selection is well defined).
  const float wq = a.weights[q] == a.weights[q] ? a.weights[q] : -INFINITY;
  const float wp = a.weights[p] == a.weights[p] ? a.weights[p] : -INFINITY;
  return wq > wp || (wq == wp && q < p);  // pairs of one expert have distinct tokens
}

MOE_HD void swap_pairs(int64_t* g, int64_t i, int64_t j) {
  const int64_t t = g[i];
  g[i] = g[j];
  g[j] = t;
}

// Reorders grouped[lo, hi) so that the pair of rank k (0-based) sits at lo + k.
MOE_HD void select_rank(const CapacityArgs& a, int64_t lo, int64_t hi, int64_t k) {
  int64_t* g = a.grouped;
  const int64_t target = lo + k;
  while (hi - lo > 1) {
    swap_pairs(g, lo + (hi - lo) / 2, hi - 1);  // the middle as pivot: no quadratic sorted input
    const int64_t pivot = g[hi - 1];
    int64_t store = lo;
    for (int64_t i = lo; i < hi - 1; ++i) {
      if (ranks_ahead(a, g[i], pivot)) swap_pairs(g, i, store++);
    }
    swap_pairs(g, store, hi - 1);
    if (store == target) return;
    if (target < store) {
      hi = store;
    } else {
      lo = store + 1;
    }
  }
}

// One expert per call, for e in [0, num_experts): by weight, the last pair it keeps.
MOE_HD void capacity_select(const CapacityArgs& a, int64_t e) {
  const int64_t lo = a.starts[e], hi = a.starts[e + 1];
  if (!a.by_weight || hi - lo <= a.capacity) {
    a.last_kept[e] = -1;
  } else if (a.capacity == 0) {
    a.last_kept[e] = -2;
  } else {
    select_rank(a, lo, hi, a.capacity - 1);
    a.last_kept[e] = a.grouped[lo + a.capacity - 1];
  }
}

MOE_HD void capacity_keep(const CapacityArgs& a, int64_t w) {
  for (int64_t p = a.split.begin(w); p < a.split.end(w); ++p) {
    const int64_t e = a.topk_idx[p];
    a.kept_idx[p] = e;  // masked and out-of-range slots stay as they are (the rules see them)
    if (!valid_expert(e, a.num_experts)) continue;
    bool kept;
    if (a.by_weight) {
      const int64_t last = a.last_kept[e];
      kept = last == -1 || (last >= 0 && (p == last || ranks_ahead(a, p, last)));
    } else {  // the group is in pair order: p's place in it, by bisection
      int64_t lo = a.starts[e], hi = a.starts[e + 1];
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (a.grouped[mid] < p) lo = mid + 1; else hi = mid;
      }
      kept = lo - a.starts[e] < a.capacity;
    }
    if (!kept) {
      a.kept_idx[p] = -1;
      add_count(a.dropped, 1);
    }
  }
}

// ---- send plan: tokens -> rank-major send slots, ascending token inside a destination ------

struct SendPlanArgs {
  const int64_t* topk_idx = nullptr;  // [num_tokens, topk]; outside [0, E) counts as masked
  const int64_t* rule_idx = nullptr;  // the rows checked against the routing rules (the caller's
                                      // topk_idx when capacity dropped pairs); null: topk_idx
  int64_t num_tokens = 0, topk = 0, num_experts = 0, num_dests = 0;
  WorkSplit split;                    // over tokens
  int64_t* table = nullptr;           // [workers, num_dests + 1] scratch; last column: bad rows
  int64_t bad_code = 0;               // *status when some row breaks a routing rule
  int64_t* status = nullptr;          // [1]
  int64_t* rows_per_dest = nullptr;   // [num_dests]: distinct tokens per destination
  // Null from here on: counts only (the hierarchical forward counts).
  int64_t* send_offsets = nullptr;    // [num_dests + 1]
  int64_t* pairs_per_expert = nullptr;  // [num_experts]
  int64_t* send_token = nullptr;      // [send slots]: the token of each slot
  int64_t* pair_slot = nullptr;       // [num_tokens, topk]: slot of (t, k), -1 masked
  int64_t* first_slot = nullptr;      // the same on each destination's first slot only
  // Static mode: destination d's slots are [d * stride, (d + 1) * stride), whatever the counts
  // (capacity bounds them), and unused slots hold token -1; 0: packed by the counts.
  int64_t stride = 0;

  MOE_HD int64_t columns() const { return num_dests + 1; }
  MOE_HD int64_t experts_per_dest() const { return num_experts / num_dests; }
  MOE_HD bool counts_only() const { return send_token == nullptr; }
};

MOE_HD void send_plan_count(const SendPlanArgs& a, int64_t w) {
  int64_t* mine = a.table + w * a.columns();
  for (int64_t c = 0; c < a.columns(); ++c) mine[c] = 0;
  const int64_t per_dest = a.experts_per_dest();
  for (int64_t t = a.split.begin(w); t < a.split.end(w); ++t) {
    const int64_t* row = a.topk_idx + t * a.topk;
    const int64_t* rules = a.rule_idx ? a.rule_idx + t * a.topk : row;
    if (routing_row_bad(rules, a.topk, a.num_experts)) ++mine[a.num_dests];
    for (int64_t k = 0; k < a.topk; ++k) {
      if (valid_expert(row[k], a.num_experts) && first_to_dest(row, k, a.num_experts, per_dest)) {
        ++mine[row[k] / per_dest];
      }
    }
  }
}

// One column per call, for c in [0, max(num_dests + 1, num_experts)).
MOE_HD void send_plan_column(const SendPlanArgs& a, int64_t c) {
  if (c <= a.num_dests) {
    const int64_t total = scan_column(a.table, a.split.workers, a.columns(), c);
    if (c < a.num_dests) {
      a.rows_per_dest[c] = total;
    } else if (a.status) {
      *a.status = total ? a.bad_code : 0;
    }
  }
  if (a.pairs_per_expert && c < a.num_experts) a.pairs_per_expert[c] = 0;  // counted in fill
}

// How many send_plan_column calls a plan takes.
MOE_HD int64_t send_plan_column_count(const SendPlanArgs& a) {
  return a.num_dests + 1 > a.num_experts ? a.num_dests + 1 : a.num_experts;
}

MOE_HD void send_plan_starts(const SendPlanArgs& a) {
  if (a.stride == 0) {
    scan_starts(a.rows_per_dest, a.num_dests, a.send_offsets);
    return;
  }
  for (int64_t d = 0; d <= a.num_dests; ++d) a.send_offsets[d] = d * a.stride;
}

// Static mode, before the fill: slot j holds no token until the fill hands it out.
MOE_HD void send_plan_clear(const SendPlanArgs& a, int64_t j) { a.send_token[j] = -1; }
MOE_HD int64_t send_plan_slots(const SendPlanArgs& a) { return a.stride * a.num_dests; }

MOE_HD void send_plan_fill(const SendPlanArgs& a, int64_t w) {
  int64_t* cursor = a.table + w * a.columns();  // this worker's next slot per destination
  for (int64_t d = 0; d < a.num_dests; ++d) cursor[d] += a.send_offsets[d];
  const int64_t per_dest = a.experts_per_dest();
  for (int64_t t = a.split.begin(w); t < a.split.end(w); ++t) {
    const int64_t* row = a.topk_idx + t * a.topk;
    int64_t* pair_slot = a.pair_slot + t * a.topk;
    int64_t* first_slot = a.first_slot + t * a.topk;
    for (int64_t k = 0; k < a.topk; ++k) {
      const int64_t e = row[k];
      if (!valid_expert(e, a.num_experts)) {
        pair_slot[k] = first_slot[k] = -1;
        continue;
      }
      add_count(&a.pairs_per_expert[e], 1);
      const int64_t dest = e / per_dest;
      if (first_to_dest(row, k, a.num_experts, per_dest)) {
        const int64_t slot = cursor[dest]++;
        a.send_token[slot] = t;
        pair_slot[k] = first_slot[k] = slot;
        continue;
      }
      first_slot[k] = -1;
      for (int64_t j = 0; j < k; ++j) {  // the slot the token already has for this destination
        if (valid_expert(row[j], a.num_experts) && row[j] / per_dest == dest) {
          pair_slot[k] = pair_slot[j];
          break;
        }
      }
    }
  }
}

// ---- expand plan: arrived rows -> expert-major output rows, (source rank, token) order -----
// Buckets are the local experts, or with blocks (pad_to_capacity) the (source rank, expert)
// pairs: every expert's segment then holds one block of block_rows rows per source rank, its
// rows first, zero rows after.

struct ExpandPlanArgs {
  const uint8_t* rows = nullptr;       // [num_rows, row_bytes] with SlotMeta at meta_offset
  int64_t num_rows = 0, row_bytes = 0, meta_offset = 0, topk = 0;
  int64_t experts = 0;                 // local experts
  const int64_t* row_order = nullptr;  // [num_rows]: the n-th row in API order; null: arrival
  WorkSplit split;                     // over rows in API order
  // Blocks: the rows of source s are API rows [source_starts[s], source_starts[s + 1]).
  int64_t block_rows = 0;              // 0: no blocks
  int64_t sources = 1;
  const int64_t* source_starts = nullptr;  // [sources + 1]
  int64_t* table = nullptr;            // [workers, buckets + 1] scratch; last column: bad slots
  int64_t* starts = nullptr;           // [buckets + 1]: bucket totals, then (no blocks) starts
  const int64_t* announced = nullptr;  // [experts + 1]: each expert's start as the headers said
  int64_t* status = nullptr;           // [1]: bad_status when what arrived is not what was announced
  int64_t bad_status = 1;
  int64_t* row_map = nullptr;          // [num_rows, topk] in arrival order: output row, -1 none
  float* slot_weights = nullptr;       // [num_rows, topk]
  float* recv_weights = nullptr;       // [output rows]
  // Padding (expert alignment, blocks): expert e's rows start at padded[e], zero rows fill its
  // segment up to padded[e + 1] (null: no padding).
  const int64_t* padded = nullptr;     // [experts + 1]
  uint8_t* recv_x = nullptr;           // [output rows, out_row_bytes]: padding rows zeroed
  int64_t out_row_bytes = 0;
  uint8_t* recv_scales = nullptr;      // pre-quantized FP8 rows: [output rows, scale_row_bytes], or null
  int64_t scale_row_bytes = 0;
  engine::StaticExpand fixed;         // the static mode (then sticky replaces status)

  MOE_HD bool blocks() const { return block_rows > 0; }
  MOE_HD int64_t buckets() const { return blocks() ? sources * experts : experts; }
  MOE_HD int64_t columns() const { return buckets() + 1; }
  // starts[] holds the bucket totals, then this call's verdict (0: place the rows).
  MOE_HD int64_t verdict() const { return starts[columns()]; }
  MOE_HD bool padding() const { return padded != nullptr || fixed.segment_rows > 0; }
  MOE_HD int64_t segment_start(int64_t e) const { return fixed.segment_rows ? e * fixed.segment_rows : padded[e]; }
  MOE_HD int64_t bucket(int64_t source, int64_t e) const { return blocks() ? source * experts + e : e; }
  MOE_HD int64_t row(int64_t n) const { return row_order ? row_order[n] : n; }
  MOE_HD SlotMeta meta(int64_t row, int64_t k) const {
    return reinterpret_cast<const SlotMeta*>(rows + row * row_bytes + meta_offset)[k];
  }
  MOE_HD int64_t output_rows() const { return padding() ? segment_start(experts) : announced[experts]; }
};

// The last i in [0, n) with sorted[i] <= value (sorted ascending, sorted[0] <= value).
MOE_HD int64_t last_at_or_below(const int64_t* sorted, int64_t n, int64_t value) {
  int64_t lo = 0, hi = n;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] <= value) lo = mid; else hi = mid;
  }
  return lo;
}

MOE_HD int64_t source_of(const ExpandPlanArgs& a, int64_t n) {
  if (a.fixed.on()) return n / a.fixed.source_stride;
  return a.blocks() ? last_at_or_below(a.source_starts, a.sources, n) : 0;
}

MOE_HD void expand_plan_count(const ExpandPlanArgs& a, int64_t w) {
  int64_t* mine = a.table + w * a.columns();
  for (int64_t c = 0; c < a.columns(); ++c) mine[c] = 0;
  for (int64_t n = a.split.begin(w); n < a.split.end(w); ++n) {
    const int64_t row = a.row(n), source = source_of(a, n);
    for (int64_t k = 0; k < a.topk; ++k) {
      const int64_t e = a.meta(row, k).local_expert;
      if (e >= 0) ++mine[e < a.experts ? a.bucket(source, e) : a.buckets()];
    }
  }
}

// One column per call, for c in [0, buckets]; starts[c] holds the bucket's total.
MOE_HD void expand_plan_column(const ExpandPlanArgs& a, int64_t c) {
  a.starts[c] = scan_column(a.table, a.split.workers, a.columns(), c);
}

MOE_HD void expand_plan_starts(const ExpandPlanArgs& a) {
  // Rows are only placed where the headers said (the outputs were sized from them): a local
  // expert id out of range, a count that disagrees or a block past its rows places nothing.
  bool agrees = a.starts[a.buckets()] == 0;
  if (a.blocks()) {  // starts keep the totals (the padding pass reads them)
    for (int64_t e = 0; e < a.experts && agrees; ++e) {
      int64_t total = 0;
      for (int64_t s = 0; s < a.sources; ++s) {
        const int64_t count = a.starts[a.bucket(s, e)];
        agrees = agrees && count <= a.block_rows;
        total += count;
      }
      agrees = agrees && (!a.announced || total == a.announced[e + 1] - a.announced[e]);
    }
  } else {
    scan_starts(a.starts, a.experts, a.starts);  // in place
    for (int64_t e = 0; e <= a.experts && agrees && a.announced; ++e) agrees = a.starts[e] == a.announced[e];
  }
  int64_t status = agrees ? 0 : a.bad_status;
  const engine::StaticExpand& fixed = a.fixed;
  if (fixed.headers) {  // a sender's problem comes first: it explains what arrived
    const int64_t seen =
        engine::received_status(fixed.headers, a.sources, fixed.header_layout, fixed.call, fixed.world);
    if (seen != 0) status = seen;
  }
  a.starts[a.columns()] = status;
  if (!fixed.sticky) {
    *a.status = status;
  } else if (status != 0 && *fixed.sticky == 0) {
    *fixed.sticky = status;
  }
}

// The first output row of bucket (source, e).
MOE_HD int64_t bucket_base(const ExpandPlanArgs& a, int64_t source, int64_t e) {
  if (a.blocks()) return a.segment_start(e) + source * a.block_rows;
  return a.padding() ? a.segment_start(e) : a.starts[e];
}

MOE_HD void expand_plan_fill(const ExpandPlanArgs& a, int64_t w) {
  int64_t* cursor = a.table + w * a.columns();  // this worker's next index in each bucket
  const bool place = a.verdict() == 0;
  for (int64_t n = a.split.begin(w); n < a.split.end(w); ++n) {
    const int64_t row = a.row(n), source = source_of(a, n);
    for (int64_t k = 0; k < a.topk; ++k) {
      const SlotMeta m = a.meta(row, k);
      const int64_t at = row * a.topk + k;
      if (!place || m.local_expert < 0 || m.local_expert >= a.experts) {
        a.row_map[at] = -1;
        a.slot_weights[at] = 0.0f;
        continue;
      }
      const int64_t e = m.local_expert;
      const int64_t out = bucket_base(a, source, e) + cursor[a.bucket(source, e)]++;
      a.row_map[at] = out;
      a.slot_weights[at] = m.weight;
      a.recv_weights[out] = m.weight;
    }
  }
}

// Output row r is padding: past its expert's rows, or past its block's.
MOE_HD bool is_padding(const ExpandPlanArgs& a, int64_t r) {
  const int64_t e = a.fixed.segment_rows ? r / a.fixed.segment_rows : last_at_or_below(a.padded, a.experts, r);
  const int64_t within = r - a.segment_start(e);
  if (!a.blocks()) return within >= a.starts[e + 1] - a.starts[e];
  const int64_t source = within / a.block_rows;
  return source >= a.sources || within % a.block_rows >= a.starts[a.bucket(source, e)];
}

// Zeroes output row r of recv_x and its weight if it is padding, the lanes sharing the row;
// every row when nothing was placed (the outputs are defined: zeros).
MOE_HD void zero_if_padding(const ExpandPlanArgs& a, int64_t r, Lanes lanes) {
  if (!a.padding() || (a.verdict() == 0 && !is_padding(a, r))) return;
  uint8_t* out = a.recv_x + r * a.out_row_bytes;
  for (int64_t b = lanes.id; b < a.out_row_bytes; b += lanes.count) out[b] = 0;
  uint8_t* scales = a.recv_scales ? a.recv_scales + r * a.scale_row_bytes : nullptr;
  for (int64_t b = lanes.id; scales && b < a.scale_row_bytes; b += lanes.count) scales[b] = 0;
  if (lanes.id == 0) a.recv_weights[r] = 0.0f;
}

}  // namespace bodies
}  // namespace moe_comm
