// Binding of the engine (csrc/engine): one call per dispatch, combine and backward. Tensors
// become pointers here; the engine's memory is torch tensors (handed back as outputs), its CPU
// wire the Buffer's gloo groups (gloo_transport.h). The GIL is released for every call.
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <algorithm>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "../cpu/cpu_device.h"
#include "../cpu/shm_transport.h"
#include "../engine/engine.h"
#if defined(MOE_COMM_WITH_NCCL)
#include "../comm/nccl_transport.h"
#endif
#include "gloo_transport.h"
#include "tensor_args.h"
#include "torch_allocator.h"

namespace moe_comm {
namespace bind {
namespace {

using engine::Array;
using engine::DispatchLayout;
using engine::Engine;
using engine::RowsIn;

c10::ScalarType scalar_type(DType t) {
  switch (t) {
    case DType::kBFloat16: return torch::kBFloat16;
    case DType::kFloat16: return torch::kFloat16;
    default: return torch::kFloat32;
  }
}

// Rows with unit stride inside a row (a copy otherwise, kept alive by `keep`).
RowsIn rows_of(const Tensor& t, const char* name, Tensor& keep) {
  keep = (t.dim() == 2 && t.size(1) > 1 && t.stride(1) != 1) ? t.contiguous() : t;
  const RowView v = row_view(keep, name, keep.device());
  return RowsIn{v.data, v.stride_bytes, v.rows, v.cols, v.dtype};
}

// Null means "no weights" to the engine: an empty tensor (0 tokens here) still has weights.
const float* weights_of(const std::optional<Tensor>& w, Tensor& keep) {
  static const float kNoTokens = 0.0f;
  if (!w) return nullptr;
  keep = w->contiguous();
  return keep.numel() ? keep.data_ptr<float>() : &kNoTokens;
}

py::dict counters_dict(const engine::Counters& c) {
  py::dict d;
  d["launches"] = c.launches;
  d["exchanges"] = c.exchanges;
  d["host_waits"] = c.host_waits;
  d["host_collectives"] = c.host_collectives;
  return d;
}

class PyEngine {
 public:
  // stages: (name, size, index, experts_per_dest, Buffer ranks, remote flags, wire, shm token)
  // per stage; the wire is the stage's gloo backend (CPU) or our NcclCommunicator (CUDA), None
  // for size 1; a shm token (CPU, every rank on one host) puts the stage on shared memory.
  // device_index: -1 for the CPU, else the CUDA device.
  PyEngine(const py::list& stages, int64_t rank, int64_t world_size, int64_t num_experts, const py::object& store,
           const std::string& uid, double sign_after_s, int64_t device_index, double timeout_s)
      : last_failure_("", "", -1), device_(device_index < 0 ? c10::Device(c10::kCPU)
                                                             : c10::Device(c10::kCUDA, c10::DeviceIndex(device_index))) {
    RollCall roll{store.is_none() ? c10::intrusive_ptr<c10d::Store>() : store.cast<c10::intrusive_ptr<c10d::Store>>(),
                  uid, rank, sign_after_s};
    std::shared_ptr<engine::Device> work = std::make_shared<cpu::CpuDevice>();
#if defined(MOE_COMM_WITH_NCCL)
    if (device_.is_cuda()) {
      cuda_ = std::make_shared<cuda::CudaDevice>(int(device_index));
      work = cuda_;
    }
#else
    MOE_HOST_ASSERT(device_.is_cpu(), "a CUDA engine needs moe_comm built with CUDA and NCCL");
#endif
    std::vector<engine::StageSpec> specs;
    for (const py::handle& s : stages) {
      auto t = s.cast<py::tuple>();
      engine::StageSpec spec;
      spec.name = t[0].cast<std::string>();
      spec.size = t[1].cast<int64_t>();
      spec.index = t[2].cast<int64_t>();
      spec.experts_per_dest = t[3].cast<int64_t>();
      spec.global_ranks = t[4].cast<std::vector<int64_t>>();
      for (bool remote : t[5].cast<std::vector<bool>>()) spec.remote.push_back(remote ? 1 : 0);
      if (spec.size > 1 && t.size() > 7 && !t[7].is_none()) {
        spec.transport = std::make_shared<cpu::ShmTransport>(
            t[7].cast<std::string>(), spec.name, spec.global_ranks, spec.index, timeout_s, sign_after_s,
            [roll](const std::string& stage, int64_t seq) { sign_roll(roll, stage, seq); });
      } else if (spec.size > 1) {
        spec.transport = make_transport(t[6], roll);
      }
      specs.push_back(std::move(spec));
    }
    CallScope scope(*this, 0);  // its words are made on the Buffer's device
    engine_ = std::make_unique<Engine>(std::move(specs), rank, world_size, num_experts, work,
                                       std::make_shared<TorchAllocator>(device_));
  }

