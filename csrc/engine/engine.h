// The dispatch/combine engine: plan -> header -> pack -> exchange -> expand / reduce, over one
// stage (flat) or two (hierarchical: rail, then node), forward and backward, for one Buffer.
// One call from Python per dispatch, combine and backward; device work and the wire go through
// the interfaces of device.h and interfaces.h, so the CPU and CUDA backends run the same
// control flow, and the counters it keeps are the same on both.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "../core/layout.h"
#include "device.h"
#include "header.h"
#include "interfaces.h"

namespace moe_comm {
namespace engine {

struct StageSpec {
  std::string name;              // "flat", "inter_node" or "intra_node": names every error
  int64_t size = 1;              // destinations
  int64_t index = 0;             // this rank's place among them
  int64_t experts_per_dest = 0;  // destination d owns experts [d * epd, (d + 1) * epd) of the stage
  std::vector<int64_t> global_ranks;  // destination -> rank in the Buffer's group
  std::vector<uint8_t> remote;        // destination -> on another node
  std::shared_ptr<Transport> transport;  // null when size == 1
};

// Rows of a 2-D tensor: unit stride inside a row, any stride between rows.
struct RowsIn {
  const uint8_t* data = nullptr;
  int64_t stride_bytes = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype = DType::kFloat32;
};

// How dispatch's token rows cross the wire (API.md "FP8 on the wire").
struct DispatchWire {
  bool fp8 = false;           // e4m3 with a float32 scale per 128 elements; else x's dtype
  // x holds e4m3 bytes already (its RowsIn dtype is then the combine's), and `scales` their
  // [T, ceil(H / 128)] float32 scales, rows scales_stride bytes apart; else fp8 quantizes x.
  bool prequantized = false;
  const uint8_t* scales = nullptr;
  int64_t scales_stride = 0;
};

// The header's dtype fact of a dispatch (core/row_format.h): ranks must agree on it.
inline int64_t dtype_fact(DType dtype, const DispatchWire& w) {
  return static_cast<int64_t>(dtype) + (w.fp8 ? kFp8Wire : 0) + (w.prequantized ? kPrequantized : 0);
}

struct LinkStats {
  int64_t rows_intra = 0, rows_inter = 0, bytes_intra = 0, bytes_inter = 0;
  int64_t pairs_dropped = 0;  // this rank's (token, expert) pairs capacity dropped
};

// Everything combine and the backwards reuse: the handle's native part.
struct DispatchLayout {
  int64_t num_tokens = 0, hidden = 0, topk = 0;
  DType dtype = DType::kFloat32;  // x's (pre-quantized: the combine's)
  int64_t dtype_fact = 0;         // the header's: dtype and wire (core/row_format.h)
  std::vector<StagePlan> plans;
  int64_t num_last = 0;       // rows that arrived at the final stage (N)
  int64_t num_recv_rows = 0;  // expert-major rows (R), padding included
  bool padded = false;        // some of them are padding (zero rows no slot maps to)
  bool fixed = false;         // the static mode: tokens_per_expert and pairs_dropped stay where they are
  Array row_map;              // [N, K] int64: expert-major row of (arrived row, k), -1 masked
  Array slot_weights;         // [N, K] float32: dispatch router weights at the receiver
  std::vector<int64_t> tokens_per_expert;
  LinkStats stats;
  Array dropped;              // [1] int64 where it was counted: the static mode's pairs_dropped
  Counters counters;          // of the dispatch call
};

struct DispatchResult {
  Problem problem;                  // agreed over the header exchange; nothing moved when set
  RoutingProblem routing;           // this rank's own routing problem, when it had one
  int64_t static_status = 0;        // the static mode's agreed problem (immediate status only)
  Array recv_x, recv_weights;
  Array recv_scales;  // pre-quantized FP8 input: the scales of recv_x's e4m3 rows
  std::shared_ptr<DispatchLayout> layout;
};

struct CombineResult {
  int64_t status = 0;   // agreed: 0 ok, else (world - bad rank) << 8 | argument code
  Array y;              // [T, H] in expert_y's dtype
  Array slot_weights;   // [N, K] the weights used at the receiver (null: unweighted)
};

struct BackwardResult {
  Array grad_rows;   // dispatch backward: grad_x [T, H]; combine backward: grad_expert_y [R, H]
  Array grad_weights;  // [T, K] float32, or empty
};

class Engine {
 public:
  Engine(std::vector<StageSpec> stages, int64_t rank, int64_t world_size, int64_t num_experts,
         std::shared_ptr<Device> device, std::shared_ptr<Allocator> allocator);

