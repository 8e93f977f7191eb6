#include "export/config_reader.h"

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>
#include <type_traits>

#include "common/error.h"
#include "common/file_io.h"
#include "common/text.h"
#include "export/config_yaml.h"

namespace kiln {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using Entry = ConfigValue;

// Keys in file order; a later occurrence (or an override) replaces the value in place.
class Entries {
 public:
  void set(const std::string& key, Entry e) {
    auto [it, inserted] = pos_.try_emplace(key, items_.size());
    if (inserted) {
      items_.emplace_back(key, std::move(e));
    } else {
      items_[it->second].second = std::move(e);
    }
  }
  const Entry* get(const std::string& key) const {
    auto it = pos_.find(key);
    return it == pos_.end() ? nullptr : &items_[it->second].second;
  }
  const std::vector<std::pair<std::string, Entry>>& items() const { return items_; }

 private:
  std::vector<std::pair<std::string, Entry>> items_;
  std::map<std::string, size_t> pos_;
};

std::string json_text(const json& v) {
  return v.is_string() ? v.get<std::string>() : v.dump();
}

void parse_json_config(const std::string& path, const std::string& content, Entries& out) {
  json j;
  try {
    j = json::parse(content);
  } catch (const json::exception& e) {  // a syntax error, or a number that does not fit (1e999)
    std::string what = e.what();
    if (auto p = what.find("] "); p != std::string::npos && what.starts_with("[json.exception"))
      what = what.substr(p + 2);
    for (char& c : what)
      if (c == '\n' || c == '\r') c = ' ';
    const auto* syntax = dynamic_cast<const json::parse_error*>(&e);
    throw Error(path + ": malformed JSON" +
                (syntax ? " at byte " + std::to_string(syntax->byte) : std::string()) + ": " +
                what);
  }
  if (!j.is_object())
    throw Error(path + ": expected a JSON object of MaxText config fields, got a " +
                std::string(j.type_name()));
  for (auto it = j.begin(); it != j.end(); ++it)
    out.set(it.key(), Entry{it.value(), json_text(it.value()), path});
}

bool looks_like_yaml(const std::string& path, const std::string& content) {
  const std::string ext = to_lower(fs::path(path).extension().string());
  if (ext == ".yml" || ext == ".yaml") return true;
  if (ext == ".json") return false;
  std::string_view t = trim(content);
  return t.empty() || t.front() != '{';
}

// ---- typed access --------------------------------------------------------------------------

class Fields {
 public:
  Fields(const std::string& path, const Entries& e) : path_(path), e_(e) {}

  // Present and not null.
  const Entry* find(const std::string& key) const {
    const Entry* e = e_.get(key);
    return e && !e->value.is_null() ? e : nullptr;
  }

  [[noreturn]] void type_error(const std::string& key, const Entry& e, const char* expected) const {
    std::string origin = e.origin.starts_with("--set") ? path_ + ": " + e.origin : e.origin;
    throw Error(origin + ": key '" + key + "' has value '" + e.text + "', expected " + expected);
  }

  std::optional<int64_t> get_int(const std::string& key) const {
    const Entry* e = find(key);
    if (!e) return std::nullopt;
    if (!e->value.is_number_integer()) type_error(key, *e, "an integer");
    if (e->value.is_number_unsigned() && e->value.get<uint64_t>() > uint64_t(INT64_MAX))
      type_error(key, *e, "an integer that fits in 64 bits");
    return e->value.get<int64_t>();
  }
  std::optional<double> get_double(const std::string& key) const {
    const Entry* e = find(key);
    if (!e) return std::nullopt;
    if (!e->value.is_number()) type_error(key, *e, "a number");
    return e->value.get<double>();
  }
  std::optional<bool> get_bool(const std::string& key) const {
    const Entry* e = find(key);
    if (!e) return std::nullopt;
    if (!e->value.is_boolean()) type_error(key, *e, "true or false");
    return e->value.get<bool>();
  }
  std::optional<std::string> get_string(const std::string& key) const {
    const Entry* e = find(key);
    if (!e) return std::nullopt;
    if (!e->value.is_string()) type_error(key, *e, "a string");
    return e->value.get<std::string>();
  }

  template <class T>
  std::optional<T> get(const std::string& key) const {
    if constexpr (std::is_same_v<T, int64_t>) {
      return get_int(key);
    } else if constexpr (std::is_same_v<T, double>) {
      return get_double(key);
    } else if constexpr (std::is_same_v<T, bool>) {
      return get_bool(key);
    } else {
      static_assert(std::is_same_v<T, std::string>, "a ModelConfig field of a type no key has");
      return get_string(key);
    }
  }

