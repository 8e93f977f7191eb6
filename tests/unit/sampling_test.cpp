// Sampler: MaxEngine's greedy / weighted / top-k / nucleus / composite semantics (spec §6) with a
// seeded generator.
#include "engine/sampling.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

#include "common/error.h"

// Global allocation counter, defined in kernels_test.cpp (same ops_tests executable).
uint64_t kiln_test_allocations();

namespace kiln {
namespace {

std::vector<int64_t> histogram(Sampler& s, const std::vector<float>& logits, int draws) {
  std::vector<int64_t> h(logits.size(), 0);
  for (int i = 0; i < draws; ++i) {
    const int32_t id = s.sample(logits.data());
    REQUIRE(id >= 0);
    REQUIRE(id < int32_t(logits.size()));
    ++h[size_t(id)];
  }
  return h;
}

std::vector<double> softmax(const std::vector<float>& logits, double t) {
  double m = -1e300;
  for (float l : logits) m = std::max(m, double(l));
  std::vector<double> p(logits.size());
  double z = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) z += p[i] = std::exp((logits[i] - m) / t);
  for (auto& x : p) x /= z;
  return p;
}

// Pearson chi-square of observed counts against expected probabilities (cells with p = 0 must
// be empty).
double chi_square(const std::vector<int64_t>& obs, const std::vector<double>& p, int draws) {
  double chi = 0.0;
  for (size_t i = 0; i < obs.size(); ++i) {
    if (p[i] == 0.0) {
      CHECK(obs[i] == 0);
      continue;
    }
    const double e = p[i] * draws;
    chi += (double(obs[i]) - e) * (double(obs[i]) - e) / e;
  }
  return chi;
}

TEST_CASE("Rng is SplitMix64-seeded xoshiro256**") {
  // Reference values from an independent implementation of both algorithms.
  Rng a(0);
  CHECK(a.next() == 0x99ec5f36cb75f2b4ull);
  CHECK(a.next() == 0xbf6e1f784956452aull);
  CHECK(a.next() == 0x1a5f849d4933e6e0ull);
  Rng b(42);
  CHECK(b.next() == 0x15780b2e0c2ec716ull);
  CHECK(b.next() == 0x6104d9866d113a7eull);
  Rng c(123);
  double lo = 1.0, hi = 0.0, sum = 0.0;
  for (int i = 0; i < 100000; ++i) {
    const double u = c.uniform();
    REQUIRE(u >= 0.0);
    REQUIRE(u < 1.0);
    lo = std::min(lo, u);
    hi = std::max(hi, u);
    sum += u;
  }
  CHECK(lo < 1e-3);
  CHECK(hi > 1.0 - 1e-3);
  CHECK(sum / 100000 == doctest::Approx(0.5).epsilon(0.01));
}

TEST_CASE("greedy is argmax with the lowest id on ties") {
  const std::vector<float> logits = {1.0f, 3.0f, -2.0f, 3.0f, 0.5f};
  Sampler s(5, SamplingParams{});  // temperature 0
  for (int i = 0; i < 10; ++i) CHECK(s.sample(logits.data()) == 1);
  // Greedy ignores top-k / top-p.
  Sampler s2(5, SamplingParams{0.0f, 3, 0.5f, 9});
  CHECK(s2.sample(logits.data()) == 1);
  const std::vector<float> neg = {-5.0f, -1.0f, -1.0f};
  Sampler s3(3, SamplingParams{});
  CHECK(s3.sample(neg.data()) == 1);
}

TEST_CASE("same seed, same tokens; different seed, different tokens") {
  std::vector<float> logits(1000);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = float(std::sin(double(i))) * 2.0f;
  for (const SamplingParams& p :
       {SamplingParams{1.0f, 0, 1.0f, 7}, SamplingParams{0.8f, 50, 1.0f, 7},
        SamplingParams{1.2f, 0, 0.9f, 7}, SamplingParams{0.7f, 40, 0.95f, 7}}) {
    Sampler a(1000, p), b(1000, p);
    SamplingParams q = p;
    q.seed = 8;
    Sampler c(1000, q);
    int differ = 0;
    for (int i = 0; i < 200; ++i) {
      const int32_t x = a.sample(logits.data());
      CHECK(x == b.sample(logits.data()));
      differ += x != c.sample(logits.data());
    }
    CHECK(differ > 20);
  }
}

TEST_CASE("top_k = 1 and a tiny top_p are greedy") {
  std::vector<float> logits(300);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = float(std::cos(double(i) * 0.37)) * 3.0f;
  Sampler greedy(300, SamplingParams{});
  const int32_t best = greedy.sample(logits.data());
  for (const SamplingParams& p :
       {SamplingParams{1.0f, 1, 1.0f, 1}, SamplingParams{5.0f, 1, 1.0f, 2},
        SamplingParams{1.0f, 0, 1e-6f, 3}, SamplingParams{50.0f, 0, 1e-6f, 4},
        SamplingParams{2.0f, 20, 1e-6f, 5}}) {
    Sampler s(300, p);
    for (int i = 0; i < 200; ++i) CHECK(s.sample(logits.data()) == best);
  }
}

TEST_CASE("T = 1 sampling follows softmax (chi-square)") {
  const std::vector<float> logits = {0.0f, 1.0f, -1.0f, 2.0f, 0.5f, -3.0f};
  const int draws = 200000;
  Sampler s(6, SamplingParams{1.0f, 0, 1.0f, 2024});
  const auto h = histogram(s, logits, draws);
  // 5 degrees of freedom: P(χ² > 20.5) ≈ 0.001. The seed is fixed, so this cannot flake.
  CHECK(chi_square(h, softmax(logits, 1.0), draws) < 20.5);
  // Another temperature.
  Sampler t(6, SamplingParams{0.5f, 0, 1.0f, 77});
  CHECK(chi_square(histogram(t, logits, draws), softmax(logits, 0.5), draws) < 20.5);
}

TEST_CASE("top-k keeps the k largest, renormalised and tempered") {
  const std::vector<float> logits = {0.0f, 1.0f, -1.0f, 2.0f, 0.5f, 2.0f};
  const int draws = 100000;
  Sampler s(6, SamplingParams{2.0f, 3, 1.0f, 5});
  const auto h = histogram(s, logits, draws);
  // Kept: ids 3, 5 (logit 2) and 1 (logit 1), each ∝ exp(l / 2).
  std::vector<double> p(6, 0.0);
  const double z = 2.0 * std::exp(1.0) + std::exp(0.5);
  p[3] = p[5] = std::exp(1.0) / z;
  p[1] = std::exp(0.5) / z;
  CHECK(chi_square(h, p, draws) < 13.8);  // 2 dof, P ≈ 0.001
  // top_k ≥ vocab keeps everything.
  Sampler all(6, SamplingParams{1.0f, 100, 1.0f, 6});
  CHECK(chi_square(histogram(all, logits, draws), softmax(logits, 1.0), draws) < 20.5);
}

TEST_CASE("nucleus: untempered cutoff, ties at the cutoff kept") {
  // Untempered probabilities ∝ e^l: cumulative over the sorted logits decides the set.
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f),
                                     std::log(0.05f)};
  const int draws = 100000;
  // p = 0.7: cum = [0.5, 0.8, …] → cutoff index 1 → tokens 0 and 1, ∝ 0.5 : 0.3 at T = 1.
  Sampler s(4, SamplingParams{1.0f, 0, 0.7f, 11});
  std::vector<double> p = {0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0};
  CHECK(chi_square(histogram(s, logits, draws), p, draws) < 10.8);  // 1 dof
  // The set is chosen from the *untempered* distribution: at T = 100 the tempered one is nearly
  // flat (which would need all four tokens to reach 0.7), but only tokens 0 and 1 are kept,
  // drawn ∝ exp(l / 100).
  Sampler hot(4, SamplingParams{100.0f, 0, 0.7f, 12});
  const auto hh = histogram(hot, logits, draws);
  CHECK(hh[2] == 0);
  CHECK(hh[3] == 0);
  const double a = std::pow(0.5, 0.01), b = std::pow(0.3, 0.01);
  CHECK(chi_square(hh, {a / (a + b), b / (a + b), 0.0, 0.0}, draws) < 10.8);
  // Ties at the cutoff logit are all kept (nucleus); composite keeps only up to the cutoff index.
  const std::vector<float> tied = {2.0f, 1.0f, 1.0f, 0.0f};
  // Untempered p = [0.534, 0.197, 0.197, 0.072], cum = [0.534, 0.731, …]: top_p = 0.6 → cutoff
  // index 1, whose logit (1) is shared by ids 1 and 2.
  Sampler nucleus(4, SamplingParams{1.0f, 0, 0.6f, 13});
  const auto hn = histogram(nucleus, tied, draws);
  CHECK(hn[1] > 0);
  CHECK(hn[2] > 0);
  CHECK(hn[3] == 0);
  Sampler composite(4, SamplingParams{1.0f, 4, 0.6f, 14});
  const auto hc = histogram(composite, tied, draws);
  CHECK(hc[1] > 0);
  CHECK(hc[2] == 0);  // sorted index 2 is past the cutoff index 1
  CHECK(hc[3] == 0);
}

