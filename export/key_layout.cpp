#include "export/key_layout.h"

#include <charconv>
#include <cstddef>

#include "common/error.h"

namespace kiln {

namespace {

bool is_lora_leaf_head(std::string_view s) {
  return s == "lora_a" || s == "lora_b";
}

std::vector<std::string> split_on(std::string_view raw, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    size_t p = raw.find(sep, start);
    out.emplace_back(raw.substr(start, p == std::string_view::npos ? p : p - start));
    if (p == std::string_view::npos) break;
    start = p + 1;
  }
  return out;
}

// JAX keystr form, e.g. `['model']['decoder']['layers']['kernel'].value` or
// `.params['params']['decoder']`: `['name']`, `["name"]`, `[0]` and `.attr` tokens. Returns an
// empty vector if the text is not well formed, so the key is then reported as unrecognised.
std::vector<std::string> split_keystr(std::string_view raw) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < raw.size()) {
    if (raw[i] == '[') {
      size_t close;
      if (i + 1 < raw.size() && (raw[i + 1] == '\'' || raw[i + 1] == '"')) {
        const char q = raw[i + 1];
        size_t end = raw.find(q, i + 2);
        if (end == std::string_view::npos || end + 1 >= raw.size() || raw[end + 1] != ']')
          return {};
        out.emplace_back(raw.substr(i + 2, end - i - 2));
        close = end + 1;
      } else {
        close = raw.find(']', i);
        if (close == std::string_view::npos) return {};
        out.emplace_back(raw.substr(i + 1, close - i - 1));
      }
      i = close + 1;
    } else if (raw[i] == '.') {
      size_t end = raw.find_first_of(".[", i + 1);
      if (end == std::string_view::npos) end = raw.size();
      out.emplace_back(raw.substr(i + 1, end - i - 1));
      i = end;
    } else {
      return {};
    }
  }
  return out;
}

bool has_empty_component(const std::vector<std::string>& c) {
  for (const std::string& s : c)
    if (s.empty()) return true;
  return false;
}

enum class KeyKind { Linen, Nnx, NonParameter, Unknown };

struct Classified {
  KeyKind kind = KeyKind::Unknown;
  std::vector<std::string> rest;  // the canonical components (Linen / Nnx only)
};

// Top-level entries that exist in training checkpoints of both layouts (the pure_nnx training
// checkpoint is written in the Linen layout but adds `nnx_aux`; the in-memory NNX train state has
// `optimizer`) and never hold model parameters.
bool is_non_parameter_root(std::string_view s) {
  return s == "opt_state" || s == "step" || s == "nnx_aux" || s == "optimizer";
}

Classified classify(std::string_view raw) {
  std::vector<std::string> c = split_key(raw);
  Classified out;
  if (c.empty() || has_empty_component(c)) return out;
  if (is_non_parameter_root(c[0])) {
    out.kind = KeyKind::NonParameter;
    return out;
  }
  if (c[0] == "params") {
    if (c.size() > 2 && c[1] == "params") {
      out.kind = KeyKind::Linen;
      out.rest.assign(c.begin() + 2, c.end());
    }
    return out;
  }
  // NNX: the in-memory train state (`model/…`), the RL variant (`base/…`) or a decode checkpoint
  // whose roots are the model's own attributes. A decode checkpoint wraps every leaf as
  // {"value": array}; other attribute roots (e.g. `mtp_block`) are recognised by that leaf.
  // `model/…` alone is not enough: Hugging Face keys (`model.layers.0…`) start the same way.
  const size_t skip = (c[0] == "model" || c[0] == "base") ? 1 : 0;
  if (c.size() <= skip) return out;
  std::vector<std::string> rest(c.begin() + std::ptrdiff_t(skip), c.end());
  const bool value_leaf = rest.size() >= 2 && rest.back() == "value";
  if (value_leaf) rest.pop_back();
  const bool attr_root = rest[0] == "decoder" || rest[0] == "token_embedder";
  if (!(attr_root || value_leaf) || rest.size() < 2) return out;
  out.kind = KeyKind::Nnx;
  out.rest = std::move(rest);
  return out;
}

std::string join(const std::vector<std::string>& c) {
  std::string s;
  for (size_t i = 0; i < c.size(); ++i) s += (i ? "/" : "") + c[i];
  return s;
}

std::string examples(const std::vector<std::string>& keys, size_t total) {
  std::string s;
  for (size_t i = 0; i < keys.size(); ++i) s += (i ? ", '" : "'") + keys[i] + "'";
  if (total > keys.size()) s += " (and " + std::to_string(total - keys.size()) + " more)";
  return s;
}

}  // namespace

