#include "engine/inspect.h"

#include <cmath>
#include <string>
#include <type_traits>

#include "engine/lora.h"
#include "tokenizer/tokenizer.h"

namespace kiln {

using nlohmann::ordered_json;

namespace {

const char* rope_layout_name(RopeLayout r) {
  switch (r) {
    case RopeLayout::HalfSplit:
      return "half-split";
    case RopeLayout::Interleaved:
      return "interleaved (llama3.1)";
    case RopeLayout::Yarn:
      return "yarn";
  }
  return "?";
}

const char* kind_name(LayerKind k) {
  switch (k) {
    case LayerKind::Globals:
      return "globals";
    case LayerKind::Dense:
      return "dense";
    case LayerKind::MoE:
      return "moe";
  }
  return "?";
}

// Every field of the model's family (FieldFamily), in the schema's order.
ordered_json config_json(const ModelConfig& c) {
  const FieldFamily other = c.is_deepseek() ? FieldFamily::Llama : FieldFamily::DeepSeek;
  ordered_json j;
  visit_fields(c, [&](const char* name, const auto& value, const auto& meta) {
    if (meta.family == other) return;
    if constexpr (std::is_same_v<std::decay_t<decltype(value)>, RopeLayout>)
      j[name] = rope_layout_name(value);
    else
      j[name] = value;
  });
  // mlp_dim only exists with dense layers.
  if (c.is_deepseek() && c.first_num_dense_layers == 0) j.erase("mlp_dim");
  if (c.is_deepseek() && c.routed_score_func.empty()) j["routed_score_func"] = "none";
  return j;
}

ordered_json adapters_json(const Artifact& art, uint64_t& runtime_bytes) {
  const Manifest& m = art.manifest();
  ordered_json adapters = ordered_json::array();
  for (const AdapterRecord& ad : m.adapters) {
    // Run-time adapters are mapped and checked as the engine loads them; their memory is the
    // mapped blob bytes.
    if (!ad.merged)
      runtime_bytes +=
          LoraAdapter::open(art.dir(), m.config, ad, art.verifies_checksums())->bytes();
    adapters.push_back(adapter_json(ad));
  }
  return adapters;
}

ordered_json qk_clip_json(const Manifest& m) {
  const QkClipRecord& qk = m.qk_clip;
  if (!qk.applied) return nullptr;
  ordered_json layers = ordered_json::array();
  for (int64_t l = 0; l < m.config.num_decoder_layers; ++l) {
    ordered_json g = ordered_json::array(), s = ordered_json::array();
    for (int64_t h = 0; h < qk.heads; ++h) {
      g.push_back(qk.gamma[size_t(l * qk.heads + h)]);
      const float x = qk.max_logit[size_t(l * qk.heads + h)];
      s.push_back(std::isnan(x) ? ordered_json(nullptr) : ordered_json(x));  // no statistics
    }
    layers.push_back({{"layer", l}, {"gamma", g}, {"max_logit", s}});
  }
  return {{"threshold", qk.threshold}, {"mode", qk.mode},
          {"targets", qk.targets},     {"per_group", qk.per_group},
          {"sources", qk.sources},     {"heads_clipped", qk.clipped_heads()},
          {"layers", layers}};
}

// The tokenizer is parsed, not just counted: inspect is where a broken one should show.
ordered_json tokenizer_json(const Artifact& art) {
  const Manifest& m = art.manifest();
  if (m.tokenizer.empty()) return nullptr;
  const Tokenizer tok(m.tokenizer, art.dir() + ": manifest tokenizer");
  return {{"type", "sentencepiece"},
          {"pieces", tok.vocab_size()},
          {"bos_id", tok.bos_id()},
          {"eos_id", tok.eos_id()},
          {"bytes", m.tokenizer.size()}};
}

}  // namespace

ordered_json adapter_json(const AdapterRecord& a) {
  return {{"name", a.name},
          {"merged", a.merged},
          {"format", a.format},
          {"source", a.source},
          {"rank", a.rank},
          {"lora_alpha", a.lora_alpha},
          {"use_rslora", a.use_rslora},
          {"lora_scale", a.lora_scale},
          {"targets", a.targets.size()},
          {"tensors", a.targets_per_tensor()},
          {"blobs", a.blobs.size()},
          {"bytes", a.bytes()},
          {"created_utc", a.created_utc}};
}

ordered_json inspect_artifact(const Artifact& art) {
  const Manifest& m = art.manifest();
  const Provenance& pv = m.provenance;
  uint64_t adapter_bytes = 0;
  ordered_json adapters = adapters_json(art, adapter_bytes);

  uint64_t n_tensors = 0, n_params = 0, n_blocked = 0;
  ordered_json blobs = ordered_json::array();
  for (size_t i = 0; i < m.blobs.size(); ++i) {
    const BlobView& v = i == 0 ? art.globals() : art.layer(int64_t(i) - 1);
    ordered_json tensors = ordered_json::array();
    for (const auto& t : v.tensors()) {
      ++n_tensors;
      uint64_t numel = 1;
      for (int64_t d : t.shape) numel *= uint64_t(d);
      n_params += numel;  // not the padding of a blocked layout
      ordered_json tj = {{"name", t.name},     {"dtype", std::string(dtype_name(t.dtype))},
                         {"shape", t.shape},   {"layout", layout_name(t.layout)},
                         {"offset", t.offset}, {"bytes", t.length},
                         {"crc32c", t.crc32c}};
      if (t.layout != TensorLayout::RowMajor) {
        ++n_blocked;
        tj["matrix_k"] = t.matrix_k;
        tj["matrix_batch"] = t.matrix_batch;
      }
      tensors.push_back(std::move(tj));
    }
    blobs.push_back({{"file", m.blobs[i].file},
                     {"layer", m.blobs[i].layer},
                     {"kind", kind_name(m.blobs[i].kind)},
                     {"bytes", m.blobs[i].size},
                     {"tensors", tensors}});
  }
  ordered_json sources = ordered_json::array();
  for (const auto& [path, size] : pv.sources) sources.push_back({{"path", path}, {"bytes", size}});
  ordered_json options = ordered_json::array();
  for (const auto& [k, val] : pv.options) options.push_back(val.empty() ? k : k + " " + val);

  return {{"dir", art.dir()},
          {"format_version", std::to_string(m.format_major) + "." + std::to_string(m.format_minor)},
          {"config", config_json(m.config)},
          {"parameters", n_params},
          {"tensors", n_tensors},
          {"blocked_tensors", n_blocked},
          {"bytes", art.total_bytes()},
          {"checksums_verified", art.verifies_checksums()},
          {"blobs", blobs},
          {"tokenizer", tokenizer_json(art)},
          {"qk_clip", qk_clip_json(m)},
          {"adapters", adapters},
          {"adapter_bytes", adapter_bytes},
          {"provenance",
           {{"exporter_version", pv.exporter_version},
            {"created_utc", pv.created_utc},
            {"sources", sources},
            {"config_source", pv.config_source},
            {"key_layout", pv.key_layout},
            {"scanned", pv.scanned},
            {"scan_axis", pv.scan_axis},
            {"options", options},
            {"nonfinite_nan", pv.nonfinite_nan},
            {"nonfinite_inf", pv.nonfinite_inf}}}};
}

}  // namespace kiln
