#include "shm_transport.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <sstream>

namespace moe_comm {
namespace cpu {
namespace {

constexpr int64_t kMaxPeers = 1024;
constexpr uint32_t kMagic = 0x6d6f6563;             // "moec": the owner finished setting up
constexpr int64_t kFirstDataBytes = 1 << 16;
constexpr int kSpins = 32;                          // yields before sleeping on the futex
constexpr int64_t kSleepSliceMicros = 2000;         // re-check deadline and peer liveness

using Clock = std::chrono::steady_clock;

uint64_t pid_namespace() {
  struct stat st;
  return stat("/proc/self/ns/pid", &st) == 0 ? uint64_t(st.st_ino) : 0;
}

void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, int64_t micros) {
  timespec ts{static_cast<time_t>(micros / 1000000), static_cast<long>((micros % 1000000) * 1000)};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

void futex_wake(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

bool reached(uint32_t value, uint32_t target) { return int32_t(value - target) >= 0; }

[[noreturn]] void fail(const std::string& stage, int64_t seq, const std::string& why) {
  throw engine::CommFailure("moe_comm shared-memory transport: " + why, stage, seq);
}

// Maps `bytes` of the shm object `name`: created (replacing a stale one) or opened.
void* map_segment(const std::string& name, int64_t bytes, bool create) {
  int fd = -1;
  if (create) {
    shm_unlink(name.c_str());
    fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) return nullptr;
    // Reserve the pages now: a full /dev/shm is an error here, not a SIGBUS at the first write.
    if (posix_fallocate(fd, 0, bytes) != 0) {
      close(fd);
      shm_unlink(name.c_str());
      throw Error("moe_comm: cannot reserve " + std::to_string(bytes) + " bytes of shared memory for " + name +
                  " (is /dev/shm full?); Buffer(cpu_transport=\"gloo\") avoids shared memory");
    }
  } else {
    fd = shm_open(name.c_str(), O_RDWR, 0600);
    if (fd < 0) return nullptr;
    // The owner may have created the object and not yet reserved its pages: touching a
    // mapping past the end would be a SIGBUS, so an object still short counts as not there yet.
    struct stat st;
    if (fstat(fd, &st) != 0 || int64_t(st.st_size) < bytes) {
      close(fd);
      return nullptr;
    }
  }
  void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  return base == MAP_FAILED ? nullptr : base;
}

}  // namespace

struct ShmTransport::Control {
  std::atomic<uint32_t> posted;      // the last exchange whose rows are in the data area
  std::atomic<uint32_t> magic;
  std::atomic<uint64_t> generation;  // of the data area (it is replaced to grow)
  std::atomic<int64_t> data_bytes;
  int64_t pid;
  uint64_t pid_namespace;
  struct Entry {
    int64_t offset, bytes, status;
  } entries[kMaxPeers];              // what the owner sends to peer p in the posted exchange
  std::atomic<uint32_t> consumed[kMaxPeers];  // written by peer p: the last exchange it read
};

ShmTransport::ShmTransport(std::string token, std::string stage, std::vector<int64_t> peers, int64_t me,
                           double timeout_s, double sign_after_s,
                           std::function<void(const std::string&, int64_t)> on_slow)
    : token_(std::move(token)), stage_(std::move(stage)), peers_(std::move(peers)), me_(me), timeout_s_(timeout_s),
      sign_after_s_(sign_after_s), on_slow_(std::move(on_slow)), controls_(peers_.size()), data_(peers_.size()) {
  MOE_HOST_ASSERT(int64_t(peers_.size()) <= kMaxPeers, "at most " << kMaxPeers << " ranks share memory");
  Mapping& own = controls_[me_];
  own.bytes = sizeof(Control);
  own.base = map_segment(name(peers_[me_], "c"), own.bytes, true);
  MOE_HOST_ASSERT(own.base, "cannot create shared memory " << name(peers_[me_], "c") << ": " << std::strerror(errno));
  std::memset(own.base, 0, sizeof(Control));
  Control* c = static_cast<Control*>(own.base);
  c->pid = getpid();
  c->pid_namespace = pid_namespace();
  grow(kFirstDataBytes);
  c->magic.store(kMagic, std::memory_order_release);
}

ShmTransport::~ShmTransport() {
  for (size_t p = 0; p < peers_.size(); ++p) {
    if (data_[p].base) munmap(data_[p].base, data_[p].bytes);
    if (controls_[p].base) munmap(controls_[p].base, controls_[p].bytes);
  }
  release_names();
}

void ShmTransport::release_names() {
  if (control_named_) shm_unlink(name(peers_[me_], "c").c_str());
  if (data_named_) shm_unlink(name(peers_[me_], "d" + std::to_string(data_[me_].generation)).c_str());
  control_named_ = data_named_ = false;
}

std::string ShmTransport::name(int64_t rank, const std::string& part) const {
  return "/moe_comm_" + token_ + "_" + stage_ + "_" + std::to_string(rank) + "_" + part;
}

void ShmTransport::grow(int64_t bytes) {
  Mapping& own = data_[me_];
  Control* c = static_cast<Control*>(controls_[me_].base);
  const uint64_t generation = own.generation + 1;
  const int64_t size = bytes + bytes / 4;
  void* base = map_segment(name(peers_[me_], "d" + std::to_string(generation)), size, true);
  MOE_HOST_ASSERT(base, "cannot create shared memory for stage " << stage_ << ": " << std::strerror(errno));
  if (own.base) {
    munmap(own.base, own.bytes);
    if (data_named_) shm_unlink(name(peers_[me_], "d" + std::to_string(own.generation)).c_str());
  }
  own = Mapping{base, size, generation};
  data_named_ = true;
  c->data_bytes.store(size, std::memory_order_relaxed);
  c->generation.store(generation, std::memory_order_release);
}

ShmTransport::Control* ShmTransport::control(int64_t p, const std::string& stage, int64_t seq) {
  Mapping& m = controls_[p];
  if (!m.base) {  // peers make theirs as they construct their Buffers: wait for it, bounded
    const auto start = Clock::now();
    while (true) {
      m.base = map_segment(name(peers_[p], "c"), sizeof(Control), false);
      if (m.base && static_cast<Control*>(m.base)->magic.load(std::memory_order_acquire) == kMagic) break;
      if (m.base) {
        munmap(m.base, sizeof(Control));
        m.base = nullptr;
      }
      if (std::chrono::duration<double>(Clock::now() - start).count() > timeout_s_) {
        fail(stage, seq, "rank " + std::to_string(peers_[p]) + " never set up its shared memory");
      }
      usleep(1000);
    }
    m.bytes = sizeof(Control);
  }
  return static_cast<Control*>(m.base);
}

const uint8_t* ShmTransport::data_of(int64_t p) {
  Control* c = static_cast<Control*>(controls_[p].base);
  const uint64_t generation = c->generation.load(std::memory_order_acquire);
  Mapping& m = data_[p];
  if (m.generation != generation) {
    if (m.base) munmap(m.base, m.bytes);
    const int64_t bytes = c->data_bytes.load(std::memory_order_relaxed);
    m.base = map_segment(name(peers_[p], "d" + std::to_string(generation)), bytes, false);
    MOE_HOST_ASSERT(m.base, "cannot map rank " << peers_[p] << "'s shared memory: " << std::strerror(errno));
    m.bytes = bytes;
    m.generation = generation;
  }
  return static_cast<const uint8_t*>(m.base);
}

void ShmTransport::wait_for(std::atomic<uint32_t>* word, const std::function<bool()>& done, int64_t peer,
                            const std::string& stage, int64_t seq, const char* what) {
  const auto start = Clock::now();
  bool signed_roll = false;
  for (int spin = 0; !done(); ++spin) {
    if (spin < kSpins) {
      sched_yield();
      continue;
    }
    const uint32_t seen = word->load(std::memory_order_acquire);
    if (done()) return;
    futex_wait(word, seen, kSleepSliceMicros);
    // What it waited for first: a peer that posted its rows (or read ours) and then exited
    // is not a failure.
    if (done()) return;
    const double waited = std::chrono::duration<double>(Clock::now() - start).count();
    if (!signed_roll && waited > sign_after_s_ && on_slow_) {
      on_slow_(stage, seq);  // slow: sign as arrived, so that a stuck but present rank is not named
      signed_roll = true;
    }
    const Control* c = static_cast<const Control*>(controls_[peer].base);
    if (c->pid_namespace == pid_namespace() && kill(pid_t(c->pid), 0) != 0 && errno == ESRCH) {
      fail(stage, seq, "rank " + std::to_string(peers_[peer]) + " (pid " + std::to_string(c->pid) +
                           ") exited while this rank waited for " + what);  // what: a noun phrase
    }
    if (waited > timeout_s_) {
      std::ostringstream why;
      why << "waited " << timeout_s_ << " s for rank " << peers_[peer] << ": " << what << " never came";
      fail(stage, seq, why.str());
    }
  }
}

void ShmTransport::all_to_all(const uint8_t* send, const std::vector<int64_t>& send_bytes, uint8_t* recv,
                              const std::vector<int64_t>& recv_bytes, const int64_t* status_out, int64_t* status_in,
                              const std::string& stage, int64_t seq) {
  const int64_t size = int64_t(peers_.size());
  MOE_HOST_ASSERT(int64_t(send_bytes.size()) == size && int64_t(recv_bytes.size()) == size,
                  "one size per peer (" << size << ")");
  const uint32_t n = ++sequence_;
  Control* mine = static_cast<Control*>(controls_[me_].base);
  // Every peer has read what this rank posted last time: its data area may be rewritten.
  for (int64_t p = 0; p < size; ++p) {
    if (p == me_) continue;
    control(p, stage, seq);
    wait_for(&mine->consumed[p], [&] { return reached(mine->consumed[p].load(std::memory_order_acquire), n - 1); }, p,
             stage, seq, "its read of the previous exchange");
  }
  if (n > 1 && (control_named_ || data_named_)) release_names();  // all read (so mapped) exchange n - 1
  int64_t total = 0;
  for (int64_t b : send_bytes) total += b;
  if (total > data_[me_].bytes) grow(total);
  uint8_t* area = static_cast<uint8_t*>(data_[me_].base);
  int64_t offset = 0;
  for (int64_t p = 0; p < size; ++p) {
    if (send_bytes[p]) std::memcpy(area + offset, send + offset, send_bytes[p]);
    mine->entries[p] = {offset, send_bytes[p], status_out ? status_out[p] : 0};
    offset += send_bytes[p];
  }
  mine->posted.store(n, std::memory_order_release);
  futex_wake(&mine->posted);
  int64_t at = 0;
  for (int64_t p = 0; p < size; ++p) {
    Control* c = control(p, stage, seq);
    wait_for(&c->posted, [&] { return reached(c->posted.load(std::memory_order_acquire), n); }, p, stage, seq,
             "its rows");
    const auto& entry = c->entries[me_];
    if (entry.bytes != recv_bytes[p]) {
      fail(stage, seq, "rank " + std::to_string(peers_[p]) + " sent " + std::to_string(entry.bytes) +
                           " bytes where this rank expected " + std::to_string(recv_bytes[p]));
    }
    // Mapped even for 0 bytes: once every peer has acknowledged, the area's name goes.
    const uint8_t* area_of_p = data_of(p);
    if (entry.bytes) std::memcpy(recv + at, area_of_p + entry.offset, entry.bytes);
    if (status_in) status_in[p] = entry.status;
    at += recv_bytes[p];
    if (p != me_) {
      c->consumed[me_].store(n, std::memory_order_release);
      futex_wake(&c->consumed[me_]);
    }
  }
}

}  // namespace cpu
}  // namespace moe_comm
