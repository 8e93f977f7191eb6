// Helpers shared by the unit tests of engine/ops (ops_tests): running a check on every Highway
// target, bf16 comparisons, random inputs, the allocation counter, a median timer for the
// benchmarks (skipped by default: ops_tests --no-skip -tc='bench*').
#pragma once

#include <doctest/doctest.h>
#include <hwy/targets.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "engine/ops/elementwise.h"

// Heap allocations so far in this process (ops_test_support.cpp replaces the global operator new
// for the whole ops_tests executable): the kernels and Sampler::sample promise not to allocate.
uint64_t kiln_test_allocations();

namespace kiln::ops::test {

// Heap allocations of one steady-state call of `run`: a first call goes unmeasured, since the
// first dispatch of each kernel picks its target.
template <class F>
uint64_t allocations_of(F&& run) {
  run();
  const uint64_t before = kiln_test_allocations();
  run();
  return kiln_test_allocations() - before;
}

// Runs `body` once per Highway target that is both compiled in and supported by this CPU; the
// guard restores normal dispatch even when a REQUIRE inside throws.
template <class F>
void for_each_target(F&& body) {
  struct Restore {
    ~Restore() { hwy::SetSupportedTargetsForTest(0); }
  } restore;
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    const std::string target_name = hwy::TargetName(target);
    CAPTURE(target_name);
    REQUIRE(std::string(kernels_target_name()) == target_name);
    body();
  }
}

inline uint32_t bits(float f) {
  return std::bit_cast<uint32_t>(f);
}

inline bool same_bits(float a, float b) {
  return bits(a) == bits(b);
}

inline bool is_bf16(float f) {
  return (bits(f) & 0xFFFFu) == 0;
}

// Distance in bf16 steps between two bf16-representable values of the same sign.
inline int64_t bf16_steps(float a, float b) {
  const int64_t ia = int64_t(f32_to_bf16(a) & 0x7FFF) * (std::signbit(a) ? -1 : 1);
  const int64_t ib = int64_t(f32_to_bf16(b) & 0x7FFF) * (std::signbit(b) ? -1 : 1);
  return std::abs(ia - ib);
}

inline std::vector<float> random_floats(std::mt19937& rng, size_t n, float lo, float hi,
                                        bool bf16) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = bf16 ? round_to_bf16(dist(rng)) : dist(rng);
  return v;
}

inline std::vector<uint16_t> to_bf16_bits(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = f32_to_bf16(v[i]);
  return out;
}

inline constexpr int64_t kSizes[] = {0, 1, 3, 7, 8, 15, 16, 17, 31, 33, 64, 100, 257, 1000};

template <class F>
double median_us(F&& f, int reps, int inner) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < inner; ++i) f();
    const auto t1 = std::chrono::steady_clock::now();
    t.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / inner);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace kiln::ops::test
