#include "engine/ops/moe.h"

#include <cmath>
#include <limits>
#include <string>

#include "common/bf16.h"
#include "common/error.h"

namespace kiln::ops {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Each step evaluated in f64 and rounded once to f32, then to bf16: the reference's chain
// (f64 → astype(f32) → bf16), so the two agree bit for bit.
float bf16_of(double v) {
  return round_to_bf16(float(v));
}

// Index of the largest v[i] among the not-yet-taken i < n; ties go to the lower index, a NaN never
// beats a number. Marks it taken.
int64_t take_max(const float* v, int64_t n, uint8_t* taken) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (taken[i]) continue;
    if (best < 0 || v[i] > v[best] || (std::isnan(v[best]) && !std::isnan(v[i]))) best = i;
  }
  taken[best] = 1;
  return best;
}

}  // namespace

RoutingParams RoutingParams::from_config(const ModelConfig& c) {
  RoutingParams p;
  p.num_experts = c.num_experts;
  p.top_k = c.num_experts_per_tok;
  if (c.routed_score_func == "sigmoid") {
    p.score_func = ScoreFunc::Sigmoid;
  } else if (c.routed_score_func == "softmax") {
    p.score_func = ScoreFunc::Softmax;
  } else if (c.routed_score_func.empty()) {
    p.score_func = ScoreFunc::None;
  } else {
    throw Error("MoE routing: routed_score_func '" + c.routed_score_func +
                "' is not supported (expected sigmoid, softmax or empty)");
  }
  p.weights_pre_bias = c.routing_weights_pre_bias;
  // MaxText's deepseek_routing (the only place groups are used) runs for deepseek3*/deepseek4*
  // names, exactly the names that weight with the pre-bias scores.
  if (c.routing_weights_pre_bias && c.n_routing_groups != -1) {
    p.n_groups = c.n_routing_groups;
    p.topk_groups = c.topk_routing_group;
  }
  p.routed_scaling_factor = c.routed_scaling_factor;
  return p;
}

Router::Router(const RoutingParams& p) : p_(p) {
  const int64_t X = p.num_experts, k = p.top_k;
  if (X < 1 || k < 1 || k > X)
    throw Error("MoE routing: need 1 <= num_experts_per_tok (" + std::to_string(k) +
                ") <= num_experts (" + std::to_string(X) + ")");
  if (p.n_groups != -1) {
    const int64_t G = p.n_groups, kg = p.topk_groups;
    if (G < 1 || X % G != 0 || X / G < 2)
      throw Error("MoE routing: n_routing_groups (" + std::to_string(G) +
                  ") must divide num_experts (" + std::to_string(X) +
                  ") into groups of at least 2 (a group scores its two best experts)");
    if (kg < 1 || kg > G)
      throw Error("MoE routing: topk_routing_group (" + std::to_string(kg) +
                  ") must be in [1, n_routing_groups = " + std::to_string(G) + "]");
    if (kg * (X / G) < k)
      throw Error("MoE routing: the " + std::to_string(kg) + " kept groups hold " +
                  std::to_string(kg * (X / G)) + " experts, fewer than num_experts_per_tok (" +
                  std::to_string(k) + ")");
    group_score_.resize(size_t(G));
  }
  if (!std::isfinite(p.routed_scaling_factor))
    throw Error("MoE routing: routed_scaling_factor must be finite");
  scores_.resize(size_t(X));
  biased_.resize(size_t(X));
  select_.resize(size_t(X));
  taken_.resize(size_t(std::max<int64_t>(X, p.n_groups)));
}