TEST_CASE("composite: top-k, then top-p over the renormalised top-k") {
  // Probabilities ∝ [8, 4, 2, 1, 1]/16. top_k = 3 → [8, 4, 2]/14 = [.571, .286, .143];
  // top_p = 0.8: cum = [.571, .857] → cutoff 1 → tokens 0, 1 (over the full vocabulary the cum
  // would be [.5, .75, .875] and keep three).
  const std::vector<float> logits = {std::log(8.0f), std::log(4.0f), std::log(2.0f), 0.0f, 0.0f};
  const int draws = 100000;
  Sampler s(5, SamplingParams{1.0f, 3, 0.8f, 15});
  const auto h = histogram(s, logits, draws);
  CHECK(h[2] == 0);
  CHECK(chi_square(h, {8.0 / 12.0, 4.0 / 12.0, 0.0, 0.0, 0.0}, draws) < 10.8);
  Sampler nucleus(5, SamplingParams{1.0f, 0, 0.8f, 16});
  CHECK(histogram(nucleus, logits, draws)[2] > 0);
}

TEST_CASE("nucleus on a large vocabulary keeps exactly MaxText's set") {
  // 5000 tokens: a tail of low logits and a head of 16 high ones in equal pairs, so the cutoff
  // falls inside the head (found by the quickselect, not the small-range sort) and on a tie.
  const int32_t V = 5000;
  std::vector<float> logits(V);
  for (int32_t i = 0; i < V; ++i) logits[size_t(i)] = float(std::sin(double(i) * 1.7)) * 3.0f;
  for (int32_t j = 0; j < 16; ++j) logits[size_t(j * 311 + 7)] = 10.0f - 0.25f * float(j / 2);
  for (float top_p : {0.3f, 0.55f, 0.8f, 0.9f}) {
    CAPTURE(top_p);
    // Brute force: sort descending (ties by id), cumulative softmax, cutoff = #(cum < p).
    std::vector<int32_t> order(V);
    for (int32_t i = 0; i < V; ++i) order[size_t(i)] = i;
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return logits[size_t(a)] > logits[size_t(b)] ||
             (logits[size_t(a)] == logits[size_t(b)] && a < b);
    });
    const auto p = softmax(logits, 1.0);
    double cum = 0.0;
    size_t cutoff = 0;
    for (; cutoff < order.size(); ++cutoff) {
      cum += p[size_t(order[cutoff])];
      if (!(cum < top_p)) break;
    }
    const float threshold = logits[size_t(order[cutoff])];
    double kept = 0.0;
    for (int32_t i = 0; i < V; ++i) kept += logits[size_t(i)] >= threshold ? p[size_t(i)] : 0.0;
    const int draws = 40000;
    Sampler s(V, SamplingParams{1.0f, 0, top_p, 21});
    const auto h = histogram(s, logits, draws);
    for (int32_t i = 0; i < V; ++i) {
      CAPTURE(i);
      if (logits[size_t(i)] < threshold) {
        CHECK(h[size_t(i)] == 0);
      } else if (p[size_t(i)] / kept * draws >= 20.0) {
        CHECK(h[size_t(i)] > 0);  // kept and likely enough to show up
      }
    }
    if (top_p < 0.85f) CHECK(h[size_t(order[cutoff])] > 0);  // the boundary token is kept
  }
}