  // -> (problem (code, rank, seen_by, field, mine, theirs), routing (kind, token, slot, value),
  //     recv_x, recv_weights, tokens_per_expert, layout, static status) ; outputs None when a
  // problem was agreed. capacity: -1 none, else pairs each expert keeps of this rank's
  // (by_weight: the largest). static_tokens > 0: the static mode (tokens_per_expert then on the
  // device; the static status is the agreed problem when statuses are immediate, else 0).
  // fp8: rows cross as e4m3 with per-128 scales; x_scales given: x is float8_e4m3fn already
  // (recv_x is then the pair (recv_fp8, recv_scales), and the combine's dtype bfloat16).
  py::tuple dispatch(const std::optional<Tensor>& x, const std::optional<Tensor>& topk_idx,
                     const std::optional<Tensor>& topk_weights, int64_t rejected, int64_t stream,
                     int64_t capacity, bool by_weight, int64_t alignment, bool pad_to_capacity,
                     int64_t static_tokens, bool fp8, const std::optional<Tensor>& x_scales) {
    Tensor xk, idx, wk, sk;
    RowsIn rows;
    const float* w = nullptr;
    int64_t topk = 0;
    engine::DispatchWire wire;
    wire.fp8 = fp8 && !rejected;
    if (!rejected) {
      if (x_scales) {
        MOE_HOST_ASSERT(fp8, "x_scales come with FP8 rows");
        // e4m3 bytes, one per element; the dtype the layout keeps is the combine's, bfloat16.
        MOE_HOST_ASSERT(x->scalar_type() == torch::kFloat8_e4m3fn && x->dim() == 2,
                        "pre-quantized x must be 2-D float8_e4m3fn, got " << x->scalar_type());
        xk = x->contiguous();
        rows = RowsIn{static_cast<const uint8_t*>(xk.data_ptr()), xk.size(1), xk.size(0), xk.size(1),
                      DType::kBFloat16};
        sk = x_scales->contiguous();
        expect(sk, "x_scales", torch::kFloat32, 2, sk.device());
        MOE_HOST_ASSERT(sk.size(0) == rows.rows && sk.size(1) == fp8_scale_count(rows.cols),
                        "x_scales must be [T, ceil(H / 128)], got " << sk.sizes());
        wire.prequantized = true;
        wire.scales = static_cast<const uint8_t*>(sk.data_ptr());
        wire.scales_stride = sk.size(1) * int64_t(sizeof(float));
      } else {
        rows = rows_of(*x, "x", xk);
      }
      idx = topk_idx->to(torch::kInt64).contiguous();
      topk = idx.size(1);
      w = weights_of(topk_weights, wk);
    }
    engine::Capacity cap;
    if (capacity >= 0) {
      MOE_HOST_ASSERT(!by_weight || w, "drop_policy 'probs' needs topk_weights");
      cap = engine::Capacity{capacity, by_weight, w};
    }
    engine::DispatchResult r;
    {
      py::gil_scoped_release release;
      r = guarded(stream, [&] {
        return engine_->dispatch(rows, rejected ? nullptr : idx.data_ptr<int64_t>(), topk, w, rejected, cap,
                                 alignment, pad_to_capacity && !rejected, static_tokens, wire);
      });
    }
    const auto& p = r.problem;
    py::tuple problem = py::make_tuple(p.code, p.rank, p.seen_by, p.field, p.mine, p.theirs);
    py::tuple routing = py::make_tuple(static_cast<int>(r.routing.kind), r.routing.token, r.routing.slot,
                                       r.routing.value);
    if (p.any()) return py::make_tuple(problem, routing, py::none(), py::none(), py::none(), py::none(), 0);
    const DispatchLayout& l = *r.layout;
    py::object recv_x;
    if (wire.prequantized) {  // moved bit for bit: e4m3 rows and their scales
      recv_x = py::make_tuple(as_tensor(r.recv_x, torch::kFloat8_e4m3fn, {l.num_recv_rows, l.hidden}),
                              as_tensor(r.recv_scales, torch::kFloat32, {l.num_recv_rows, fp8_scale_count(l.hidden)}));
    } else {
      recv_x = py::cast(as_tensor(r.recv_x, scalar_type(l.dtype), {l.num_recv_rows, l.hidden}));
    }
    Tensor recv_weights = as_tensor(r.recv_weights, torch::kFloat32, {l.num_recv_rows});
    Tensor counts;
    if (l.fixed) {  // every segment has the same length: a fill where the tokens are, no copy
      const int64_t segment = l.tokens_per_expert.empty() ? 0 : l.tokens_per_expert[0];
      counts = torch::full({int64_t(l.tokens_per_expert.size())}, segment,
                           torch::TensorOptions().dtype(torch::kInt64).device(device_));
    } else {
      counts = torch::tensor(l.tokens_per_expert, torch::TensorOptions().dtype(torch::kInt64));  // CPU: API
    }
    return py::make_tuple(problem, routing, recv_x, recv_weights, counts, r.layout, r.static_status);
  }