  // x [T, H]; topk_idx [T, K] int64 (host-readable where the device is); weights [T, K] or
  // null. rejected: the argument code this rank's Python checks rejected (0: none); the rank
  // then joins the header exchange only, with zeros but num_experts.
  // capacity: pairs past it are dropped on this rank before anything is sent.
  // alignment: each local expert's rows end with zero rows up to a multiple of it.
  // pad_to_capacity: each expert's segment is one block of capacity.capacity rows per source
  // rank (kept rows, then zero rows); every rank must use the same capacity.
  // static_tokens > 0 (a flat engine, pad_to_capacity, the Buffer's max_tokens_per_rank): the
  // static mode (engine/static_dispatch.cpp): fixed-size exchanges, no host wait.
  // wire: FP8 rows (quantized here, or given quantized).
  DispatchResult dispatch(const RowsIn& x, const int64_t* topk_idx, int64_t topk, const float* weights,
                          int64_t rejected, const Capacity& capacity, int64_t alignment, bool pad_to_capacity,
                          int64_t static_tokens = 0, const DispatchWire& wire = DispatchWire{});

  // The problems the static mode (and deferred combine statuses) kept on the device, agreed
  // over every stage: one host wait and one exchange of status words per stage, collective.
  // Cleared on return. 0: none; else (world - bad rank) << 8 | kStaticFlag | status code.
  int64_t agree_status();

  // expert_y [R, H] (ignored when this rank rejected its input, status_code > 0: zeros are sent);
  // weights [T, K] or null; reuse: they are dispatch's weights, already at the receivers.
  // status_code: -1 no status travels; else this rank's code, agreed in-band.
  CombineResult combine(const DispatchLayout& layout, const RowsIn& expert_y, const float* weights, bool reuse,
                        int64_t status_code);

  // grad_recv_x [R, H]; grad_recv_weights [R] or null (then no weight gradient).
  BackwardResult dispatch_backward(const DispatchLayout& layout, const RowsIn& grad_recv_x,
                                   const float* grad_recv_weights);
  // grad_y [T, H]; slot_weights from combine or null; expert_y [R, H], or null: no weight
  // gradient.
  BackwardResult combine_backward(const DispatchLayout& layout, const RowsIn& grad_y, const float* slot_weights,
                                  const RowsIn* expert_y);

  // Combine's status, when it travels: agreed inside the combine call (the default: free on the
  // CPU, one host wait per carrying exchange on CUDA), or deferred: the statuses that arrived
  // stay where they landed and the next dispatch's header reports a bad one to every rank
  // (no host wait in combine).
  void set_combine_status_deferred(bool deferred) { defer_status_ = deferred; }
  bool combine_status_deferred() const { return defer_status_; }

  const Counters& counters(const std::string& kind) const;
  int64_t workspace_bytes() const;
  int64_t rank() const { return rank_; }