TEST_CASE("invalid parameters throw") {
  CHECK_THROWS_AS(Sampler(10, SamplingParams{-0.5f, 0, 1.0f, 0}), Error);
  CHECK_THROWS_AS(Sampler(10, SamplingParams{std::numeric_limits<float>::quiet_NaN(), 0, 1.0f, 0}),
                  Error);
  CHECK_THROWS_AS(Sampler(10, SamplingParams{std::numeric_limits<float>::infinity(), 0, 1.0f, 0}),
                  Error);
  CHECK_THROWS_AS(Sampler(10, SamplingParams{1.0f, -1, 1.0f, 0}), Error);
  CHECK_THROWS_AS(Sampler(10, SamplingParams{1.0f, 0, 0.0f, 0}), Error);
  CHECK_THROWS_AS(Sampler(10, SamplingParams{1.0f, 0, 1.5f, 0}), Error);
  CHECK_THROWS_AS(Sampler(10, SamplingParams{1.0f, 0, -0.1f, 0}), Error);
  CHECK_THROWS_AS(Sampler(0, SamplingParams{}), Error);
  CHECK_NOTHROW(Sampler(10, SamplingParams{0.0f, 5, 1.0f, 0}));
}

TEST_CASE("log_prob is the log-softmax of the raw logits") {
  const std::vector<float> logits = {0.0f, 1.0f, -1.0f, 2.0f};
  const auto p = softmax(logits, 1.0);
  for (int32_t i = 0; i < 4; ++i) {
    CHECK(Sampler::log_prob(logits.data(), 4, i) == doctest::Approx(std::log(p[size_t(i)])));
  }
  // Large logits: no overflow.
  const std::vector<float> big = {1000.0f, 0.0f};
  CHECK(Sampler::log_prob(big.data(), 2, 0) == doctest::Approx(0.0));
  CHECK(Sampler::log_prob(big.data(), 2, 1) == doctest::Approx(-1000.0));
  CHECK_THROWS_AS(Sampler::log_prob(logits.data(), 4, 4), Error);
  CHECK_THROWS_AS(Sampler::log_prob(logits.data(), 4, -1), Error);
}

