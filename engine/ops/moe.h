// Mixture-of-experts routing for the DeepSeek family (docs/maxtext.md §2.7) and the grouping of a
// batch's (token, expert) pairs by expert, so each selected expert runs once per step with M = its
// token count. Scalar code: routing is T · X work, small next to the experts' matmuls. Nothing here
// allocates after construction.
//
// Rounding (MaxText materialises every one of these as bf16; the same points as
// tests/reference/deepseek_ref.py, which evaluates each step in f64 and rounds once):
//   logits   the gate projection, rounded to bf16 by the caller
//   scores   sigmoid: bf16(σ(l));  softmax: e = bf16(exp(l − max)), s = bf16(Σe), bf16(e / s);
//            none: the logits themselves
//   biased   bf16(scores + bias) (routed_bias)
//   weights  of the k selected experts, taken from the pre-bias scores (DeepSeek-V3 noaux_tc:
//            model names deepseek3*/deepseek4*) or from the biased ones (every other name, e.g.
//            Kimi-K2 in MaxText); sigmoid: bf16(w / (bf16(Σw) + 1e-20) · bf16(rsf)), otherwise
//            bf16(w · bf16(rsf)). (MaxText rounds the renormalised weight before × rsf as well; the
//            reference rounds once, and so do we: the difference is one bf16 step of a weight at
//            most, far inside the e2e tolerance, and matching the reference keeps the tests exact.)
// Selection: top-k of the biased scores, ties to the lower expert index (lax.top_k); with
// group-limited routing (DeepSeek-V3 names only, n_routing_groups != -1, docs/maxtext.md §2.7) each
// group of X / n_groups consecutive experts scores the f32 sum of its two best biased scores, the
// topk_routing_group best groups are kept (ties to the lower group) and the others' experts get
// −∞. A NaN score is never preferred over a number.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "schema/model_config.h"

namespace kiln::ops {

enum class ScoreFunc { None, Softmax, Sigmoid };

struct RoutingParams {
  int64_t num_experts = 0;
  int64_t top_k = 0;
  ScoreFunc score_func = ScoreFunc::None;
  bool weights_pre_bias = false;  // weights from the scores before the bias (deepseek3*/4*)
  int64_t n_groups = -1;          // > 0: group-limited selection
  int64_t topk_groups = -1;
  double routed_scaling_factor = 1.0;

  // MaxText's behaviour for a config: group-limited routing only applies together with the
  // DeepSeek-V3 routing (routing_weights_pre_bias, i.e. a deepseek3*/deepseek4* model name); for
  // other names MaxText ignores n_routing_groups (docs/maxtext.md §2.7, get_topk).
  static RoutingParams from_config(const ModelConfig& c);
};

class Router {
 public:
  // Throws kiln::Error for inconsistent parameters (k outside [1, X], groups not dividing X, fewer
  // than two experts per group, kept groups holding fewer than k experts).
  explicit Router(const RoutingParams& p);
  const RoutingParams& params() const { return p_; }

  // logits: [T, X] gate outputs (bf16 values); bias: [X] bf16 or nullptr. Writes, per token, the
  // k selected experts in selection order (best first) to experts[t·k + j] and their final
  // weights (bf16 values) to weights[t·k + j].
  void route(const float* logits, const uint16_t* bias, int64_t T, int32_t* experts,
             float* weights);

 private:
  RoutingParams p_;
  std::vector<float> scores_, biased_, select_, group_score_;
  std::vector<uint8_t> taken_;
};

// The T·k (token, slot) pairs of a routed batch sorted by expert (a counting sort; the pairs of
// one expert stay in token order). Pair p = t·k + j is slot j of token t.
class ExpertBatches {
 public:
  ExpertBatches(int64_t num_experts, int64_t top_k, int64_t max_tokens);
  // experts: [T, k] as written by Router::route. Throws for T > max_tokens or an expert id
  // outside [0, num_experts).
  void build(const int32_t* experts, int64_t T);
  // Experts that received at least one pair, in increasing order.
  std::span<const int32_t> active() const { return {active_.data(), size_t(n_active_)}; }
  // The pairs routed to expert e (increasing p).
  std::span<const int32_t> pairs(int64_t e) const {
    return {entries_.data() + offsets_[size_t(e)],
            size_t(offsets_[size_t(e) + 1] - offsets_[size_t(e)])};
  }
  int64_t top_k() const { return k_; }

 private:
  int64_t X_, k_, max_tokens_;
  std::vector<int32_t> counts_, offsets_, entries_, active_;
  int64_t n_active_ = 0;
};

}  // namespace kiln::ops
