// Sampler: MaxEngine's greedy / weighted / top-k / nucleus / composite semantics (docs/maxtext.md
// §6) with a seeded generator.
#include "engine/sampling.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "common/error.h"
#include "tests/unit/ops_test_support.h"

namespace kiln {
namespace {

using Algo = SamplingAlgorithm;

SamplingParams params(Algo a, float temperature, int32_t top_k, float top_p, uint64_t seed) {
  SamplingParams p;
  p.algorithm = a;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.seed = seed;
  return p;
}
SamplingParams greedy() {
  return params(Algo::Greedy, 1.0f, 0, 1.0f, 0);
}
SamplingParams weighted(float t, uint64_t seed) {
  return params(Algo::Weighted, t, 0, 1.0f, seed);
}
SamplingParams topk(int32_t k, float t, uint64_t seed) {
  return params(Algo::TopK, t, k, 1.0f, seed);
}
SamplingParams nucleus(float top_p, float t, uint64_t seed) {
  return params(Algo::Nucleus, t, 0, top_p, seed);
}
SamplingParams composite(int32_t k, float top_p, float t, uint64_t seed) {
  return params(Algo::Composite, t, k, top_p, seed);
}

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

std::vector<int32_t> draws_of(const SamplingParams& p, const std::vector<float>& logits, int n) {
  Sampler s(int64_t(logits.size()), p);
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) out.push_back(s.sample(logits.data()));
  return out;
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

// Pearson chi-square of observed counts against expected probabilities; infinite when a cell
// with p = 0 was drawn.
double chi_square(const std::vector<int64_t>& obs, const std::vector<double>& p, int draws) {
  double chi = 0.0;
  for (size_t i = 0; i < obs.size(); ++i) {
    if (p[i] == 0.0) {
      if (obs[i] != 0) return std::numeric_limits<double>::infinity();
      continue;
    }
    const double e = p[i] * draws;
    chi += (double(obs[i]) - e) * (double(obs[i]) - e) / e;
  }
  return chi;
}

// The kiln::Error message of constructing a Sampler ("" when it does not throw).
std::string construct_error(int64_t vocab, const SamplingParams& p) {
  try {
    Sampler s(vocab, p);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
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

TEST_CASE("algorithm names round-trip through parse_sampling_algorithm") {
  const struct {
    Algo a;
    const char* name;
  } all[] = {{Algo::Greedy, "greedy"},
             {Algo::Weighted, "weighted"},
             {Algo::TopK, "topk"},
             {Algo::Nucleus, "nucleus"},
             {Algo::Composite, "composite"}};
  for (const auto& c : all) {
    CHECK(std::string(sampling_algorithm_name(c.a)) == c.name);
    CHECK(parse_sampling_algorithm(c.name) == c.a);
    CHECK(parse_sampling_algorithm(sampling_algorithm_name(c.a)) == c.a);
  }
  for (const char* bad : {"", "Greedy", "top_k", "top-k", "beam", "nucleus "}) {
    CAPTURE(bad);
    std::string msg;
    try {
      parse_sampling_algorithm(bad);
    } catch (const Error& e) {
      msg = e.what();
    }
    REQUIRE(!msg.empty());
    CHECK(msg.find('\n') == std::string::npos);
    for (const auto& c : all) CHECK(msg.find(c.name) != std::string::npos);
  }
}

TEST_CASE("infer_sampling_algorithm maps the legacy knobs") {
  CHECK(infer_sampling_algorithm(0.0f, 0, 1.0f) == Algo::Greedy);
  CHECK(infer_sampling_algorithm(0.0f, 40, 0.9f) == Algo::Greedy);
  CHECK(infer_sampling_algorithm(1.0f, 40, 0.9f) == Algo::Composite);
  CHECK(infer_sampling_algorithm(0.7f, 1, 0.5f) == Algo::Composite);
  CHECK(infer_sampling_algorithm(1.0f, 40, 1.0f) == Algo::TopK);
  CHECK(infer_sampling_algorithm(1.0f, 0, 0.9f) == Algo::Nucleus);
  CHECK(infer_sampling_algorithm(1.0f, -1, 0.9f) == Algo::Nucleus);
  CHECK(infer_sampling_algorithm(1.0f, 0, 1.0f) == Algo::Weighted);
  CHECK(infer_sampling_algorithm(2.0f, 0, 1.5f) == Algo::Weighted);
}

TEST_CASE("sample_seed: index 0 is the seed, other indices are distinct streams") {
  for (uint64_t seed : {uint64_t(0), uint64_t(1), uint64_t(42), ~uint64_t(0)}) {
    CAPTURE(seed);
    CHECK(sample_seed(seed, 0) == seed);
    std::vector<uint64_t> seen = {seed};
    for (int64_t i = 1; i <= 1000; ++i) {
      CHECK(sample_seed(seed, i) == sample_seed(seed, i));  // deterministic
      seen.push_back(sample_seed(seed, i));
    }
    std::sort(seen.begin(), seen.end());
    CHECK(std::adjacent_find(seen.begin(), seen.end()) == seen.end());
  }
  // Different seeds give different streams at the same index; neighbouring indices are not
  // neighbouring values.
  CHECK(sample_seed(1, 1) != sample_seed(2, 1));
  CHECK(sample_seed(7, 2) - sample_seed(7, 1) != sample_seed(7, 3) - sample_seed(7, 2));
  // The samplers of two indices draw different tokens.
  std::vector<float> logits(100);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = float(std::sin(double(i)));
  const auto a = draws_of(weighted(1.0f, sample_seed(9, 0)), logits, 100);
  const auto b = draws_of(weighted(1.0f, sample_seed(9, 1)), logits, 100);
  int differ = 0;
  for (size_t i = 0; i < a.size(); ++i) differ += a[i] != b[i];
  CHECK(differ > 50);
  CHECK(a == draws_of(weighted(1.0f, 9), logits, 100));
}

TEST_CASE("greedy is argmax with the lowest id on ties") {
  const std::vector<float> logits = {1.0f, 3.0f, -2.0f, 3.0f, 0.5f};
  Sampler s(5, greedy());
  for (int i = 0; i < 10; ++i) CHECK(s.sample(logits.data()) == 1);
  // Greedy ignores (and does not validate) temperature, top-k and top-p.
  Sampler s2(5, params(Algo::Greedy, 0.0f, 3, 0.5f, 9));
  CHECK(s2.sample(logits.data()) == 1);
  Sampler s3(5, params(Algo::Greedy, -1.0f, -5, std::numeric_limits<float>::quiet_NaN(), 9));
  CHECK(s3.sample(logits.data()) == 1);
  const std::vector<float> neg = {-5.0f, -1.0f, -1.0f};
  Sampler s4(3, greedy());
  CHECK(s4.sample(neg.data()) == 1);
  const std::vector<float> flat(7, 0.25f);
  Sampler s5(7, greedy());
  CHECK(s5.sample(flat.data()) == 0);
}

TEST_CASE("same seed, same tokens; different seed, different tokens") {
  std::vector<float> logits(1000);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = float(std::sin(double(i))) * 2.0f;
  for (const SamplingParams& p : {weighted(1.0f, 7), topk(50, 0.8f, 7), nucleus(0.9f, 1.2f, 7),
                                  composite(40, 0.95f, 0.7f, 7)}) {
    CAPTURE(sampling_algorithm_name(p.algorithm));
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
  Sampler g(300, greedy());
  const int32_t best = g.sample(logits.data());
  for (const SamplingParams& p :
       {topk(1, 1.0f, 1), topk(1, 5.0f, 2), composite(1, 1.0f, 5.0f, 3), nucleus(1e-6f, 1.0f, 4),
        nucleus(1e-6f, 50.0f, 5), nucleus(0.0f, 50.0f, 6), composite(20, 1e-6f, 2.0f, 7),
        composite(300, 1e-6f, 50.0f, 8)}) {
    CAPTURE(sampling_algorithm_name(p.algorithm));
    CAPTURE(p.seed);
    Sampler s(300, p);
    for (int i = 0; i < 200; ++i) CHECK(s.sample(logits.data()) == best);
  }
  // top_p = 0 keeps the top logit and its ties (nucleus); composite's tiny top_p keeps index 0.
  const std::vector<float> tied = {1.0f, 4.0f, 2.0f, 4.0f, 4.0f, 0.0f};
  Sampler n0(6, nucleus(0.0f, 1.0f, 9));
  const auto h = histogram(n0, tied, 30000);
  CHECK(chi_square(h, {0.0, 1.0 / 3, 0.0, 1.0 / 3, 1.0 / 3, 0.0}, 30000) < 13.8);
  Sampler c0(6, composite(6, 1e-6f, 1.0f, 10));
  CHECK(histogram(c0, tied, 1000)[1] == 1000);
}

TEST_CASE("top_p = 1 nucleus is weighted; top_p = 1 composite is topk (same draws)") {
  std::vector<float> logits(500);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = float(std::sin(double(i) * 0.9)) * 2.5f;
  for (float t : {0.6f, 1.0f, 1.7f}) {
    CAPTURE(t);
    const auto w = draws_of(weighted(t, 31), logits, 500);
    CHECK(draws_of(nucleus(1.0f, t, 31), logits, 500) == w);
    CHECK(draws_of(nucleus(1.5f, t, 31), logits, 500) == w);  // top_p ≥ 1 keeps everything
    CHECK(draws_of(composite(25, 1.0f, t, 32), logits, 500) ==
          draws_of(topk(25, t, 32), logits, 500));
  }
}

TEST_CASE("temperature -> 0 picks the argmax") {
  std::vector<float> logits(400);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = float(std::sin(double(i) * 0.77)) * 3.0f;
  logits[123] = 3.5f;  // unique maximum, well clear of the rest
  logits[321] = 3.4f;
  for (const SamplingParams& p : {weighted(1e-6f, 1), topk(50, 1e-6f, 2), nucleus(0.9f, 1e-6f, 3),
                                  nucleus(1.0f, 1e-6f, 4), composite(50, 0.9f, 0.0f, 5),
                                  composite(400, 1.0f, 0.0f, 6), composite(50, 0.9f, 1e-7f, 7)}) {
    CAPTURE(sampling_algorithm_name(p.algorithm));
    CAPTURE(p.seed);
    Sampler s(400, p);
    for (int i = 0; i < 200; ++i) CHECK(s.sample(logits.data()) == 123);
  }
  // Composite's temperature floor: T = 0 behaves as T = 1e-6, which still spreads over ties.
  const std::vector<float> tied = {0.0f, 2.0f, 2.0f, 1.0f};
  CHECK(draws_of(composite(4, 1.0f, 0.0f, 8), tied, 300) ==
        draws_of(composite(4, 1.0f, 1e-6f, 8), tied, 300));
  // A gap of 1e-4 at T = 1e-6 is a factor e^-100: a larger floor (say 1e-3) would mix them.
  const std::vector<float> close = {1.0f, 1.0001f, 0.9999f};
  Sampler floor0(3, composite(3, 1.0f, 0.0f, 10));
  CHECK(histogram(floor0, close, 2000)[1] == 2000);
  Sampler cold(4, composite(4, 1.0f, 0.0f, 9));
  CHECK(chi_square(histogram(cold, tied, 20000), {0.0, 0.5, 0.5, 0.0}, 20000) < 10.8);
}

TEST_CASE("weighted follows the tempered softmax (chi-square)") {
  const std::vector<float> logits = {0.0f, 1.0f, -1.0f, 2.0f, 0.5f, -3.0f};
  const int draws = 200000;
  // 5 degrees of freedom: P(χ² > 20.5) ≈ 0.001. The seed is fixed, so this cannot flake.
  Sampler s(6, weighted(1.0f, 2024));
  const auto h1 = histogram(s, logits, draws);
  CHECK(chi_square(h1, softmax(logits, 1.0), draws) < 20.5);
  Sampler t(6, weighted(0.5f, 77));
  const auto h05 = histogram(t, logits, draws);
  CHECK(chi_square(h05, softmax(logits, 0.5), draws) < 20.5);
  // The tolerance discriminates: ignoring the temperature (or applying it twice) fails.
  CHECK(chi_square(h05, softmax(logits, 1.0), draws) > 1000.0);
  CHECK(chi_square(h05, softmax(logits, 0.25), draws) > 1000.0);
  CHECK(chi_square(h1, softmax(logits, 0.9), draws) > 100.0);
}

TEST_CASE("top-k keeps the k largest, renormalised and tempered") {
  const std::vector<float> logits = {0.0f, 1.0f, -1.0f, 2.0f, 0.5f, 2.0f};
  const int draws = 100000;
  Sampler s(6, topk(3, 2.0f, 5));
  const auto h = histogram(s, logits, draws);
  // Kept: ids 3, 5 (logit 2) and 1 (logit 1), each ∝ exp(l / 2).
  std::vector<double> p(6, 0.0);
  const double z = 2.0 * std::exp(1.0) + std::exp(0.5);
  p[3] = p[5] = std::exp(1.0) / z;
  p[1] = std::exp(0.5) / z;
  CHECK(chi_square(h, p, draws) < 13.8);  // 2 dof, P ≈ 0.001
  // Untempered renormalisation is rejected by the same tolerance.
  std::vector<double> untempered(6, 0.0);
  const double z1 = 2.0 * std::exp(2.0) + std::exp(1.0);
  untempered[3] = untempered[5] = std::exp(2.0) / z1;
  untempered[1] = std::exp(1.0) / z1;
  CHECK(chi_square(h, untempered, draws) > 1000.0);
  // Ties in the ranking: the lower id wins the last place (k = 2 keeps ids 3 and 5; k = 1 id 3).
  Sampler two(6, topk(2, 1.0f, 6));
  CHECK(chi_square(histogram(two, logits, 20000), {0, 0, 0, 0.5, 0, 0.5}, 20000) < 10.8);
  Sampler one(6, topk(1, 1.0f, 7));
  CHECK(histogram(one, logits, 1000)[3] == 1000);
  // top_k ≥ vocab is clamped: everything is kept.
  Sampler all(6, topk(100, 1.0f, 6));
  CHECK(chi_square(histogram(all, logits, draws), softmax(logits, 1.0), draws) < 20.5);
}

TEST_CASE("nucleus: untempered cutoff, ties at the cutoff kept") {
  // Untempered probabilities ∝ e^l: cumulative over the sorted logits decides the set.
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f),
                                     std::log(0.05f)};
  const int draws = 100000;
  // p = 0.7: cum = [0.5, 0.8, …] → cutoff index 1 → tokens 0 and 1, ∝ 0.5 : 0.3 at T = 1.
  Sampler s(4, nucleus(0.7f, 1.0f, 11));
  const auto h = histogram(s, logits, draws);
  CHECK(chi_square(h, {0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0}, draws) < 10.8);  // 1 dof
  CHECK(chi_square(h, {0.5, 0.3, 0.15, 0.05}, draws) > 1000.0);          // no truncation: fails
  // p = 0.81: cum = [0.5, 0.8, 0.95] → cutoff index 2 → the third token is kept too.
  Sampler s3(4, nucleus(0.81f, 1.0f, 12));
  CHECK(chi_square(histogram(s3, logits, draws), {0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0},
                   draws) < 13.8);
  // The set is chosen from the *untempered* distribution: at T = 100 the tempered one is nearly
  // flat (which would need all four tokens to reach 0.7), but only tokens 0 and 1 are kept,
  // drawn ∝ exp(l / 100).
  Sampler hot(4, nucleus(0.7f, 100.0f, 12));
  const auto hh = histogram(hot, logits, draws);
  const double a = std::pow(0.5, 0.01), b = std::pow(0.3, 0.01);
  CHECK(chi_square(hh, {a / (a + b), b / (a + b), 0.0, 0.0}, draws) < 10.8);
  // Ties at the cutoff logit are all kept (nucleus); composite keeps only up to the cutoff index.
  const std::vector<float> tied = {2.0f, 1.0f, 1.0f, 0.0f};
  // Untempered p = [0.534, 0.197, 0.197, 0.072], cum = [0.534, 0.731, …]: top_p = 0.6 → cutoff
  // index 1, whose logit (1) is shared by ids 1 and 2.
  const double e = std::exp(1.0);
  Sampler n(4, nucleus(0.6f, 1.0f, 13));
  CHECK(chi_square(histogram(n, tied, draws), {e / (e + 2), 1 / (e + 2), 1 / (e + 2), 0.0}, draws) <
        13.8);
  Sampler c(4, composite(4, 0.6f, 1.0f, 14));
  CHECK(chi_square(histogram(c, tied, draws), {e / (e + 1), 1 / (e + 1), 0.0, 0.0}, draws) < 10.8);
}

TEST_CASE("composite: top-k, then top-p over the renormalised top-k") {
  // Probabilities ∝ [8, 4, 2, 1, 1]/16. top_k = 3 → [8, 4, 2]/14 = [.571, .286, .143];
  // top_p = 0.8: cum = [.571, .857] → cutoff 1 → tokens 0, 1 (over the full vocabulary the cum
  // would be [.5, .75, .875] and keep three).
  const std::vector<float> logits = {std::log(8.0f), std::log(4.0f), std::log(2.0f), 0.0f, 0.0f};
  const int draws = 100000;
  Sampler s(5, composite(3, 0.8f, 1.0f, 15));
  CHECK(chi_square(histogram(s, logits, draws), {8.0 / 12.0, 4.0 / 12.0, 0.0, 0.0, 0.0}, draws) <
        10.8);
  Sampler n(5, nucleus(0.8f, 1.0f, 16));
  CHECK(chi_square(histogram(n, logits, draws), {8.0 / 14, 4.0 / 14, 2.0 / 14, 0.0, 0.0}, draws) <
        13.8);
  // Tempered after the cut: T = 0.5 squares the weights of the kept tokens (64 : 16).
  Sampler t(5, composite(3, 0.8f, 0.5f, 17));
  CHECK(chi_square(histogram(t, logits, draws), {0.8, 0.2, 0.0, 0.0, 0.0}, draws) < 10.8);
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
    const int draws = 3000;  // each draw is a full-vocabulary nucleus pass; keep the test fast
    Sampler s(V, nucleus(top_p, 1.0f, 21));
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

TEST_CASE("invalid parameters throw one-line errors naming the parameter") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const struct {
    SamplingParams p;
    const char* names;  // substring of the message
  } bad[] = {
      {weighted(0.0f, 0), "temperature"},
      {weighted(-0.5f, 0), "temperature"},
      {weighted(nan, 0), "temperature"},
      {weighted(inf, 0), "temperature"},
      {topk(5, 0.0f, 0), "temperature"},
      {topk(5, nan, 0), "temperature"},
      {topk(0, 1.0f, 0), "top_k"},
      {topk(-1, 1.0f, 0), "top_k"},
      {nucleus(0.9f, 0.0f, 0), "temperature"},
      {nucleus(0.9f, inf, 0), "temperature"},
      {nucleus(-0.1f, 1.0f, 0), "top_p"},
      {nucleus(nan, 1.0f, 0), "top_p"},
      {composite(0, 0.9f, 1.0f, 0), "top_k"},
      {composite(-3, 0.9f, 1.0f, 0), "top_k"},
      {composite(5, 0.0f, 1.0f, 0), "top_p"},
      {composite(5, -0.5f, 1.0f, 0), "top_p"},
      {composite(5, 1.5f, 1.0f, 0), "top_p"},
      {composite(5, nan, 1.0f, 0), "top_p"},
      {composite(5, 0.9f, -1.0f, 0), "temperature"},
      {composite(5, 0.9f, nan, 0), "temperature"},
      {composite(5, 0.9f, inf, 0), "temperature"},
      {params(Algo(17), 1.0f, 0, 1.0f, 0), "algorithm"},
  };
  for (const auto& c : bad) {
    CAPTURE(sampling_algorithm_name(c.p.algorithm));
    CAPTURE(c.names);
    const std::string msg = construct_error(10, c.p);
    CAPTURE(msg);
    CHECK(msg.find(c.names) != std::string::npos);
    CHECK(msg.find('\n') == std::string::npos);
  }
  // Request limits, for every algorithm.
  for (const SamplingParams& base : {greedy(), weighted(1.0f, 0), topk(3, 1.0f, 0),
                                     nucleus(0.5f, 1.0f, 0), composite(3, 0.5f, 1.0f, 0)}) {
    CAPTURE(sampling_algorithm_name(base.algorithm));
    SamplingParams p = base;
    p.stop_tokens = {2, 10};
    CHECK(construct_error(10, p).find("stop token") != std::string::npos);
    p.stop_tokens = {-1};
    CHECK(construct_error(10, p).find("stop token") != std::string::npos);
    p.stop_tokens = {0, 9};
    CHECK(construct_error(10, p) == "");
    p.max_new_tokens = -1;
    CHECK(construct_error(10, p).find("max_new_tokens") != std::string::npos);
    p.max_new_tokens = 0;
    CHECK(construct_error(10, p) == "");
    CHECK(construct_error(0, p).find("vocab_size") != std::string::npos);
  }
  // Edge values that are accepted.
  for (const SamplingParams& p :
       {params(Algo::Greedy, -1.0f, -1, -1.0f, 0), nucleus(0.0f, 1.0f, 0), nucleus(1.5f, 1.0f, 0),
        composite(5, 1.0f, 0.0f, 0), composite(50, 1e-6f, 1.0f, 0), topk(50, 1.0f, 0),
        topk(5, 1.0f, 0)}) {
    CAPTURE(sampling_algorithm_name(p.algorithm));
    CHECK(construct_error(10, p) == "");
  }
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
       {greedy(), weighted(1.0f, 1), topk(40, 0.7f, 2), nucleus(0.9f, 1.0f, 3),
        composite(50, 0.9f, 0.9f, 4), nucleus(0.999f, 1.0f, 5), nucleus(0.0f, 0.8f, 6),
        composite(50, 0.9f, 0.0f, 7)}) {
    CAPTURE(sampling_algorithm_name(p.algorithm));
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
  } cases[] = {{"greedy", greedy()},
               {"weighted T=0.8", weighted(0.8f, 1)},
               {"topk T=1 k=40", topk(40, 1.0f, 1)},
               {"nucleus T=1 p=0.9", nucleus(0.9f, 1.0f, 1)},
               {"nucleus T=0.7 p=.9", nucleus(0.9f, 0.7f, 1)},
               {"comp T=.7 k=50 p=.9", composite(50, 0.9f, 0.7f, 1)}};
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
    std::printf("sample V=32000 %-20s min %8.1f us  median %8.1f us\n", c.name, t[0], t[10]);
  }
}

}  // namespace
}  // namespace kiln