  // -> (agreed status, y or None, slot_weights or None)
  py::tuple combine(const std::shared_ptr<DispatchLayout>& layout, const std::optional<Tensor>& expert_y,
                    const std::optional<Tensor>& weights, bool reuse, int64_t status_code, int64_t stream) {
    Tensor yk, wk;
    RowsIn rows;
    const float* w = nullptr;
    if (status_code <= 0) rows = rows_of(*expert_y, "expert_y", yk);
    w = weights_of(weights, wk);  // a rejecting rank's are zeros: only the path they select matters
    engine::CombineResult r;
    {
      py::gil_scoped_release release;
      r = guarded(stream, [&] { return engine_->combine(*layout, rows, w, reuse, status_code); });
    }
    if (r.status != 0 || status_code > 0) return py::make_tuple(r.status, py::none(), py::none());
    Tensor y = as_tensor(r.y, scalar_type(layout->dtype), {layout->num_tokens, layout->hidden});
    py::object slot = r.slot_weights.owner
                          ? py::cast(as_tensor(r.slot_weights, torch::kFloat32, {layout->num_last, layout->topk}))
                          : py::none();
    return py::make_tuple(r.status, y, slot);
  }

  // -> (grad_x [T, H], grad_weights [T, K] or None)
  py::tuple dispatch_backward(const std::shared_ptr<DispatchLayout>& layout, const Tensor& grad_recv_x,
                              const std::optional<Tensor>& grad_recv_weights, int64_t stream) {
    Tensor gk, wk;
    const RowsIn rows = rows_of(grad_recv_x, "grad_recv_x", gk);
    const float* gw = weights_of(grad_recv_weights, wk);
    engine::BackwardResult r;
    {
      py::gil_scoped_release release;
      r = guarded(stream, [&] { return engine_->dispatch_backward(*layout, rows, gw); });
    }
    // rows.cols: H, or 0 when only the weights' gradient travels (a pre-quantized dispatch).
    return backward_tuple(r, scalar_type(rows.dtype), {layout->num_tokens, rows.cols}, *layout);
  }

