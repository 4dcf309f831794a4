// Device work of the engine: every call is one kernel launch on CUDA (a grid over rows or
// tokens) and the same per-row code in loops on the CPU (csrc/cpu/cpu_device.h). Arrays live on
// the device; the engine reads none of them on the host except where `host_readable()`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../core/layout.h"
#include "../core/row_format.h"
#include "../core/token_params.h"
#include "header.h"
#include "interfaces.h"

namespace moe_comm {
namespace engine {

// Where every input row of one stage goes (core/layout.h fill_send_plan over the stage's
// destinations). The input of stage 0 is this rank's tokens; of stage j > 0 what stage j - 1
// delivered, in arrival order.
struct StagePlan {
  int64_t num_in = 0;     // input rows
  int64_t num_send = 0;   // send slots (rows on the wire, own included); from the header on CUDA
  int64_t num_recv = 0;   // rows received
  Array status;           // [1] int64: kRoutingCode when the routing breaks a rule, else 0
  Array rows_per_dest;    // [size] int64
  Array pairs_per_expert; // [size * experts_per_dest] int64
  Array send_offsets;     // [size + 1] int64
  Array send_token;       // [num_send] int64: input row of each send slot, destination-major
  Array pair_slot;        // [num_in, K] int64: send slot of (row, k), -1 masked
  Array first_slot;       // [num_in, K] int64: the same on each destination's first slot only
  Array kept_idx;         // [num_in, K] int64: the routing after capacity dropped pairs (-1), or empty
  Array dropped;          // [1] int64: pairs capacity dropped, or empty
  std::vector<int64_t> send_rows, recv_rows;  // per peer, from the header exchange
  // In, set before plan_send: static mode's fixed slots per destination (0: packed by count).
  int64_t stride = 0;
};

// Expert capacity on the sending rank: each expert keeps at most `capacity` of its pairs, the
// largest weights (by_weight) or the first tokens; the rest are dropped before the plan.
struct Capacity {
  int64_t capacity = -1;  // -1: no capacity
  bool by_weight = false;
  const float* weights = nullptr;  // [T, K] where the routing lives; needed when by_weight
  bool on() const { return capacity >= 0; }
};

// Receiver side of dispatch: arrived rows -> expert-major rows and the maps combine reuses.
struct ExpandArgs {
  const uint8_t* rows = nullptr;  // [num_rows, fmt.row_bytes] with SlotMeta
  int64_t num_rows = 0;
  RowFormat fmt;
  int64_t topk = 0;
  int64_t experts_per_rank = 0;
  DType dtype = DType::kFloat32;
  int64_t hidden = 0;
  const int64_t* row_order = nullptr;  // [num_rows] on the device: (source rank, token) order; null: arrival
  const int64_t* expert_offsets = nullptr;  // [experts_per_rank + 1], from the headers (host)
  // [experts_per_rank + 1] (host): each expert's segment aligned, zero rows filling the tail;
  // null: none. recv_x and recv_weights are then padded_offsets[experts_per_rank] rows.
  const int64_t* padded_offsets = nullptr;
  // pad_to_capacity: each expert's segment is one block of block_rows rows per source rank
  // (0: none; padded_offsets then given); the rows of source s are the API-order rows
  // [source_starts[s], source_starts[s + 1]) (host, [sources + 1]).
  int64_t block_rows = 0;
  int64_t sources = 1;
  const int64_t* source_starts = nullptr;
  // Where the plan says whether what arrived is what the headers announced (0, or bad_status:
  // then it placed nothing); the engine keeps it for the next dispatch's header.
  int64_t* status = nullptr;
  int64_t bad_status = 1;
  // The static mode (header.h): then status is unused and expert_offsets may be null.
  StaticExpand fixed;
  int64_t* row_map = nullptr;      // [num_rows, topk] out
  float* slot_weights = nullptr;   // [num_rows, topk] out
  float* recv_weights = nullptr;   // [R] out
  uint8_t* recv_x = nullptr;       // [R, hidden] out
  // FP8 rows (fmt.fp8()) are dequantized into recv_x, or with recv_scales set (pre-quantized
  // input) moved as they are: recv_x then [R, hidden] e4m3 bytes, recv_scales their scales.
  uint8_t* recv_scales = nullptr;  // [R, ceil(hidden / 128)] float32 out, or null