  // MaxText derives `emb_dim` from `base_emb_dim` (× global_parameter_scale, which must be 1
  // here); a JSON config may give either name. Both with different values is ambiguous.
  std::optional<int64_t> get_dim(const std::string& key) const {
    std::optional<int64_t> plain = get_int(key), base = get_int("base_" + key);
    if (plain && base && *plain != *base)
      throw Error(path_ + ": '" + key + "' (" + std::to_string(*plain) + ") and 'base_" + key +
                  "' (" + std::to_string(*base) + ") disagree; give one of them");
    return plain ? plain : base;
  }

 private:
  const std::string& path_;
  const Entries& e_;
};

// What MLA, MoE and YaRN derive from the keys (docs/maxtext.md §2.3c, §2.5, §2.7, §9). The keys
// themselves were read with MaxText base.yml's defaults; a default that does not match the
// checkpoint shows up as a missing or unknown tensor at export.
void derive_deepseek_fields(const std::string& path, const Fields& f, ModelConfig& m) {
  // MLA: one kv head per query head.
  if (!f.find("num_kv_heads") && !f.find("base_num_kv_heads")) m.num_kv_heads = m.num_query_heads;
  if (__builtin_add_overflow(m.qk_nope_head_dim, m.qk_rope_head_dim, &m.head_dim))
    throw Error(path + ": qk_nope_head_dim + qk_rope_head_dim does not fit in 64 bits");
  m.routing_weights_pre_bias =
      m.model_name.starts_with("deepseek3") || m.model_name.starts_with("deepseek4");

  const std::string rope_type = f.get_string("rope_type").value_or("yarn");
  if (!rope_type.starts_with("yarn"))
    throw Error(path + ": rope_type '" + rope_type +
                "' is not supported for decoder_block deepseek (expected yarn)");
  m.rope_layout = RopeLayout::Yarn;
  if (f.get_bool("rope_attention_scaling").value_or(false))
    throw Error(path +
                ": rope_attention_scaling: true is not supported (MaxText's DeepSeek "
                "configs keep it false and put mscale into the softmax scale)");
  // docs/maxtext.md §2.5 step 3: Dqk^-0.5, times (0.1·mscale·ln(factor) + 1)² when the context is
  // extended.
  double s = 1.0 / std::sqrt(double(m.head_dim));
  if (m.max_position_embeddings > m.original_max_position_embeddings) {
    double mf = 0.1 * m.mscale * std::log(m.rope_factor) + 1.0;
    s *= mf * mf;
  }
  m.query_scale = s;
}

}  // namespace

