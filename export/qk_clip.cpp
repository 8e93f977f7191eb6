#include "export/qk_clip.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/error.h"
#include "export/key_layout.h"
#include "export/safetensors.h"

namespace kiln {

namespace {

constexpr float kNoStats = std::numeric_limits<float>::quiet_NaN();

// Where a max-logits key belongs: the layer group and, for an unrolled key, the layer in it.
struct StatsKey {
  std::string group;   // layers | dense_layers | moe_layers
  int64_t index = -1;  // -1: stacked over the group's layers on the first axis
};

bool parse_stats_key(const std::string& raw, StatsKey* out) {
  std::vector<std::string> c = split_key(raw);
  if (!c.empty() && c.back() == "0") c.pop_back();  // Linen sow tuple
  if (c.size() < 3 || c.back() != "max_logits") return false;
  size_t sa = c.size() - 2;
  if (c[sa] == "attention_op") --sa;
  if (c[sa] != "self_attention" || sa == 0) return false;
  const std::string& g = c[sa - 1];
  for (const char* base : {"dense_layers", "moe_layers", "layers"}) {
    std::string b = base;
    if (g == b) {
      *out = {b, -1};
      return true;
    }
    if (std::optional<int64_t> n = unrolled_layer_index(g, b)) {
      *out = {b, *n};
      return true;
    }
  }
  return false;
}

// First global layer and size of a group for this config.
std::pair<int64_t, int64_t> group_span(const ModelConfig& c, const std::string& group,
                                       const std::string& where) {
  // `layers_N` is also the global numbering kiln calibrate writes for every family.
  if (group == "layers") return {0, c.num_decoder_layers};
  for (const GroupSpan& g : layer_groups(c))
    if (g.name == group) return {g.first_layer, g.count};
  throw Error(where + ": layer group '" + group + "' is not part of a " + c.decoder_block +
              " model");
}

}  // namespace

MaxLogits read_max_logits(const QkClipOptions& opt, const ModelConfig& c) {
  MaxLogits out;
  out.layers = c.num_decoder_layers;
  out.heads = c.num_query_heads;
  out.s.assign(size_t(out.layers * out.heads), kNoStats);
  // Layers whose statistics came stacked for their scanned group (only those share a gamma in
  // per-group mode: MaxText reduces over an unrolled layer's own statistics only).
  std::vector<bool> stacked(size_t(out.layers), false);
  auto merge = [&](int64_t layer, int64_t h, float v) {
    float& s = out.s[size_t(layer * out.heads + h)];
    s = std::isnan(s) ? v : std::max(s, v);
  };
  for (const std::string& path : opt.stats) {
    Checkpoint stats = Checkpoint::open({path});
    out.sources.push_back(path);
    int64_t used = 0;
    for (const SourceTensor& t : stats.tensors()) {
      StatsKey key;
      if (!parse_stats_key(t.key, &key)) continue;
      const std::string where = path + ": key '" + t.key + "'";
      if (t.shape.empty() || t.shape.back() != out.heads)
        throw Error(where + " has shape " + shape_to_string(t.shape) + ", expected [..., " +
                    std::to_string(out.heads) + "] (the last axis is the attention head)");
      auto [first, count] = group_span(c, key.group, where);
      std::vector<float> v(size_t(t.numel()));
      read_as_f32(t, v.data());
      if (key.index >= 0) {
        if (key.index >= count)
          throw Error(where + ": layer " + std::to_string(key.index) + " is outside '" + key.group +
                      "' (" + std::to_string(count) + " layers)");
        for (size_t i = 0; i < v.size(); ++i)
          merge(first + key.index, int64_t(i) % out.heads, v[i]);
      } else {
        if (t.shape.size() < 2 || t.shape.front() != count)
          throw Error(where + " has shape " + shape_to_string(t.shape) + ", expected the " +
                      std::to_string(count) + " layers of '" + key.group +
                      "' on the first axis ([layers, ..., heads])");
        const size_t per_layer = v.size() / size_t(count);
        for (size_t i = 0; i < v.size(); ++i)
          merge(first + int64_t(i / per_layer), int64_t(i) % out.heads, v[i]);
        for (int64_t l = first; l < first + count; ++l) stacked[size_t(l)] = true;
      }
      ++used;
    }
    if (used == 0)
      throw Error(path +
                  ": no max-logit statistics (expected keys ending in "
                  "'self_attention.attention_op.max_logits' or "
                  "'self_attention.max_logits')");
  }
  if (opt.per_group) {
    // MaxText reduces over every axis but heads, which for a scanned group includes its layers.
    std::vector<std::string> groups = c.is_deepseek()
                                          ? std::vector<std::string>{"dense_layers", "moe_layers"}
                                          : std::vector<std::string>{"layers"};
    for (const auto& g : groups) {
      auto [first, count] = group_span(c, g, "config");
      for (int64_t h = 0; h < out.heads; ++h) {
        float m = kNoStats;
        for (int64_t l = first; l < first + count; ++l) {
          float s = out.s[size_t(l * out.heads + h)];
          if (stacked[size_t(l)] && !std::isnan(s)) m = std::isnan(m) ? s : std::max(m, s);
        }
        for (int64_t l = first; l < first + count; ++l)
          if (stacked[size_t(l)]) out.s[size_t(l * out.heads + h)] = m;
      }
    }
  }
  return out;
}

float qk_clip_gamma(float s, float tau) {
  // In f32, as MaxText computes it on f32 statistics. A head at or below tau keeps gamma = 1
  // exactly (MaxText's formula would give 1 − 1e-7 for S within 1e-6 below tau), so it stays
  // bit-identical as promised.
  return std::isnan(s) || s <= tau ? 1.0f : std::min(1.0f, tau / (s + 1e-6f));
}

QkClipRecord plan_qk_clip(const QkClipOptions& opt, const ModelConfig& c, const MaxLogits& stats) {
  if (!(opt.threshold > 0))
    throw Error("--qk-clip-threshold must be positive, got " + std::to_string(opt.threshold));
  if (opt.mode != "mla" && opt.mode != "query")
    throw Error("--qk-clip-mode '" + opt.mode + "' is not supported (expected mla or query)");
  if (opt.mode == "mla" && !c.is_deepseek())
    throw Error("QK-Clip is only supported for MLA attention (decoder_block " + c.decoder_block +
                " has none); --qk-clip-mode=query scales each query head instead");
  QkClipRecord r;
  r.applied = true;
  r.threshold = opt.threshold;
  r.mode = opt.mode;
  r.per_group = opt.per_group;
  r.sources = stats.sources;
  if (opt.mode == "query") {
    r.targets = c.is_deepseek()
                    ? std::string(c.q_lora_rank > 0 ? "wq_b" : "query") + " query heads x gamma"
                    : "query kernel heads x gamma";
  } else if (c.q_lora_rank > 0) {
    r.targets = "wq_b nope x sqrt(gamma), rope x gamma; wkv_b k_nope x sqrt(gamma)";
  } else {
    r.targets =
        "query nope x sqrt(gamma), rope x gamma (q_lora_rank 0: MaxText leaves the query "
        "kernel unclipped, kiln clips it); wkv_b k_nope x sqrt(gamma)";
  }
  r.heads = stats.heads;
  r.max_logit = stats.s;
  r.gamma.resize(stats.s.size());
  const float tau = float(opt.threshold);
  for (size_t i = 0; i < stats.s.size(); ++i) r.gamma[i] = qk_clip_gamma(stats.s[i], tau);
  return r;
}

namespace {

// Every tensor QK-Clip touches is [rows, H, cols] and is scaled per output column; `rows` < 0 means
// the base kernel's own row count.
bool scale_clipped_columns(const QkClipRecord& rec, const ModelConfig& c, int64_t layer,
                           const std::string& name, float* w, int64_t rows_override) {
  if (!rec.applied) return false;
  const float* gamma = rec.gamma.data() + layer * rec.heads;
  if (std::all_of(gamma, gamma + rec.heads, [](float g) { return g == 1.0f; })) return false;
  const int64_t H = rec.heads;
  // Every touched tensor is [rows, H, cols]: scale columns [0, split) by a and [split, cols) by b.
  int64_t rows = 0, cols = 0, split = 0;
  bool sqrt_first = false, scale_rest = false;
  if (rec.mode == "query") {
    if (name == "attn.q") {
      rows = c.emb_dim, cols = c.head_dim;
    } else if (name == "attn.wq_b" || name == "attn.query") {
      rows = name == "attn.wq_b" ? c.q_lora_rank : c.emb_dim, cols = c.qk_head_dim();
    } else {
      return false;
    }
    split = 0, scale_rest = true;
  } else if (name == "attn.wq_b" || name == "attn.query") {
    rows = name == "attn.wq_b" ? c.q_lora_rank : c.emb_dim, cols = c.qk_head_dim();
    split = c.qk_nope_head_dim, sqrt_first = true, scale_rest = true;
  } else if (name == "attn.wkv_b") {
    rows = c.kv_lora_rank, cols = c.qk_nope_head_dim + c.v_head_dim;
    split = c.qk_nope_head_dim, sqrt_first = true, scale_rest = false;
  } else {
    return false;
  }
  if (rows_override >= 0) rows = rows_override;
  for (int64_t h = 0; h < H; ++h) {
    const float g = gamma[h];
    if (g == 1.0f) continue;
    const float a = sqrt_first ? std::sqrt(g) : g;
    for (int64_t r = 0; r < rows; ++r) {
      float* row = w + (r * H + h) * cols;
      for (int64_t j = 0; j < split; ++j) row[j] *= a;
      if (scale_rest)
        for (int64_t j = split; j < cols; ++j) row[j] *= g;
    }
  }
  return true;
}

}  // namespace

bool apply_qk_clip(const QkClipRecord& rec, const ModelConfig& c, int64_t layer,
                   const std::string& name, float* w) {
  return scale_clipped_columns(rec, c, layer, name, w, -1);
}

bool apply_qk_clip_to_lora_b(const QkClipRecord& rec, const ModelConfig& c, int64_t layer,
                             const std::string& name, float* b, int64_t rank) {
  return scale_clipped_columns(rec, c, layer, name, b, rank);
}

}  // namespace kiln
