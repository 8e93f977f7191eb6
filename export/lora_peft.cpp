// PEFT's adapter format: adapter_config.json + adapter_model.safetensors with Hugging Face module
// names, turned into MaxText's orientation and layout (docs/maxtext.md §10.1, §10.2).
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <optional>
#include <regex>
#include <string_view>

#include "export/lora_reader.h"

namespace kiln {

namespace fs = std::filesystem;
using namespace lora_detail;

namespace {

// HF module (relative to `model.layers.N.`) → canonical tensor (docs/maxtext.md §10.1, §10.2).
struct HfModule {
  const char* hf;
  const char* tensor;
};
constexpr HfModule kLlamaHfModules[] = {
    {"self_attn.q_proj", "attn.q"}, {"self_attn.k_proj", "attn.k"}, {"self_attn.v_proj", "attn.v"},
    {"self_attn.o_proj", "attn.o"}, {"mlp.gate_proj", "mlp.wi_0"},  {"mlp.up_proj", "mlp.wi_1"},
    {"mlp.down_proj", "mlp.wo"},
};
constexpr HfModule kDeepSeekHfModules[] = {
    {"self_attn.q_a_proj", "attn.wq_a"},   {"self_attn.q_b_proj", "attn.wq_b"},
    {"self_attn.q_proj", "attn.query"},    {"self_attn.kv_a_proj_with_mqa", "attn.wkv_a"},
    {"self_attn.kv_b_proj", "attn.wkv_b"}, {"self_attn.o_proj", "attn.o"},
    {"mlp.gate_proj", "mlp.wi_0"},         {"mlp.up_proj", "mlp.wi_1"},
    {"mlp.down_proj", "mlp.wo"},
};

// A rank_pattern / alpha_pattern entry: PEFT applies pattern P to module M when
// re.match(rf"(.*\.)?({P})$", M) holds; the first matching key in file order wins.
struct ModulePattern {
  std::string key;
  std::regex re;
  double value = 0;
};

std::vector<ModulePattern> read_patterns(const AdapterConfig& cfg, const std::string& key,
                                         bool integer) {
  std::vector<ModulePattern> out;
  if (!cfg.has(key)) return out;
  const ordered_json& obj = cfg.json()[key];
  if (!obj.is_object())
    throw cfg.error(key, "is " + obj.dump() + ", expected an object {module pattern: value}");
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    const ordered_json& v = it.value();
    const bool ok = integer ? v.is_number_integer() && v.get<int64_t>() > 0
                            : v.is_number() && std::isfinite(v.get<double>());
    if (!ok)
      throw cfg.error(key, "entry '" + it.key() + "' is " + v.dump() + ", expected " +
                               (integer ? "a positive integer" : "a number"));
    try {
      out.push_back({it.key(), std::regex("(.*\\.)?(" + it.key() + ")"), v.get<double>()});
    } catch (const std::regex_error&) {
      throw cfg.error(key, "entry '" + it.key() + "' is not a valid regular expression");
    }
  }
  return out;
}

const ModulePattern* matching_pattern(const std::vector<ModulePattern>& patterns,
                                      const std::string& module) {
  for (const ModulePattern& p : patterns)
    if (std::regex_match(module, p.re)) return &p;
  return nullptr;
}

// --- transforms ----------------------------------------------------------------------------------

// dst [cols, rows] = srcᵀ for src [rows, cols].
void transpose(const float* src, int64_t rows, int64_t cols, float* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}

// HF stores q/k heads half-split ([x_0 … x_{D/2-1} | y_0 …]); llama3.1 in MaxText pairs them
// (x_0, y_0, x_1, y_1, …). The base converter permutes the kernel's output columns per head the
// same way (docs/maxtext.md §10.1): new[2j] = old[j], new[2j+1] = old[j + D/2].
void interleave_heads(std::vector<float>& b, int64_t rank, int64_t out, int64_t D) {
  std::vector<float> head(size_t(D), 0.0f);
  const int64_t half = D / 2;
  for (int64_t k = 0; k < rank; ++k)
    for (int64_t h = 0; h < out / D; ++h) {
      float* col = b.data() + k * out + h * D;
      std::copy(col, col + D, head.begin());
      for (int64_t j = 0; j < half; ++j) {
        col[2 * j] = head[size_t(j)];
        col[2 * j + 1] = head[size_t(j + half)];
      }
    }
}

bool is_llama_scaled_query_block(const ModelConfig& c) {
  return c.decoder_block == "llama2" || c.decoder_block == "mistral";
}

}  // namespace