ExportConfig read_export_config(const std::string& path,
                                const std::vector<std::pair<std::string, std::string>>& overrides) {
  const std::string content = read_whole_file(path);
  const bool yaml = looks_like_yaml(path, content);
  Entries entries;
  if (yaml) {
    parse_config_yaml(path, content,
                      [&](const std::string& key, Entry e) { entries.set(key, std::move(e)); });
  } else {
    parse_json_config(path, content, entries);
  }
  for (const auto& [k, v] : overrides) {
    const std::string key(trim(k));
    if (key.empty()) throw Error(path + ": --set '" + k + "=" + v + "' has an empty key");
    json value = parse_config_scalar(v);
    std::string text = value.is_string() ? value.get<std::string>() : std::string(trim(v));
    entries.set(key, Entry{std::move(value), std::move(text), "--set " + key + "=" + v});
  }

  const Fields f(path, entries);
  ExportConfig cfg;
  for (const auto& [k, e] : entries.items()) cfg.raw.emplace_back(k, e.text);
  ModelConfig& m = cfg.model;

  // Which fields' keys are read, and which must be given, follows decoder_block.
  const std::optional<std::string> block = f.get_string("decoder_block");
  const bool deepseek = block && *block == "deepseek";
  auto applies = [&](FieldFamily family) { return family != FieldFamily::DeepSeek || deepseek; };
  auto given = [&](const std::string& key, bool base_name) {
    return f.find(key) || (base_name && f.find("base_" + key));
  };
  visit_fields(m, [&]<class T>(const char* name, T& value, const FieldMeta<T>& meta) {
    if (meta.source == FieldSource::Derived || !applies(meta.family)) return;
    if constexpr (!std::is_enum_v<T>) {  // enums are derived (RoPE layout)
      std::optional<T> v;
      if constexpr (std::is_same_v<T, int64_t>)
        v = meta.base_name ? f.get_dim(name) : f.get_int(name);
      else
        v = f.get<T>(name);
      if (v) {
        value = *v;
      } else if (meta.source == FieldSource::Optional) {
        value = meta.maxtext;
      }
    }
  });

  const bool dense_layers = !deepseek || m.first_num_dense_layers > 0;
  const bool moe_layers = deepseek && m.num_decoder_layers > m.first_num_dense_layers;
  std::vector<std::string> missing;
  visit_fields(m, [&](const char* name, auto& value, const auto& meta) {
    if (!applies(meta.family)) return;
    const FieldSource s = meta.source;
    if ((s == FieldSource::DenseDim && !dense_layers) ||
        (s == FieldSource::MoeDim && !moe_layers)) {
      value = meta.maxtext;
      return;
    }
    const bool required = s == FieldSource::Required || s == FieldSource::DenseDim ||
                          s == FieldSource::MoeDim ||
                          (s == FieldSource::RequiredLlama && !deepseek) ||
                          (s == FieldSource::RequiredMoe && moe_layers);
    if (required && !given(name, meta.base_name))
      missing.push_back(meta.base_name ? std::string(name) + " (or base_" + name + ")" : name);
  });
  if (!missing.empty()) {
    std::string list;
    for (size_t i = 0; i < missing.size(); ++i) list += (i ? ", " : "") + missing[i];
    throw Error(path + ": missing required field" + (missing.size() > 1 ? "s: " : ": ") + list);
  }

  if (m.decoder_block != "llama2" && m.decoder_block != "mistral" && m.decoder_block != "qwen3" &&
      !deepseek)
    throw Error(path + ": decoder_block '" + m.decoder_block +
                "' is not supported (supported: llama2, mistral, qwen3, deepseek)");
  const bool qwen3 = m.decoder_block == "qwen3";

  // MaxText picks the model file by model_name (configs/models/<model_name>.yml), and the RoPE
  // variant depends on the name; a model YAML read on its own therefore stands for its stem.
  if (!f.find("model_name") && yaml) m.model_name = fs::path(path).stem().string();
  if (qwen3 && !f.find("use_qk_norm")) m.use_qk_norm = true;

  if (auto v = f.get_double("global_parameter_scale"); v && *v != 1.0)
    throw Error(path + ": global_parameter_scale " + entries.get("global_parameter_scale")->text +
                " is not supported (only 1)");
  if (const Entry* e = f.find("mlp_activations")) {
    if (e->value != json::array({"silu", "linear"}))
      throw Error(path + ": mlp_activations " + e->text + " is not supported for decoder_block " +
                  m.decoder_block + " (expected [silu, linear])");
  }

  cfg.scan_layers = f.get_bool("scan_layers").value_or(true);
  const int64_t axis = f.get_int("param_scan_axis").value_or(1);
  if (axis < 0 || axis > 1'000'000)
    throw Error(path + ": param_scan_axis " + std::to_string(axis) +
                " is out of range (expected a non-negative axis index)");
  cfg.param_scan_axis = int(axis);

  if (deepseek) {
    derive_deepseek_fields(path, f, m);
    m.validate(path);
    return cfg;
  }

  // Same selection order as MaxText's init_rotary_embedding: the llama3.1 name test comes first.
  const std::string rope_type = f.get_string("rope_type").value_or("default");
  if (m.model_name.starts_with("llama3.1") || rope_type.starts_with("llama3.1")) {
    m.rope_layout = RopeLayout::Interleaved;
  } else if (rope_type.starts_with("yarn")) {
    throw Error(path + ": rope_type '" + rope_type +
                "' (YaRN) is not supported for decoder_block " + m.decoder_block +
                " (supported: default, llama3.1)");
  } else if (rope_type == "default") {
    m.rope_layout = RopeLayout::HalfSplit;
  } else {
    throw Error(path + ": rope_type '" + rope_type +
                "' is not supported (supported: default, llama3.1)");
  }

  // llama2/mistral checkpoints carry 1/sqrt(head_dim) inside the query kernel (docs/maxtext.md
  // §2.2); qwen3 applies it at run time.
  m.query_scale = qwen3 && m.head_dim > 0 ? 1.0 / std::sqrt(double(m.head_dim)) : 1.0;

  m.validate(path);
  return cfg;
}

}  // namespace kiln