  int64_t out_row_bytes() const { return recv_scales ? hidden : hidden * dtype_size(dtype); }
  int64_t scale_row_bytes() const { return recv_scales ? fmt.scale_bytes : 0; }
};

// The last step of every backend's expand: each arrived row into the expert rows it feeds.
inline ScatterParams expand_scatter(const ExpandArgs& a) {
  ScatterParams s;
  s.src = a.rows;
  s.src_stride = a.fmt.row_bytes;
  s.num_src = a.num_rows;
  s.row_map = a.row_map;
  s.topk = a.topk;
  s.hidden = a.hidden;
  s.dtype = a.dtype;
  s.dst = a.recv_x;
  s.dst_stride = a.out_row_bytes();
  s.fp8_scale_offset = a.fmt.fp8() ? a.fmt.scale_offset : -1;
  s.scales_dst = a.recv_scales;
  s.scales_dst_stride = a.scale_row_bytes();
  return s;
}

class Device {
 public:
  virtual ~Device() = default;
  virtual bool host_readable() const = 0;
  // Whether the work is being captured into a CUDA graph right now (never on the CPU).
  virtual bool capturing() const { return false; }

  // The send plan of one stage; allocates its arrays, and checks the routing into
  // plan.status on the way (an index out of range counts as masked; nothing is sent then).
  // With capacity on, pairs past it are dropped first (plan.kept_idx, plan.dropped), in the
  // same launch.
  virtual void plan_send(const Routing& r, const Capacity& capacity, Allocator& alloc, StagePlan& plan) = 0;
  // Headers, a row per thread (header.h bodies).
  virtual void fill_header(const HeaderFill& h) = 0;
  virtual void relay_header(const HeaderRelay& h) = 0;
  // Device -> host copies, then one wait for all of them (the dispatch's host wait); `stage`
  // names the exchange a bounded wait blames when it gives up.
  struct Transfer {
    const void* src;
    void* dst;
    int64_t bytes;
  };
  virtual void download(const std::vector<Transfer>& items, const std::string& stage) = 0;
  virtual void fill_zero(void* data, int64_t bytes) = 0;
  // tokens_per_rank[num_ranks] of a routing (the hierarchical forward counts).
  virtual void count_tokens(const Routing& r, Allocator& alloc, int64_t* tokens_per_rank) = 0;
  // A host array's copy on the device (the host array may go once this returns).
  virtual Array upload(const void* host, int64_t bytes, Allocator& alloc) = 0;
  virtual void pack_rows(const PackParams& p) = 0;
  // idx[i, k] / weights[i, k] from the SlotMeta block of arrived dispatch rows.
  virtual void read_slot_meta(const uint8_t* rows, int64_t num_rows, const RowFormat& fmt, int64_t topk,
                              int64_t* idx, float* weights) = 0;
  virtual void expand(const ExpandArgs& a, Allocator& alloc) = 0;  // alloc: scratch
  virtual void scatter_rows(const ScatterParams& p) = 0;
  virtual void reduce_rows(const ReduceParams& p) = 0;
  virtual void row_dots(const DotParams& p) = 0;
  // A stage with one destination: out_map[i, k] = map[s, k] (weights likewise) where s is row
  // i's only send slot, -1 / 0 when it sent nothing.
  virtual void compose_own_slot(const int64_t* first_slot, int64_t num_in, int64_t topk, const int64_t* map,
                                const float* weights, int64_t* out_map, float* out_weights) = 0;
  // out[i, k] = per_slot[pair_slot[i, k], k] (a [rows, stride]-strided float block), 0 masked.
  virtual void collect_pairs(const float* per_slot, int64_t per_slot_stride, const int64_t* pair_slot,
                             int64_t num_in, int64_t topk, float* out) = 0;
  // out[i, k] = values[index[i, k]], 0 where index < 0.
  virtual void gather_masked(const float* values, const int64_t* index, int64_t count, float* out) = 0;
  // out[i, k] = map[i, k] < 0 ? 0 : rows[i, k] for float rows [num_rows, stride bytes]
  // (combine's own weights at the receiver).
  virtual void mask_by_map(const uint8_t* rows, int64_t stride, const int64_t* map, int64_t num_rows, int64_t topk,
                           float* out) = 0;
};

}  // namespace engine
}  // namespace moe_comm