void AdapterSource::Impl::open_peft(const AdapterConfig& cfg) {
  // Features that change what the adapter computes: refused, never dropped silently.
  if (cfg.has("peft_type")) {
    const ordered_json& v = cfg.json()["peft_type"];
    if (!v.is_string() || v.get<std::string>() != "LORA")
      throw cfg.error("peft_type", "is " + v.dump() + "; only LORA adapters are supported");
  }
  if (cfg.flag("use_dora"))
    throw cfg.error("use_dora", "is true: DoRA (use_dora) is not supported");
  if (cfg.has("modules_to_save")) {
    const ordered_json& v = cfg.json()["modules_to_save"];
    if (!v.is_array() || !v.empty())
      throw cfg.error("modules_to_save", "is " + v.dump() +
                                             ": fully trained modules (modules_to_save) are not "
                                             "supported");
  }
  if (cfg.has("bias")) {
    const ordered_json& v = cfg.json()["bias"];
    if (!v.is_string() || v.get<std::string>() != "none")
      throw cfg.error("bias",
                      "is " + v.dump() + ": bias training is not supported (expected \"none\")");
  }
  if (cfg.flag("lora_bias"))
    throw cfg.error("lora_bias", "is true: a bias on lora_B (lora_bias) is not supported");
  if (cfg.flag("fan_in_fan_out"))
    throw cfg.error("fan_in_fan_out",
                    "is true: fan_in_fan_out (Conv1D-style) weights are not "
                    "supported");
  if (cfg.has("layer_replication"))
    throw cfg.error("layer_replication", "is set: layer_replication is not supported");
  for (const char* key : {"target_parameters", "trainable_token_indices"}) {
    if (!cfg.has(key)) continue;
    const ordered_json& v = cfg.json()[key];
    if ((v.is_array() || v.is_object()) && v.empty()) continue;
    throw cfg.error(key, "is " + v.dump() + ": " + key + " is not supported");
  }

  rank = cfg.positive_int("r");
  alpha = cfg.number("lora_alpha");
  rslora = cfg.flag("use_rslora");
  const std::vector<ModulePattern> rank_pattern = read_patterns(cfg, "rank_pattern", true);
  const std::vector<ModulePattern> alpha_pattern = read_patterns(cfg, "alpha_pattern", false);

  // target_modules: a list (a module matches an entry equal to its name or to a trailing run of
  // its dotted components) or a regex on the whole module name, as PEFT matches them.
  const ordered_json& tm = cfg.required("target_modules", "a list of module names or a regex");
  std::vector<std::string> tm_list;
  std::optional<std::regex> tm_regex;
  bool all_linear = false;
  if (tm.is_string()) {
    // PEFT resolves "all-linear" to the model's linear layers before saving; a config that still
    // says so covers every projection.
    all_linear = tm.get<std::string>() == "all-linear";
    try {
      tm_regex.emplace(tm.get<std::string>());
    } catch (const std::regex_error&) {
      throw cfg.error("target_modules", "is " + tm.dump() + ", not a valid regular expression");
    }
  } else if (tm.is_array()) {
    for (const ordered_json& e : tm) {
      if (!e.is_string())
        throw cfg.error("target_modules", "holds " + e.dump() + ", expected module name strings");
      const std::string name = e.get<std::string>();
      // An adapter trained with these holds embedding / output-head deltas; refuse it by its config
      // even when those tensors are missing from the file, rather than run half an adapter.
      if (name == "embed_tokens" || name == "lm_head" || name.ends_with(".embed_tokens") ||
          name.ends_with(".lm_head"))
        throw cfg.error("target_modules",
                        "entry '" + name + "': LoRA on embed_tokens / lm_head is not supported");
      tm_list.push_back(name);
    }
  } else {
    throw cfg.error("target_modules",
                    "is " + tm.dump() + ", expected a list of module names or a regex string");
  }
  auto covered = [&](const std::string& module) {
    if (all_linear) return true;
    if (tm_regex) return std::regex_match(module, *tm_regex);
    return std::any_of(tm_list.begin(), tm_list.end(), [&](const std::string& e) {
      return module == e || module.ends_with("." + e);
    });
  };

  const fs::path weights_path = fs::path(dir) / "adapter_model.safetensors";
  std::error_code ec;
  if (!fs::exists(weights_path, ec)) {
    const bool bin = fs::exists(fs::path(dir) / "adapter_model.bin", ec);
    throw Error(
        weights_path.string() + ": not found" +
        (bin ? " (adapter_model.bin, a pickle, is not supported; save the adapter with "
               "safe_serialization)"
             : " (a PEFT adapter holds adapter_config.json and adapter_model.safetensors)"));
  }
  weights = Checkpoint::open({weights_path.string()});
  const std::string where = weights_path.string();
  if (weights.tensors().empty()) throw Error(where + ": the adapter holds no LoRA tensors");

  const bool deepseek = base.is_deepseek();
  struct Pair {
    std::string module;  // model.layers.N.<hf module>
    int layer = 0;
    std::string tensor;
    const SourceTensor* a = nullptr;
    const SourceTensor* b = nullptr;
  };
  std::map<std::pair<int, std::string>, Pair> pairs;
  constexpr std::string_view kPrefix = "base_model.model.";
  constexpr std::string_view kLayers = "model.layers.";
  constexpr std::string_view kA = ".lora_A.weight", kB = ".lora_B.weight";
  const std::string expected_form =
      "expected 'base_model.model.model.layers.N.<module>.lora_A.weight' / '.lora_B.weight'";
  for (const SourceTensor& t : weights.tensors()) {
    const std::string& key = t.key;
    const std::string at = where + ": key '" + key + "'";
    if (key.find("lora_embedding_A") != std::string::npos ||
        key.find("lora_embedding_B") != std::string::npos)
      throw Error(at + ": embedding LoRA (lora_embedding_A/B) is not supported");
    if (key.find("lora_magnitude_vector") != std::string::npos)
      throw Error(at + ": DoRA (lora_magnitude_vector) is not supported");
    if (key.find("embed_tokens") != std::string::npos || key.find("lm_head") != std::string::npos)
      throw Error(at + ": LoRA on embed_tokens / lm_head is not supported");
    if (key.ends_with(".bias"))
      throw Error(at + ": bias tensors (bias training, lora_bias) are not supported");
    const bool is_a = key.ends_with(kA), is_b = key.ends_with(kB);
    if (!key.starts_with(kPrefix) || !(is_a || is_b))
      throw Error(at + " is not a LoRA tensor of the expected form (" + expected_form + ")");
    const std::string module =
        key.substr(kPrefix.size(), key.size() - kPrefix.size() - (is_a ? kA : kB).size());
    size_t dot = std::string::npos;
    if (module.starts_with(kLayers)) dot = module.find('.', kLayers.size());
    const std::string num =
        dot == std::string::npos ? "" : module.substr(kLayers.size(), dot - kLayers.size());
    if (num.empty() || num.size() > 9 || num.find_first_not_of("0123456789") != std::string::npos)
      throw Error(at + " is not a LoRA tensor of the expected form (" + expected_form + ")");
    const int layer = std::stoi(num);
    const std::string sub = module.substr(dot + 1);
    if (sub.starts_with("mlp.experts.") || sub.starts_with("mlp.shared_experts.") ||
        sub == "mlp.gate" || sub.starts_with("mlp.gate."))
      throw Error(at + ": LoRA on MoE experts is not supported (module '" + sub + "')");
    if (layer >= base.num_decoder_layers)
      throw Error(at + ": layer " + std::to_string(layer) +
                  " is out of range: the base config has " +
                  std::to_string(base.num_decoder_layers) + " layers (layer count mismatch)");
    std::optional<std::string> tensor;
    auto lookup = [&](const auto& table) {
      for (const HfModule& m : table)
        if (sub == m.hf) tensor = m.tensor;
    };
    if (deepseek)
      lookup(kDeepSeekHfModules);
    else
      lookup(kLlamaHfModules);
    const std::vector<std::string> allowed = lora_target_tensors(base, layer);
    if (!tensor || std::find(allowed.begin(), allowed.end(), *tensor) == allowed.end()) {
      // The HF names of this layer's targets, for the message.
      std::vector<std::string> names;
      auto collect = [&](const auto& table) {
        for (const std::string& a : allowed)
          for (const HfModule& m : table)
            if (a == m.tensor) names.push_back(m.hf);
      };
      if (deepseek)
        collect(kDeepSeekHfModules);
      else
        collect(kLlamaHfModules);
      throw Error(at + ": unknown target '" + sub + "' (LoRA targets of layer " +
                  std::to_string(layer) + " in a " + base.decoder_block +
                  " model: " + join(names, ", ") + ")");
    }
    if (!covered(module))
      throw Error(at + ": unknown target '" + module + "': not covered by target_modules " +
                  tm.dump() + " of " + cfg.path());
    Pair& p = pairs[{layer, *tensor}];
    p.module = module;
    p.layer = layer;
    p.tensor = *tensor;
    (is_a ? p.a : p.b) = &t;
  }

  for (const auto& [key, p] : pairs) {
    if (!p.a || !p.b) {
      const SourceTensor& have = p.a ? *p.a : *p.b;
      throw Error(where + ": key '" + have.key + "' has no matching '" +
                  std::string(p.a ? "lora_B" : "lora_A") + ".weight' for module '" + p.module +
                  "' (a LoRA pair needs both A and B)");
    }
    const SourceTensor& a = *p.a;
    const SourceTensor& b = *p.b;
    if (a.shape.size() != 2 || b.shape.size() != 2 || a.shape[0] != b.shape[1])
      throw Error(where + ": rank mismatch between A and B: key '" + a.key + "' has shape " +
                  shape_to_string(a.shape) + " ([r, in]), key '" + b.key + "' has shape " +
                  shape_to_string(b.shape) + " ([out, r])");
    int64_t r = rank;
    std::string r_from = "r";
    if (const ModulePattern* m = matching_pattern(rank_pattern, p.module)) {
      r = int64_t(m->value);
      r_from = "rank_pattern '" + m->key + "'";
    }
    double a_value = alpha;
    if (const ModulePattern* m = matching_pattern(alpha_pattern, p.module)) a_value = m->value;
    const auto [in, out] = lora_in_out(base, p.tensor);
    const std::string what = "layer " + std::to_string(p.layer) + " " + p.tensor;
    const std::string rank_note =
        ", r = " + std::to_string(r) + (r_from == "r" ? "" : " from " + r_from) + ")";
    if (a.shape != std::vector<int64_t>{r, in})
      throw Error(where + ": key '" + a.key + "' has shape " + shape_to_string(a.shape) +
                  ", expected " + shape_to_string({r, in}) + " (" + what +
                  ": in = " + std::to_string(in) + rank_note);
    if (b.shape != std::vector<int64_t>{out, r})
      throw Error(where + ": key '" + b.key + "' has shape " + shape_to_string(b.shape) +
                  ", expected " + shape_to_string({out, r}) + " (" + what +
                  ": out = " + std::to_string(out) + rank_note);
    PendingPair pp;
    const double s = rslora ? a_value / std::sqrt(double(r)) : a_value / double(r);
    pp.info = {p.layer, p.tensor, r, s * user_scale, a.key, b.key};
    pp.src = {&a, &b, false, 0};
    add(std::move(pp));
  }
  finish(where);
}

