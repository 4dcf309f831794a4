// The C++ tests' one assertion: CHECK(cond) reports the file, line and condition that failed
// and counts it; each test's main returns report_failures(name).
#pragma once

#include <cstdio>

namespace moe_comm_test {

inline int failures = 0;

inline int report_failures(const char* suite) {
  if (failures) {
    std::fprintf(stderr, "%s: %d check(s) failed\n", suite, failures);
    return 1;
  }
  std::printf("%s: all checks passed\n", suite);
  return 0;
}

}  // namespace moe_comm_test

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++moe_comm_test::failures;                                                    \
    }                                                                               \
  } while (0)
