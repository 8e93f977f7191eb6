// Token selection with MaxEngine's semantics (docs/maxtext.md §6, inference_utils.py::sampling), by
// SamplingParams::algorithm:
//   greedy     argmax, lowest id on ties
//   weighted   categorical(logits / T)
//   topk       categorical over the k largest logits / T
//   nucleus    sort descending, cumulative softmax of the *untempered* logits over the whole
//              vocabulary, cutoff index = #(cum < p), keep every logit ≥ the cutoff logit (ties
//              kept), categorical(kept / T)
//   composite  top-k, cumulative softmax of the untempered top-k logits, keep sorted indices ≤
//              cutoff (the first index reaching p included), categorical(kept / max(T, 1e-6))
// MaxText draws with jax.random (Gumbel-max); we cannot reproduce JAX's PRNG, so the draw is an
// inverse-CDF walk with our own generator — same distribution, deterministic for a seed.
// Probabilities are accumulated in double so the cutoff and the draw do not depend on the order
// of f32 sums.
#include "engine/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

#include "common/error.h"
#include "engine/ops/elementwise.h"

namespace kiln {

namespace {

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t rotl(uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}

// Descending by logit, ascending id on ties (jax.lax.top_k and a stable sort agree on that).
struct ByLogitDesc {
  const float* logits;
  bool operator()(int32_t a, int32_t b) const {
    const float la = logits[a], lb = logits[b];
    return la > lb || (la == lb && a < b);
  }
};

// The token at sorted (descending) position #(cum < target), i.e. the first whose cumulative
// mass reaches target, where e holds unnormalised probabilities. A quickselect on probability
// mass rather than a sort: expected O(V), where sorting 32k logits for a flat distribution took
// milliseconds. ids is scratch for V ids.
int32_t nucleus_cutoff(const float* logits, const float* e, double target, int32_t* ids,
                       int32_t V) {
  const ByLogitDesc cmp{logits};
  for (int32_t i = 0; i < V; ++i) ids[i] = i;
  int32_t lo = 0, hi = V;
  double before = 0.0;  // mass of every token ranked before ids[lo]
  while (hi - lo > 32) {
    const int32_t a = ids[lo], b = ids[lo + (hi - lo) / 2], c = ids[hi - 1];
    const int32_t pivot =
        cmp(a, b) ? (cmp(b, c) ? b : (cmp(a, c) ? c : a)) : (cmp(a, c) ? a : (cmp(b, c) ? c : b));
    int32_t* mid = std::partition(ids + lo, ids + hi, [&](int32_t i) { return cmp(i, pivot); });
    double left = 0.0;
    for (const int32_t* q = ids + lo; q != mid; ++q) left += e[*q];
    if (before + left >= target) {  // the cutoff is among the tokens ranked before the pivot
      hi = int32_t(mid - ids);
      continue;
    }
    std::iter_swap(mid, std::find(mid, ids + hi, pivot));
    before += left;
    if (before + e[pivot] >= target) return pivot;
    before += e[pivot];
    lo = int32_t(mid - ids) + 1;
  }
  std::sort(ids + lo, ids + hi, cmp);
  for (int32_t j = lo; j < hi; ++j) {
    before += e[ids[j]];
    if (before >= target) return ids[j];
  }
  // Rounding kept the cumulative mass just below target: keep the whole range.
  return ids[hi - 1];
}

// A float for an error message ("%g": 1e-07, nan, inf).
std::string show(float v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", double(v));
  return buf;
}

constexpr SamplingAlgorithm kAlgorithms[] = {SamplingAlgorithm::Greedy, SamplingAlgorithm::Weighted,
                                             SamplingAlgorithm::TopK, SamplingAlgorithm::Nucleus,
                                             SamplingAlgorithm::Composite};

// MaxText's floor on the composite temperature (temperature 0 is accepted there).
constexpr float kMinCompositeTemperature = 1e-6f;

}  // namespace

const char* sampling_algorithm_name(SamplingAlgorithm a) {
  switch (a) {
    case SamplingAlgorithm::Greedy:
      return "greedy";
    case SamplingAlgorithm::Weighted:
      return "weighted";
    case SamplingAlgorithm::TopK:
      return "topk";
    case SamplingAlgorithm::Nucleus:
      return "nucleus";
    case SamplingAlgorithm::Composite:
      return "composite";
  }
  return "unknown";
}

SamplingAlgorithm parse_sampling_algorithm(const std::string& name) {
  std::string valid;
  for (SamplingAlgorithm a : kAlgorithms) {
    if (name == sampling_algorithm_name(a)) return a;
    valid += valid.empty() ? "" : ", ";
    valid += sampling_algorithm_name(a);
  }
  std::string shown;  // keep the message on one line
  for (char c : name) shown += (c == '\n' || c == '\r') ? ' ' : c;
  throw Error("sampling: unknown algorithm '" + shown + "' (valid: " + valid + ")");
}

SamplingAlgorithm infer_sampling_algorithm(float temperature, int32_t top_k, float top_p) {
  if (temperature == 0.0f) return SamplingAlgorithm::Greedy;
  if (top_k > 0 && top_p < 1.0f) return SamplingAlgorithm::Composite;
  if (top_k > 0) return SamplingAlgorithm::TopK;
  if (top_p < 1.0f) return SamplingAlgorithm::Nucleus;
  return SamplingAlgorithm::Weighted;
}

void resolve_sampling_algorithm(SamplingParams& sp, const std::optional<std::string>& name,
                                std::optional<float> temperature) {
  sp.temperature = temperature.value_or(name ? 1.0f : 0.0f);
  sp.algorithm = name ? parse_sampling_algorithm(*name)
                      : infer_sampling_algorithm(sp.temperature, sp.top_k, sp.top_p);
}

uint64_t sample_seed(uint64_t seed, int64_t index) {
  if (index == 0) return seed;
  // SplitMix64's finaliser over seed and index (an odd multiple of index, so distinct indices give
  // distinct inputs, and the finaliser is a bijection), salted so that the result is not one of
  // the words Rng(seed) itself draws from the same SplitMix64 sequence.
  uint64_t x = (seed ^ 0x5851F42D4C957F2Dull) + uint64_t(index) * 0xD1B54A32D192ED03ull;
  return splitmix64(x);
}

Rng::Rng(uint64_t seed) {
  uint64_t x = seed;
  for (auto& s : s_) s = splitmix64(x);
}

uint64_t Rng::next() {  // xoshiro256**
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::uniform() {
  return double(next() >> 11) * 0x1.0p-53;
}

Sampler::Sampler(int64_t vocab_size, const SamplingParams& p)
    : vocab_(vocab_size), p_(p), rng_(p.seed) {
  if (vocab_size < 1 || vocab_size > std::numeric_limits<int32_t>::max()) {
    throw Error("sampling: vocab_size must be in [1, 2^31), got " + std::to_string(vocab_size));
  }
  const std::string name = sampling_algorithm_name(p.algorithm);
  const float t = p.temperature;
  switch (p.algorithm) {
    case SamplingAlgorithm::Greedy:
      break;
    case SamplingAlgorithm::Weighted:
    case SamplingAlgorithm::TopK:
    case SamplingAlgorithm::Nucleus:
      if (!(t > 0.0f) || !std::isfinite(t)) {
        throw Error("sampling: " + name + " needs a finite temperature > 0, got " + show(t));
      }
      break;
    case SamplingAlgorithm::Composite:
      if (!(t >= 0.0f) || !std::isfinite(t)) {
        throw Error("sampling: composite needs a finite temperature >= 0, got " + show(t));
      }
      break;
    default:
      throw Error("sampling: unknown algorithm " + std::to_string(int(p.algorithm)));
  }
  if ((p.algorithm == SamplingAlgorithm::TopK || p.algorithm == SamplingAlgorithm::Composite) &&
      p.top_k <= 0) {
    throw Error("sampling: " + name + " needs top_k > 0, got " + std::to_string(p.top_k));
  }
  if (p.algorithm == SamplingAlgorithm::Nucleus && !(p.top_p >= 0.0f)) {
    throw Error("sampling: nucleus needs top_p >= 0, got " + show(p.top_p));
  }
  if (p.algorithm == SamplingAlgorithm::Composite && !(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    throw Error("sampling: composite needs top_p in (0, 1], got " + show(p.top_p));
  }
  for (const int32_t id : p.stop_tokens) {
    if (id < 0 || int64_t(id) >= vocab_size) {
      throw Error("sampling: stop token " + std::to_string(id) + " outside the vocabulary of " +
                  std::to_string(vocab_size));
    }
  }
  if (p.max_new_tokens < 0) {
    throw Error("sampling: max_new_tokens must be >= 0, got " + std::to_string(p.max_new_tokens));
  }
  if (p.algorithm != SamplingAlgorithm::Greedy) {
    probs_.resize(size_t(vocab_size));
    order_.resize(size_t(vocab_size));
  }
}

int32_t Sampler::sample(const float* logits) {
  const int32_t V = int32_t(vocab_);
  const SamplingAlgorithm algo = p_.algorithm;
  if (algo == SamplingAlgorithm::Greedy) {
    int32_t best = 0;
    for (int32_t i = 1; i < V; ++i) {
      if (logits[i] > logits[best]) best = i;
    }
    return best;
  }
  const double inv_t = 1.0 / double(algo == SamplingAlgorithm::Composite
                                        ? std::max(p_.temperature, kMinCompositeTemperature)
                                        : p_.temperature);
  const ByLogitDesc cmp{logits};

  if (algo == SamplingAlgorithm::TopK || algo == SamplingAlgorithm::Composite) {
    // Candidates are the k largest, sorted.
    const int32_t k = std::min(p_.top_k, V);
    for (int32_t i = 0; i < V; ++i) order_[size_t(i)] = i;
    std::partial_sort(order_.begin(), order_.begin() + k, order_.end(), cmp);
    int32_t keep = k;
    const double m = logits[order_[0]];
    if (algo == SamplingAlgorithm::Composite && p_.top_p < 1.0f) {
      double z = 0.0;
      for (int32_t j = 0; j < k; ++j) z += std::exp(double(logits[order_[size_t(j)]]) - m);
      // cutoff = #(cum < p); keep indices ≤ cutoff (clamped: all kept if rounding keeps cum < p).
      double cum = 0.0;
      int32_t cutoff = 0;
      for (; cutoff < k; ++cutoff) {
        cum += std::exp(double(logits[order_[size_t(cutoff)]]) - m) / z;
        if (!(cum < double(p_.top_p))) break;
      }
      keep = std::min(cutoff + 1, k);
    }
    double total = 0.0;
    for (int32_t j = 0; j < keep; ++j) {
      probs_[size_t(j)] = float(std::exp((double(logits[order_[size_t(j)]]) - m) * inv_t));
      total += probs_[size_t(j)];
    }
    const double u = rng_.uniform() * total;
    double acc = 0.0;
    for (int32_t j = 0; j < keep; ++j) {
      acc += probs_[size_t(j)];
      if (u < acc) return order_[size_t(j)];
    }
    return order_[size_t(keep - 1)];  // u landed on the rounding slack at the very end
  }

  // weighted / nucleus over the whole vocabulary.
  double m = -std::numeric_limits<double>::infinity();
  for (int32_t i = 0; i < V; ++i) m = std::max(m, double(logits[i]));
  float threshold = -std::numeric_limits<float>::infinity();  // keep logits ≥ threshold
  const bool use_top_p = algo == SamplingAlgorithm::Nucleus && p_.top_p < 1.0f;
  bool have_exp = false;  // probs_ holds exp(l − m)
  if (use_top_p && p_.top_p <= 0.0f) {
    threshold = float(m);  // cutoff index #(cum < 0) = 0: the top logit and its ties
  } else if (use_top_p) {
    double z = 0.0;
    for (int32_t i = 0; i < V; ++i) {
      const double e = std::exp(double(logits[i]) - m);
      probs_[size_t(i)] = float(e);
      z += e;
    }
    const int32_t cutoff =
        nucleus_cutoff(logits, probs_.data(), double(p_.top_p) * z, order_.data(), V);
    threshold = logits[cutoff];
    have_exp = true;
  }
  // The draw's weights exp((l − m) / T); probs_ already holds them when T = 1 and top-p ran.
  const bool reuse = have_exp && p_.temperature == 1.0f;
  double total = 0.0;
  for (int32_t i = 0; i < V; ++i) {
    float w = 0.0f;
    if (logits[i] >= threshold) {
      w = reuse ? probs_[size_t(i)] : float(std::exp((double(logits[i]) - m) * inv_t));
    }
    probs_[size_t(i)] = w;
    total += w;
  }
  const double u = rng_.uniform() * total;
  double acc = 0.0;
  int32_t last = 0;
  for (int32_t i = 0; i < V; ++i) {
    if (probs_[size_t(i)] == 0.0f) continue;
    acc += probs_[size_t(i)];
    last = i;
    if (u < acc) return i;
  }
  return last;
}

float Sampler::log_prob(const float* logits, int64_t vocab_size, int32_t id) {
  if (vocab_size < 1 || id < 0 || id >= vocab_size) {
    throw Error("log_prob: id " + std::to_string(id) + " outside vocabulary of " +
                std::to_string(vocab_size));
  }
  return float(double(logits[id]) - ops::log_sum_exp(logits, vocab_size));
}

}  // namespace kiln