void Router::route(const float* logits, const uint16_t* bias, int64_t T, int32_t* experts,
                   float* weights) {
  const int64_t X = p_.num_experts, k = p_.top_k;
  // Python scalars meet bf16 arrays as bf16 constants (JAX weak typing).
  const double rsf = double(round_to_bf16(float(p_.routed_scaling_factor)));
  const double tiny = double(round_to_bf16(1e-20f));
  for (int64_t t = 0; t < T; ++t) {
    const float* l = logits + t * X;
    float* s = scores_.data();
    switch (p_.score_func) {
      case ScoreFunc::Sigmoid:
        for (int64_t i = 0; i < X; ++i) s[i] = bf16_of(1.0 / (1.0 + std::exp(-double(l[i]))));
        break;
      case ScoreFunc::Softmax: {
        float m = l[0];
        for (int64_t i = 1; i < X; ++i) m = std::max(m, l[i]);
        double sum = 0;
        for (int64_t i = 0; i < X; ++i) {
          s[i] = round_to_bf16(float(std::exp(double(l[i] - m))));
          sum += s[i];
        }
        const double denom = bf16_of(sum);
        for (int64_t i = 0; i < X; ++i) s[i] = bf16_of(double(s[i]) / denom);
        break;
      }
      case ScoreFunc::None:
        for (int64_t i = 0; i < X; ++i) s[i] = l[i];
        break;
    }
    float* b = biased_.data();
    for (int64_t i = 0; i < X; ++i)
      b[i] = bias ? bf16_of(double(s[i]) + double(bf16_to_f32(bias[i]))) : s[i];

    float* sel = select_.data();
    std::copy(b, b + X, sel);
    uint8_t* taken = taken_.data();
    if (p_.n_groups > 0) {
      const int64_t G = p_.n_groups, n = X / G;
      for (int64_t g = 0; g < G; ++g) {
        std::fill(taken, taken + n, uint8_t(0));
        const float* v = b + g * n;
        const float top1 = v[take_max(v, n, taken)];
        const float top2 = v[take_max(v, n, taken)];
        group_score_[size_t(g)] = top1 + top2;  // f32, as MaxText sums the top-2 scores
      }
      std::fill(taken, taken + G, uint8_t(0));
      for (int64_t j = 0; j < p_.topk_groups; ++j) take_max(group_score_.data(), G, taken);
      for (int64_t g = 0; g < G; ++g)
        if (!taken[g]) std::fill(sel + g * n, sel + (g + 1) * n, kNegInf);
    }
    std::fill(taken, taken + X, uint8_t(0));
    int32_t* e = experts + t * k;
    float* w = weights + t * k;
    const float* src = p_.weights_pre_bias ? s : b;
    double wsum = 0;
    for (int64_t j = 0; j < k; ++j) {
      e[j] = int32_t(take_max(sel, X, taken));
      w[j] = src[e[j]];
      wsum += w[j];
    }
    if (p_.score_func == ScoreFunc::Sigmoid) {
      const double denom = double(bf16_of(wsum)) + tiny;
      for (int64_t j = 0; j < k; ++j) w[j] = bf16_of(double(w[j]) / denom * rsf);
    } else {
      for (int64_t j = 0; j < k; ++j) w[j] = bf16_of(double(w[j]) * rsf);
    }
  }
}

ExpertBatches::ExpertBatches(int64_t num_experts, int64_t top_k, int64_t max_tokens)
    : X_(num_experts), k_(top_k), max_tokens_(max_tokens) {
  if (num_experts < 1 || top_k < 1 || max_tokens < 1)
    throw Error("ExpertBatches: num_experts, top_k and max_tokens must be >= 1");
  counts_.resize(size_t(X_));
  offsets_.resize(size_t(X_) + 1);
  entries_.resize(size_t(max_tokens * top_k));
  active_.resize(size_t(X_));
}

void ExpertBatches::build(const int32_t* experts, int64_t T) {
  if (T < 0 || T > max_tokens_)
    throw Error("ExpertBatches: " + std::to_string(T) + " tokens, at most " +
                std::to_string(max_tokens_));
  const int64_t P = T * k_;
  std::fill(counts_.begin(), counts_.end(), 0);
  for (int64_t p = 0; p < P; ++p) {
    const int32_t e = experts[p];
    if (e < 0 || e >= X_)
      throw Error("ExpertBatches: expert id " + std::to_string(e) + " outside [0, " +
                  std::to_string(X_) + ")");
    ++counts_[size_t(e)];
  }
  n_active_ = 0;
  offsets_[0] = 0;
  for (int64_t e = 0; e < X_; ++e) {
    offsets_[size_t(e) + 1] = offsets_[size_t(e)] + counts_[size_t(e)];
    if (counts_[size_t(e)] > 0) active_[size_t(n_active_++)] = int32_t(e);
    counts_[size_t(e)] = 0;  // reused as the fill cursor below
  }
  for (int64_t p = 0; p < P; ++p) {
    const int32_t e = experts[p];
    entries_[size_t(offsets_[size_t(e)] + counts_[size_t(e)]++)] = int32_t(p);
  }
}

}  // namespace kiln::ops