TEST_CASE("sample does not allocate") {
  std::vector<float> logits(32000);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = float(std::sin(double(i) * 0.01)) * 4.0f;
  for (const SamplingParams& p :
       {SamplingParams{}, SamplingParams{1.0f, 0, 1.0f, 1}, SamplingParams{0.7f, 40, 1.0f, 2},
        SamplingParams{1.0f, 0, 0.9f, 3}, SamplingParams{0.9f, 50, 0.9f, 4},
        SamplingParams{1.0f, 0, 0.999f, 5}}) {
    Sampler s(int64_t(logits.size()), p);
    s.sample(logits.data());
    const uint64_t before = kiln_test_allocations();
    for (int i = 0; i < 3; ++i) s.sample(logits.data());
    CHECK(kiln_test_allocations() == before);
  }
}

TEST_CASE("bench: sampling" * doctest::skip()) {
  std::vector<float> logits(32000);
  for (size_t i = 0; i < logits.size(); ++i) {
    logits[i] = float(std::sin(double(i) * 0.37) * 4.0 + std::cos(double(i) * 0.011) * 3.0);
  }
  const struct {
    const char* name;
    SamplingParams p;
  } cases[] = {{"greedy", SamplingParams{}},
               {"T=0.8", SamplingParams{0.8f, 0, 1.0f, 1}},
               {"T=1 top_k=40", SamplingParams{1.0f, 40, 1.0f, 1}},
               {"T=1 top_p=0.9", SamplingParams{1.0f, 0, 0.9f, 1}},
               {"T=0.7 top_p=0.9", SamplingParams{0.7f, 0, 0.9f, 1}},
               {"T=0.7 k=50 p=0.9", SamplingParams{0.7f, 50, 0.9f, 1}}};
  for (const auto& c : cases) {
    Sampler s(32000, c.p);
    std::vector<double> t;
    for (int r = 0; r < 21; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < 20; ++i) s.sample(logits.data());
      const auto t1 = std::chrono::steady_clock::now();
      t.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / 20);
    }
    std::sort(t.begin(), t.end());
    std::printf("sample V=32000 %-18s min %8.1f us  median %8.1f us\n", c.name, t[0], t[10]);
  }
}

}  // namespace
}  // namespace kiln