  // -> (grad_expert_y [R, H], grad_weights [T, K] or None)
  py::tuple combine_backward(const std::shared_ptr<DispatchLayout>& layout, const Tensor& grad_y,
                             const std::optional<Tensor>& slot_weights, const std::optional<Tensor>& expert_y,
                             int64_t stream) {
    Tensor gk, sk, yk;
    const RowsIn rows = rows_of(grad_y, "grad_y", gk);
    const float* sw = weights_of(slot_weights, sk);
    RowsIn ey;
    if (expert_y) ey = rows_of(*expert_y, "expert_y", yk);
    engine::BackwardResult r;
    {
      py::gil_scoped_release release;
      r = guarded(stream, [&] { return engine_->combine_backward(*layout, rows, sw, expert_y ? &ey : nullptr); });
    }
    return backward_tuple(r, scalar_type(rows.dtype), {layout->num_recv_rows, layout->hidden}, *layout);
  }

  // Gloo's worker threads take the GIL to drop the thread-local state their work captured:
  // the groups must go without it held, as torch's own ProcessGroup wrappers do, or the join
  // in ~ProcessGroupGloo deadlocks.
  ~PyEngine() { close(); }
  void close() {
    if (!engine_) return;
    if (PyGILState_Check()) {
      py::gil_scoped_release release;
      release_all();
    } else {
      release_all();
    }
  }

  // The lock is taken without the GIL: a running call may need gloo's threads, which take it.
  py::dict counters(const std::string& kind) {
    engine::Counters c;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(mutex_);
      if (engine_) c = engine_->counters(kind);
    }
    return counters_dict(c);
  }
  void set_combine_status_deferred(bool deferred) {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(mutex_);
    if (engine_) engine_->set_combine_status_deferred(deferred);
  }
  int64_t workspace_bytes() {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(mutex_);
    return engine_ ? engine_->workspace_bytes() : 0;
  }
  py::tuple last_failure() const { return py::make_tuple(last_failure_.stage, last_failure_.seq); }
  // Buffer.check(): the kept problems, agreed over every rank (collective, one host wait).
  int64_t agree_status(int64_t stream) {
    py::gil_scoped_release release;
    return guarded(stream, [&] { return engine_->agree_status(); });
  }

 private:
  template <typename Fn>
  auto guarded(int64_t stream, Fn&& fn) -> decltype(fn()) {
    // One call at a time (autograd's thread and the caller's may both call; close() waits);
    // the call's stream and device are set under the lock.
    std::lock_guard<std::mutex> lock(mutex_);
    MOE_HOST_ASSERT(engine_, "buffer: this moe_comm.Buffer was closed; create a new one");
    CallScope scope(*this, stream);
    try {
      return fn();
    } catch (const engine::CommFailure& f) {
      last_failure_ = f;
      throw;
    }
  }

  static py::tuple backward_tuple(const engine::BackwardResult& r, c10::ScalarType dtype, std::vector<int64_t> shape,
                                  const DispatchLayout& l) {
    py::object w = r.grad_weights.owner ? py::cast(as_tensor(r.grad_weights, torch::kFloat32, {l.num_tokens, l.topk}))
                                        : py::none();
    return py::make_tuple(as_tensor(r.grad_rows, dtype, std::move(shape)), w);
  }

  void release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    engine_.reset();
#if defined(MOE_COMM_WITH_NCCL)
    if (cuda_) cuda_->set_wait(nullptr);  // its communicators go now, not at the next GC
    comms_.clear();
#endif
  }

  std::shared_ptr<engine::Transport> make_transport(const py::handle& wire, const RollCall& roll) {
#if defined(MOE_COMM_WITH_NCCL)
    if (cuda_) {
      auto comm = wire.cast<std::shared_ptr<comm::EpCommunicator>>();
      // A host wait (the dispatch's header, an immediate combine status) is bounded by the
      // communicators' deadlines and checks every stage's for an abort or an asynchronous
      // error; CUDA failures name no missing rank yet (call number -1).
      comms_.push_back(comm);
      cuda_->set_wait([comms = comms_](cudaStream_t stream, const std::string& stage) {
        try {
          for (const auto& c : comms) c->wait(stream, stage);
        } catch (const std::exception& e) {
          throw engine::CommFailure(e.what(), stage, -1);
        }
      });
      return std::make_shared<comm::NcclTransport>(comm, cuda_);
    }
#endif
    return std::make_shared<GlooTransport>(wire.cast<c10::intrusive_ptr<c10d::Backend>>(), roll);
  }