std::string_view key_layout_name(KeyLayout l) {
  return l == KeyLayout::MaxTextLinen ? "maxtext-linen" : "maxtext-nnx";
}

std::vector<std::string> split_key(std::string_view raw) {
  if (raw.empty()) return {};
  if (raw.front() == '[' || (raw.front() == '.' && raw.find('[') != std::string_view::npos))
    return split_keystr(raw);
  if (raw.find('/') != std::string_view::npos) return split_on(raw, '/');
  std::vector<std::string> parts = split_on(raw, '.');
  // "lora_a.kernel" is a single leaf name in MaxText's LoRA tree, not two levels.
  std::vector<std::string> out;
  out.reserve(parts.size());
  for (size_t i = 0; i < parts.size(); ++i) {
    if (is_lora_leaf_head(parts[i]) && i + 1 < parts.size() && parts[i + 1] == "kernel") {
      out.push_back(parts[i] + ".kernel");
      ++i;
    } else {
      out.push_back(std::move(parts[i]));
    }
  }
  return out;
}

KeyLayout detect_key_layout(const std::vector<std::string>& raw_keys, const std::string& where) {
  constexpr size_t kExamples = 3;
  std::vector<std::string> linen, nnx, unknown;
  size_t n_linen = 0, n_nnx = 0, n_unknown = 0;
  for (const std::string& k : raw_keys) {
    switch (classify(k).kind) {
      case KeyKind::Linen:
        if (n_linen++ < kExamples) linen.push_back(k);
        break;
      case KeyKind::Nnx:
        if (n_nnx++ < kExamples) nnx.push_back(k);
        break;
      case KeyKind::Unknown:
        if (n_unknown++ < kExamples) unknown.push_back(k);
        break;
      case KeyKind::NonParameter:
        break;
    }
  }
  if (n_unknown > 0) {
    const std::string& k = unknown.front();
    const bool hf = k == "lm_head.weight" || k.starts_with("model.layers.") ||
                    k.starts_with("model.embed_tokens.") || k == "model.norm.weight";
    throw Error(
        where + ": " + std::to_string(n_unknown) +
        " key(s) match no known layout (expected MaxText Linen 'params/params/decoder/…' "
        "or NNX 'model/decoder/…', 'decoder/…[/value]'): " +
        examples(unknown, n_unknown) +
        (hf ? "; this looks like a Hugging Face checkpoint, convert it to MaxText first" : ""));
  }
  if (n_linen > 0 && n_nnx > 0)
    throw Error(where + ": keys mix the MaxText Linen layout (" + examples(linen, n_linen) +
                ") and the NNX layout (" + examples(nnx, n_nnx) + ")");
  if (n_linen > 0) return KeyLayout::MaxTextLinen;
  if (n_nnx > 0) return KeyLayout::MaxTextNnx;
  throw Error(where + ": no model parameters found among " + std::to_string(raw_keys.size()) +
              " key(s) (only optimizer state / step / nnx_aux entries)");
}

std::optional<std::string> canonical_key(std::string_view raw, KeyLayout layout) {
  Classified c = classify(raw);
  if (c.kind == KeyKind::NonParameter) return std::nullopt;
  const KeyKind want = layout == KeyLayout::MaxTextLinen ? KeyKind::Linen : KeyKind::Nnx;
  if (c.kind != want)
    throw Error("key '" + std::string(raw) + "' does not fit the " +
                std::string(key_layout_name(layout)) + " layout detected for this checkpoint");
  return join(c.rest);
}

std::optional<int64_t> unrolled_layer_index(std::string_view component, std::string_view group) {
  if (component.size() <= group.size() + 1 || !component.starts_with(group) ||
      component[group.size()] != '_')
    return std::nullopt;
  const std::string_view digits = component.substr(group.size() + 1);
  int64_t n = 0;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), n);
  if (ec != std::errc() || end != digits.data() + digits.size() || digits.front() == '-')
    return std::nullopt;
  return n;
}

std::vector<GroupSpan> layer_groups(const ModelConfig& c) {
  if (!c.is_deepseek()) return {{"layers", 0, c.num_decoder_layers}};
  return {
      {"dense_layers", 0, c.first_num_dense_layers},
      {"moe_layers", c.first_num_dense_layers, c.num_decoder_layers - c.first_num_dense_layers}};
}

}  // namespace kiln
