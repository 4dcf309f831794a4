// Unit tests of the shared-memory wire (cpu/shm_transport): two ranks as two threads of one
// process exchange rows and statuses, and a peer caught between creating its control block
// and reserving its pages is waited for, never mapped past its end (that was a SIGBUS).
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "cpu/shm_transport.h"

namespace {

using moe_comm::cpu::ShmTransport;

std::string test_token(const char* what) { return std::string(what) + std::to_string(getpid()); }

// Rank r sends (r + 1) * 10 + p to peer p, as p + 1 bytes, with status 100 * r + p.
void exchange_as(ShmTransport& wire, int64_t r, std::vector<uint8_t>& got, std::vector<int64_t>& status) {
  std::vector<int64_t> send_bytes{1, 2}, recv_bytes{r + 1, r + 1};
  std::vector<uint8_t> send;
  for (int64_t p = 0; p < 2; ++p) send.insert(send.end(), size_t(p + 1), uint8_t((r + 1) * 10 + p));
  const int64_t status_out[2] = {100 * r, 100 * r + 1};
  got.assign(size_t(2 * (r + 1)), 0);
  status.assign(2, -1);
  wire.all_to_all(send.data(), send_bytes, got.data(), recv_bytes, status_out, status.data(), "test", 1);
}

void test_two_ranks_exchange() {
  const std::string token = test_token("x");
  std::vector<uint8_t> got[2];
  std::vector<int64_t> status[2];
  auto rank = [&](int64_t r) {
    ShmTransport wire(token, "s", {0, 1}, r, 5.0, 5.0, nullptr);
    for (int round = 0; round < 3; ++round) exchange_as(wire, r, got[r], status[r]);
  };
  std::thread other(rank, 1);
  rank(0);
  other.join();
  for (int64_t r = 0; r < 2; ++r) {
    for (int64_t p = 0; p < 2; ++p) {
      for (int64_t i = 0; i <= r; ++i) CHECK(got[r][size_t(p * (r + 1) + i)] == uint8_t((p + 1) * 10 + r));
      CHECK(status[r][size_t(p)] == 100 * p + r);
    }
  }
}

void test_peer_not_yet_reserved_is_waited_for() {
  const std::string token = test_token("r");
  // Rank 0 "created" its control block but has not sized it yet: 0 bytes long.
  const std::string peer_control = "/moe_comm_" + token + "_s_0_c";
  const int fd = shm_open(peer_control.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  CHECK(fd >= 0);
  bool failed_cleanly = false;
  try {
    ShmTransport wire(token, "s", {0, 1}, 1, 0.3, 10.0, nullptr);
    std::vector<uint8_t> got;
    std::vector<int64_t> status;
    exchange_as(wire, 1, got, status);
  } catch (const moe_comm::engine::CommFailure& e) {
    failed_cleanly = std::string(e.what()).find("never set up") != std::string::npos;
  }
  CHECK(failed_cleanly);
  close(fd);
  shm_unlink(peer_control.c_str());
}

}  // namespace

int main() {
  test_two_ranks_exchange();
  test_peer_not_yet_reserved_is_waited_for();
  return moe_comm_test::report_failures("shm_transport");
}