 private:
  struct Headers {
    std::vector<HeaderLayout> layouts;
    std::vector<Array> sent_on_device, received_on_device;
    std::vector<std::vector<int64_t>> sent, received;  // host copies, after the one wait (if read)
  };
  // reads: the one host wait that reads the headers back (false: the static mode's repeated
  // calls; the headers stay on the device and no problem is returned).
  Problem exchange_headers(const CallFacts& call, const Problem& local, const StagePlan* plan0,
                           const int64_t* forward, Headers& h, LinkStats& stats, bool reads = true);
  DispatchResult dispatch_static(const RowsIn& x, const int64_t* topk_idx, int64_t topk, const float* weights,
                                 const Capacity& capacity, int64_t alignment, int64_t static_tokens,
                                 const DispatchWire& wire);
  // A rank that read a problem: the row exchanges of its static peers that did not read it,
  // with zeros, and the immediate status agreement they end with.
  void settle_with_static_peers(const Headers& h, bool static_here);
  bool agrees_at_once(const Headers& h, bool static_here) const;
  // The outputs of a dispatch (R expert rows, N arrived rows) and the expand's arguments.
  ExpandArgs prepare_outputs(const RowsIn& x, int64_t topk, const uint8_t* arrived, int64_t N, int64_t R,
                             const DispatchWire& wire, DispatchLayout& layout, DispatchResult& out);
  // Shapes, link stats (from the plans' send rows) and counters of a finished dispatch.
  void finish_layout(const RowsIn& x, int64_t topk, int64_t N, int64_t R, DispatchLayout& layout);
  // The dispatch's rows on the wire (layout.dtype_fact set).
  RowFormat wire_format(const DispatchLayout& layout) const {
    return dispatch_row_format(layout.hidden, layout.dtype_fact, layout.topk, sizeof(SlotMeta));
  }
  int64_t agree();  // agree_status inside the current call
  std::vector<uint8_t*> run_stages(const RowsIn& x, const int64_t* idx, int64_t topk, const float* weights,
                                   const DispatchWire& wire, Headers& h, DispatchLayout& layout);
  // The reverse path: partials summed at every hop. -> y [T, H] in rows' dtype; scalars [T, K].
  void reduce_back(const DispatchLayout& layout, const RowsIn& rows, const int64_t* row_map, const float* weights,
                   const float* slot_scalars, const std::string& name, int64_t* status, Array& y,
                   Array& scalars_out);
  // Sends each token row [T, H'] along the dispatch's path. -> [N, H'] rows (stride: row_bytes).
  RowsIn send_along(const DispatchLayout& layout, const RowsIn& rows, const std::string& name, int64_t* status);
  // Packs `rows` into the stage's send rows and exchanges them. -> the rows that arrived.
  // FP8 rows: quantized from `rows` (fp8 set, not prequantized), else copied with the scales
  // fp8 names.
  uint8_t* pack_and_send(const StageSpec& stage, const StagePlan& plan, const RowsIn& rows, const RowFormat& fmt,
                         const int64_t* idx, const float* weights, int64_t topk, int64_t* status,
                         const std::string& name, const DispatchWire& fp8 = DispatchWire{});
  // dst[i] = sum_k weights[i, k] * src[map[i, k]] (+ per-slot scalars riding in the row).
  void reduce_rows(const RowsIn& src, const int64_t* map, const float* weights, int64_t topk, int64_t num_out,
                   uint8_t* dst, int64_t dst_stride, const float* scalars, int64_t scalars_offset);
  void exchange(const StageSpec& stage, const uint8_t* send, const std::vector<int64_t>& send_rows, uint8_t* recv,
                const std::vector<int64_t>& recv_rows, int64_t row_bytes, int64_t* status, const std::string& name);
  uint8_t* workspace(const std::string& name, int64_t bytes);
  // Room for `count` deferred statuses to land in (pending_, read by the next header).
  int64_t* reserve_pending(int64_t count);
  int64_t pending_capacity() const;
  // After a read that reported them: no pending statuses; zero the words the report came from
  // (the deferred combine statuses, the static mode's sticky word).
  void clear_reported(bool combines, bool sticky);
  Array allocate(int64_t bytes) { return allocator_->allocate(bytes); }
  void launch() { ++current_->launches; }
  void begin(const std::string& kind);

  std::vector<StageSpec> stages_;
  int64_t rank_, world_size_, num_experts_, experts_per_rank_;
  std::shared_ptr<Device> device_;
  std::shared_ptr<Allocator> allocator_;
  std::map<std::string, Array> workspaces_;
  std::map<std::string, int64_t> sequence_;
  std::map<std::string, Counters> counters_;
  Counters* current_ = nullptr;
  bool defer_status_ = false;
  Array pending_;              // deferred combine statuses since the last dispatch header
  int64_t pending_used_ = 0;
  int64_t pending_folded_ = 0;  // MAX of those read back early (pending_ was full)
  Array sticky_;               // [1] int64: the static mode's first problem, until reported
  Array zero_status_;          // [largest stage] int64 zeros: a good rank's status words
  std::vector<int64_t> agreed_signature_;  // the static call all ranks last read and agreed on
  bool captured_ = false;      // a call ran under CUDA graph capture: workspaces are never freed
  std::vector<Array> retired_;  // workspaces outgrown since (a graph may still write them)
};

}  // namespace engine
}  // namespace moe_comm
