// Unit tests of core/deadline_watch (what bounds the NCCL exchanges nobody waits for): fake work
// and a fake transport stand in for CUDA events and the NCCL communicator, so the deadline,
// error and abort-once logic runs on any machine. No framework: each CHECK names what failed.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "check.h"
#include "core/deadline_watch.h"

namespace {

using namespace moe_comm;
using Clock = std::chrono::steady_clock;

// Work whose state the test sets; it reports itself destroyed (no leak of watched work).
struct FakeWork : WatchedWork {
  std::atomic<int>& state;  // 0 running, 1 done, 2 failed
  std::atomic<int>& destroyed;
  FakeWork(std::atomic<int>& s, std::atomic<int>& d) : state(s), destroyed(d) {}
  ~FakeWork() override { ++destroyed; }
  WorkState poll(std::string* error) override {
    if (state == 1) return WorkState::kDone;
    if (state == 2) {
      *error = "CUDA: an illegal memory access was encountered";
      return WorkState::kFailed;
    }
    return WorkState::kRunning;
  }
};

struct FakeTransport {
  std::atomic<int> aborts{0};
  std::atomic<int> thread_starts{0};
  std::mutex error_mutex;
  std::string error;  // what health() reports

  WatchHooks hooks() {
    WatchHooks h;
    h.on_thread_start = [this] { ++thread_starts; };
    h.health = [this] {
      std::lock_guard<std::mutex> lock(error_mutex);
      return error;
    };
    h.abort = [this] { ++aborts; };
    return h;
  }
  void set_error(const std::string& e) {
    std::lock_guard<std::mutex> lock(error_mutex);
    error = e;
  }
};

// Polls `done` until it holds or `limit_s` passes. -> seconds waited.
template <typename F>
double wait_for(F done, double limit_s) {
  const auto start = Clock::now();
  while (!done() && std::chrono::duration<double>(Clock::now() - start).count() < limit_s) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return std::chrono::duration<double>(Clock::now() - start).count();
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

void test_work_done_in_time_is_never_aborted() {
  FakeTransport t;
  std::atomic<int> state{0}, destroyed{0};
  {
    DeadlineWatch watch(0.2, "rank 0 of 2", t.hooks());
    watch.watch(std::make_unique<FakeWork>(state, destroyed), "combine/flat");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    state = 1;
    wait_for([&] { return destroyed == 1; }, 2.0);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // past the deadline
    CHECK(watch.failure().empty());
    CHECK(!watch.aborted());
    CHECK(destroyed == 1);  // dropped once done
  }
  CHECK(t.aborts == 0);
  CHECK(t.thread_starts == 1);
}

void test_late_work_aborts_once_at_its_deadline() {
  FakeTransport t;
  std::atomic<int> state{0}, destroyed{0};
  DeadlineWatch watch(0.2, "rank 1 of 4", t.hooks());
  const auto start = Clock::now();
  watch.watch(std::make_unique<FakeWork>(state, destroyed), "dispatch-backward/intra_node");
  wait_for([&] { return watch.aborted(); }, 3.0);
  const double waited = std::chrono::duration<double>(Clock::now() - start).count();
  CHECK(watch.aborted());
  CHECK(waited >= 0.2 && waited < 1.5);  // not before the deadline, soon after it
  const std::string why = watch.failure();
  CHECK(contains(why, "rank 1 of 4 failed in stage 'dispatch-backward/intra_node': not done within 0.2 s"));
  CHECK(contains(why, "the communicator was aborted, create a new Buffer"));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(t.aborts == 1);
}

void test_deadline_is_per_work_and_the_oldest_late_one_is_named() {
  FakeTransport t;
  std::atomic<int> first{0}, second{0}, destroyed{0};
  DeadlineWatch watch(0.3, "rank 0 of 2", t.hooks());
  watch.watch(std::make_unique<FakeWork>(first, destroyed), "combine/flat");
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  watch.watch(std::make_unique<FakeWork>(second, destroyed), "combine-backward/flat");
  first = 1;  // done before its deadline; the second never finishes
  const double waited = wait_for([&] { return watch.aborted(); }, 3.0);
  CHECK(watch.aborted());
  CHECK(waited >= 0.25);  // the second's own deadline, not the first's
  CHECK(contains(watch.failure(), "stage 'combine-backward/flat': not done within"));
  CHECK(t.aborts == 1);
}

void test_failed_work_aborts_with_its_error() {
  FakeTransport t;
  std::atomic<int> state{2}, destroyed{0};
  DeadlineWatch watch(60.0, "rank 0 of 2", t.hooks());
  watch.watch(std::make_unique<FakeWork>(state, destroyed), "combine/flat");
  const double waited = wait_for([&] { return watch.aborted(); }, 3.0);
  CHECK(waited < 1.0);  // at once, not at the deadline
  CHECK(contains(watch.failure(), "failed in stage 'combine/flat': CUDA: an illegal memory access"));
  CHECK(t.aborts == 1);
}

void test_transport_error_aborts_running_work() {
  FakeTransport t;
  std::atomic<int> state{0}, destroyed{0};
  DeadlineWatch watch(60.0, "rank 3 of 8", t.hooks());
  watch.watch(std::make_unique<FakeWork>(state, destroyed), "dispatch/inter_node");
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  CHECK(!watch.aborted());
  t.set_error("remote process exited or there was a network error");
  const double waited = wait_for([&] { return watch.aborted(); }, 3.0);
  CHECK(waited < 1.0);
  CHECK(contains(watch.failure(), "rank 3 of 8 failed in stage 'dispatch/inter_node': remote process exited"));
  CHECK(t.aborts == 1);
}

void test_first_reason_wins_and_abort_happens_once() {
  FakeTransport t;
  std::atomic<int> state{0}, destroyed{0};
  DeadlineWatch watch(0.1, "rank 0 of 2", t.hooks());
  watch.abort("rank 0 of 2 failed in stage 'init': peers did not arrive within 0.1 s");
  watch.watch(std::make_unique<FakeWork>(state, destroyed), "combine/flat");
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // past that work's deadline
  watch.abort("a later reason");
  CHECK(watch.failure() == "rank 0 of 2 failed in stage 'init': peers did not arrive within 0.1 s");
  CHECK(t.aborts == 1);
  CHECK(watch.aborted());
}

void test_abort_waits_for_whoever_holds_the_transport() {
  FakeTransport t;
  DeadlineWatch watch(60.0, "rank 0 of 2", t.hooks());
  std::atomic<bool> aborted_while_held{false};
  std::thread user([&] {
    auto guard = watch.lock_comm();  // a call into the transport is under way
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    aborted_while_held = t.aborts > 0;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  watch.abort("stop");
  user.join();
  CHECK(!aborted_while_held);
  CHECK(t.aborts == 1);
}

void test_destroying_with_pending_work_neither_hangs_nor_aborts() {
  FakeTransport t;
  std::atomic<int> state{0}, destroyed{0};
  const auto start = Clock::now();
  {
    DeadlineWatch watch(60.0, "rank 0 of 2", t.hooks());
    for (int i = 0; i < 3; ++i) watch.watch(std::make_unique<FakeWork>(state, destroyed), "combine/flat");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  CHECK(std::chrono::duration<double>(Clock::now() - start).count() < 1.0);
  CHECK(destroyed == 3);
  CHECK(t.aborts == 0);
}

void test_many_done_works_drain() {
  FakeTransport t;
  std::atomic<int> state{1}, destroyed{0};
  DeadlineWatch watch(0.5, "rank 0 of 2", t.hooks());
  for (int i = 0; i < 1000; ++i) watch.watch(std::make_unique<FakeWork>(state, destroyed), "dispatch/flat");
  wait_for([&] { return destroyed == 1000; }, 3.0);
  CHECK(destroyed == 1000);
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  CHECK(!watch.aborted());
}

}  // namespace

void test_health_check_never_runs_beside_a_transport_call() {
  // C1: the health hook (ncclCommGetAsyncError) must not run while a caller holds the
  // transport, as all_to_all does around its NCCL calls.
  std::atomic<bool> held{false};
  std::atomic<int> calls{0}, overlaps{0};
  WatchHooks hooks;
  hooks.health = [&] {
    ++calls;
    if (held) ++overlaps;
    return std::string();
  };
  std::atomic<int> state{0}, destroyed{0};
  DeadlineWatch watch(10.0, "rank 0 of 2", hooks);
  watch.watch(std::make_unique<FakeWork>(state, destroyed), "combine/flat");
  wait_for([&] { return calls > 0; }, 2.0);
  for (int i = 0; i < 20; ++i) {
    auto guard = watch.lock_comm();
    held = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    held = false;
  }
  state = 1;
  CHECK(calls > 0);
  CHECK(overlaps == 0);
}

void test_drain_waits_for_pending_work_and_reports_timeouts() {
  FakeTransport t;
  std::atomic<int> state{0}, destroyed{0};
  DeadlineWatch watch(10.0, "rank 0 of 2", t.hooks());
  watch.watch(std::make_unique<FakeWork>(state, destroyed), "combine/flat");
  const auto start = Clock::now();
  CHECK(!watch.drain(0.05));  // still running: not drained, and no abort
  CHECK(std::chrono::duration<double>(Clock::now() - start).count() >= 0.05);
  CHECK(t.aborts == 0);
  std::thread finish([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    state = 1;
  });
  CHECK(watch.drain(2.0));
  finish.join();
  CHECK(destroyed == 1);
  watch.stop();
  watch.stop();  // idempotent
  CHECK(!watch.aborted());
  CHECK(t.aborts == 0);
}

void test_drain_stops_at_a_failure_and_aborted_is_final_after_stop() {
  FakeTransport t;
  std::atomic<int> state{0}, destroyed{0};
  DeadlineWatch watch(10.0, "rank 0 of 2", t.hooks());
  watch.watch(std::make_unique<FakeWork>(state, destroyed), "combine/flat");
  state = 2;  // the exchange failed: the watch aborts, drain must not wait out its timeout
  const auto start = Clock::now();
  CHECK(!watch.drain(5.0));
  CHECK(std::chrono::duration<double>(Clock::now() - start).count() < 2.0);
  watch.stop();
  CHECK(watch.aborted());
  CHECK(t.aborts == 1);
}

int main() {
  test_work_done_in_time_is_never_aborted();
  test_late_work_aborts_once_at_its_deadline();
  test_deadline_is_per_work_and_the_oldest_late_one_is_named();
  test_failed_work_aborts_with_its_error();
  test_transport_error_aborts_running_work();
  test_first_reason_wins_and_abort_happens_once();
  test_abort_waits_for_whoever_holds_the_transport();
  test_destroying_with_pending_work_neither_hangs_nor_aborts();
  test_many_done_works_drain();
  test_health_check_never_runs_beside_a_transport_call();
  test_drain_waits_for_pending_work_and_reports_timeouts();
  test_drain_stops_at_a_failure_and_aborted_is_final_after_stop();
  return moe_comm_test::report_failures("deadline_watch");
}