void AdapterSource::Impl::read_peft(const PairSource& src, const LoraTargetInfo& info,
                                    const std::string& tensor, LoraDelta& d) const {
  const ModelConfig& c = base;
  const int64_t in = d.in, out = d.out;
  // PEFT: lora_A [r, in], lora_B [out, r] (PyTorch weight orientation) → MaxText A [in, r],
  // B [r, out]; then the base converter's HF → MaxText transforms (docs/maxtext.md §10.1).
  std::vector<float> raw(size_t(std::max(in, out) * d.rank));
  read_as_f32(*src.a, raw.data());
  transpose(raw.data(), d.rank, in, d.a.data());
  read_as_f32(*src.b, raw.data());
  transpose(raw.data(), out, d.rank, d.b.data());
  const bool llama = is_llama_scaled_query_block(c);
  if (llama && c.rope_layout == RopeLayout::Interleaved &&
      (tensor == "attn.q" || tensor == "attn.k")) {
    if (c.head_dim % 2 != 0 || out % c.head_dim != 0)
      throw Error(info.b_key + ": cannot interleave RoPE pairs: head_dim " +
                  std::to_string(c.head_dim) + " is odd or does not divide " + std::to_string(out));
    interleave_heads(d.b, d.rank, out, c.head_dim);
  }
  if (llama && tensor == "attn.q") {
    // The base converter folds 1/sqrt(head_dim) into the query kernel (in f32); ΔW must carry it
    // too, and scaling B scales A·B.
    const float q_scale = float(1.0 / std::sqrt(double(c.head_dim)));
    for (float& v : d.b) v *= q_scale;
  }
}

}  // namespace kiln