  // Every call runs on the caller's stream (CUDA), with its device current and restored after.
  struct CallScope {
    CallScope(PyEngine& e, int64_t stream) {
#if defined(MOE_COMM_WITH_NCCL)
      if (e.cuda_) {
        guard.emplace(e.device_);
        e.cuda_->set_stream(as_stream(stream));
      }
#else
      (void)e;
      (void)stream;
#endif
    }
#if defined(MOE_COMM_WITH_CUDA)
    std::optional<DeviceGuard> guard;
#endif
  };

  std::unique_ptr<Engine> engine_;
  std::mutex mutex_;
  engine::CommFailure last_failure_;
  c10::Device device_;
#if defined(MOE_COMM_WITH_NCCL)
  std::shared_ptr<cuda::CudaDevice> cuda_;
  std::vector<std::shared_ptr<comm::EpCommunicator>> comms_;
#endif
};

}  // namespace

void register_engine_ops(py::module_& m) {
  // Registered after moe_comm::Error (module.cpp), so tried first for this subclass.
  py::register_exception<engine::CommFailure>(m, "NativeCommFailure", PyExc_RuntimeError);
  py::class_<DispatchLayout, std::shared_ptr<DispatchLayout>>(m, "DispatchLayout")
      .def_readonly("num_tokens", &DispatchLayout::num_tokens)
      .def_readonly("num_recv_rows", &DispatchLayout::num_recv_rows)
      .def_readonly("num_arrived", &DispatchLayout::num_last)
      .def_property_readonly("row_map",
                             [](const DispatchLayout& l) { return as_tensor(l.row_map, torch::kInt64, {l.num_last, l.topk}); })
      .def_property_readonly("stats", [](const DispatchLayout& l) {
        py::dict d;
        d["rows_sent_intra_node"] = l.stats.rows_intra;
        d["rows_sent_inter_node"] = l.stats.rows_inter;
        d["bytes_sent_intra_node"] = l.stats.bytes_intra;
        d["bytes_sent_inter_node"] = l.stats.bytes_inter;
        if (l.fixed) {  // counted on the device: a 0-d tensor there (reading it would wait)
          d["pairs_dropped"] = as_tensor(l.dropped, torch::kInt64, {});
        } else {
          d["pairs_dropped"] = l.stats.pairs_dropped;
        }
        return d;
      })
      .def_property_readonly("counters", [](const DispatchLayout& l) { return counters_dict(l.counters); });
  py::class_<PyEngine>(m, "Engine")
      .def(py::init<const py::list&, int64_t, int64_t, int64_t, const py::object&, const std::string&, double,
                    int64_t, double>(),
           py::arg("stages"), py::arg("rank"), py::arg("world_size"), py::arg("num_experts"), py::arg("store"),
           py::arg("uid"), py::arg("sign_after_s"), py::arg("device_index"), py::arg("timeout_s"))
      .def("dispatch", &PyEngine::dispatch)
      .def("combine", &PyEngine::combine)
      .def("dispatch_backward", &PyEngine::dispatch_backward)
      .def("combine_backward", &PyEngine::combine_backward)
      .def("counters", &PyEngine::counters)
      .def("set_combine_status_deferred", &PyEngine::set_combine_status_deferred)
      .def("agree_status", &PyEngine::agree_status)
      .def("close", &PyEngine::close)
      .def_property_readonly("workspace_bytes", &PyEngine::workspace_bytes)
      .def_property_readonly("last_failure", &PyEngine::last_failure);
}

}  // namespace bind
}  // namespace moe_comm
