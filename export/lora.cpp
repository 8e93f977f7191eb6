#include "export/lora.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>
#include <string_view>

#include "common/error.h"
#include "common/file_io.h"
#include "export/key_layout.h"
#include "export/param_names.h"
#include "export/safetensors.h"
#include "schema/blob_file.h"

namespace kiln {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

const char* adapter_format_name(AdapterFormat f) {
  return f == AdapterFormat::MaxText ? "maxtext" : "peft";
}

namespace {

// The projections LoRA may adapt (docs/maxtext.md §4.2's default module set, and the MLA
// projections for DeepSeek). Norms, the router and the experts carry no adapter.
constexpr std::string_view kLlamaTargets[] = {"attn.q",   "attn.k",   "attn.v", "attn.o",
                                              "mlp.wi_0", "mlp.wi_1", "mlp.wo"};
constexpr std::string_view kDeepSeekTargets[] = {"attn.wq_a",  "attn.wq_b",  "attn.query",
                                                 "attn.wkv_a", "attn.wkv_b", "attn.o",
                                                 "mlp.wi_0",   "mlp.wi_1",   "mlp.wo"};

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

constexpr std::string_view kLoraA = "lora_a.kernel";
constexpr std::string_view kLoraB = "lora_b.kernel";

// attn.o [H, D, E] takes both head axes as input; every other targetable kernel has one.
size_t input_axes(const std::string& tensor) {
  return tensor == "attn.o" ? 2 : 1;
}

int64_t product(const std::vector<int64_t>& s, size_t begin, size_t end) {
  int64_t n = 1;
  for (size_t i = begin; i < end; ++i) n *= s[i];
  return n;
}

std::string join(const std::vector<std::string>& v, const std::string& sep) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + v[i];
  return s;
}

// The MaxText module path of a canonical tensor: its parameter path without the `/kernel` leaf,
// which is where the adapter's `lora_a.kernel` / `lora_b.kernel` leaves sit.
std::string maxtext_module(const ModelConfig& c, const std::string& tensor) {
  std::string p = c.is_deepseek() ? maxtext_path(kDeepSeekLayerNames, tensor)
                                  : maxtext_path(kLlamaLayerNames, tensor);
  constexpr std::string_view kKernel = "/kernel";
  if (p.ends_with(kKernel)) p.resize(p.size() - kKernel.size());
  return p;
}

// The canonical tensor whose module path is `module`, if any.
std::optional<std::string> tensor_of_module(const ModelConfig& c, const std::string& module) {
  auto search = [&](const auto& table) -> std::optional<std::string> {
    for (const NameMapping& m : table)
      if (std::string(m.maxtext) == module + "/kernel") return std::string(m.name);
    return std::nullopt;
  };
  return c.is_deepseek() ? search(kDeepSeekLayerNames) : search(kLlamaLayerNames);
}

// A scanned layer group and the global layers it holds (docs/maxtext.md §1.2, §1.7).
struct GroupSpan {
  std::string name;
  int64_t first_layer = 0;
  int64_t count = 0;
};

std::vector<GroupSpan> layer_groups(const ModelConfig& c) {
  if (!c.is_deepseek()) return {{"layers", 0, c.num_decoder_layers}};
  return {
      {"dense_layers", 0, c.first_num_dense_layers},
      {"moe_layers", c.first_num_dense_layers, c.num_decoder_layers - c.first_num_dense_layers}};
}

// MaxText target_modules matching is on whole trailing path components: `self_attention.query`
// matches `decoder/layers/self_attention/query` but NOT `decoder/layers/self_attention/query_norm`
// (MaxText's own substring test would match the latter, docs/maxtext.md §4.1; kiln does not).
bool matches_trailing_components(const std::string& path, const std::string& entry) {
  if (path == entry) return true;
  return path.size() > entry.size() && path.ends_with(entry) &&
         path[path.size() - entry.size() - 1] == '/';
}

// --- adapter_config.json -------------------------------------------------------------------------

class AdapterConfig {
 public:
  explicit AdapterConfig(std::string path) : path_(std::move(path)) {
    const std::string text = read_whole_file(path_);
    try {
      j_ = ordered_json::parse(text);
    } catch (const ordered_json::exception& e) {  // a syntax error, or a number that does not fit
      std::string what = e.what();
      // Drop nlohmann's "[json.exception.parse_error.101] " tag; keep its description.
      if (auto p = what.find("] "); p != std::string::npos && what.starts_with("[json.exception"))
        what = what.substr(p + 2);
      for (char& ch : what)
        if (ch == '\n' || ch == '\r') ch = ' ';
      throw Error(path_ + ": malformed JSON: " + what);
    }
    if (!j_.is_object()) throw Error(path_ + ": expected a JSON object");
  }

  const std::string& path() const { return path_; }
  const ordered_json& json() const { return j_; }

  // Present and not null.
  bool has(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }

  Error error(const std::string& key, const std::string& what) const {
    return Error(path_ + ": key '" + key + "' " + what);
  }

  const ordered_json& required(const std::string& key, const char* expected) const {
    if (!has(key)) throw error(key, std::string("is missing (expected ") + expected + ")");
    return j_[key];
  }

  int64_t positive_int(const std::string& key) const {
    const ordered_json& v = required(key, "a positive integer");
    if (!v.is_number_integer() || v.get<int64_t>() <= 0)
      throw error(key, "is " + v.dump() + ", expected a positive integer");
    return v.get<int64_t>();
  }

  double number(const std::string& key) const {
    const ordered_json& v = required(key, "a number");
    if (!v.is_number() || !std::isfinite(v.get<double>()))
      throw error(key, "is " + v.dump() + ", expected a number");
    return v.get<double>();
  }

  bool flag(const std::string& key) const {
    if (!has(key)) return false;
    if (!j_[key].is_boolean())
      throw error(key, "is " + j_[key].dump() + ", expected true or false");
    return j_[key].get<bool>();
  }

 private:
  std::string path_;
  ordered_json j_;
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

// --- targets -------------------------------------------------------------------------------------

std::vector<std::string> lora_target_tensors(const ModelConfig& c, int layer) {
  std::vector<std::string> out;
  // layer_tensor_specs already knows which MLA projections and which MLP this layer has, and its
  // order is the artifact order.
  for (const TensorSpec& s : layer_tensor_specs(c, layer)) {
    bool targetable = false;
    if (c.is_deepseek())
      targetable = std::find(std::begin(kDeepSeekTargets), std::end(kDeepSeekTargets), s.name) !=
                   std::end(kDeepSeekTargets);
    else
      targetable = std::find(std::begin(kLlamaTargets), std::end(kLlamaTargets), s.name) !=
                   std::end(kLlamaTargets);
    if (targetable) out.push_back(s.name);
  }
  return out;
}

namespace {

// The unscanned base shape of a targetable tensor, from a layer that has it.
std::optional<std::vector<int64_t>> target_base_shape(const ModelConfig& c,
                                                      const std::string& tensor) {
  std::vector<int> layers = {0};
  if (c.is_deepseek() && c.first_num_dense_layers > 0 &&
      c.first_num_dense_layers < c.num_decoder_layers)
    layers.push_back(int(c.first_num_dense_layers));
  for (int l : layers) {
    std::vector<std::string> t = lora_target_tensors(c, l);
    if (std::find(t.begin(), t.end(), tensor) == t.end()) continue;
    for (const TensorSpec& s : layer_tensor_specs(c, l))
      if (s.name == tensor) return s.shape;
  }
  return std::nullopt;
}

std::vector<std::string> all_target_tensors(const ModelConfig& c) {
  std::vector<std::string> out;
  for (const GroupSpan& g : layer_groups(c)) {
    if (g.count <= 0) continue;
    for (const std::string& t : lora_target_tensors(c, int(g.first_layer)))
      if (std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
  }
  return out;
}

}  // namespace

std::pair<int64_t, int64_t> lora_in_out(const ModelConfig& c, const std::string& tensor) {
  std::optional<std::vector<int64_t>> shape = target_base_shape(c, tensor);
  if (!shape)
    throw Error("tensor '" + tensor + "' cannot carry a LoRA adapter in a " + c.decoder_block +
                " model (LoRA targets: " + join(all_target_tensors(c), ", ") + ")");
  const size_t k = input_axes(tensor);
  return {product(*shape, 0, k), product(*shape, k, shape->size())};
}

// --- the adapter ---------------------------------------------------------------------------------

namespace {

// Where one adapted (layer, tensor) pair lives in the weights.
struct PairSource {
  const SourceTensor* a = nullptr;
  const SourceTensor* b = nullptr;
  bool scanned = false;  // MaxText scanned group: the layer is a slice of axis 1
  int64_t index = 0;     // layer within its group (scanned only)
};

struct PendingPair {
  LoraTargetInfo info;
  PairSource src;
};

std::string file_of(const SourceTensor& t) {
  return t.file ? t.file->path() : "?";
}

}  // namespace

struct AdapterSource::Impl {
  AdapterFormat format = AdapterFormat::MaxText;
  std::string dir;
  ModelConfig base;
  int64_t rank = 0;
  double alpha = 0;
  bool rslora = false;
  double user_scale = 1;
  Checkpoint weights;
  std::vector<LoraTargetInfo> targets;
  std::vector<PairSource> sources;  // parallel to targets
  std::map<std::pair<int, std::string>, size_t> by_target;

  std::map<std::pair<int, std::string>, PendingPair> pending;

  void open_maxtext(const AdapterConfig& cfg);
  void open_peft(const AdapterConfig& cfg);
  void add(PendingPair p);
  void finish(const std::string& where);
  const LoraTargetInfo& info_for(int layer, const std::string& tensor, size_t* index) const;
};

void AdapterSource::Impl::add(PendingPair p) {
  const auto key = std::make_pair(p.info.layer, p.info.tensor);
  auto [it, inserted] = pending.try_emplace(key, p);
  if (!inserted)
    throw Error(file_of(*p.src.a) + ": keys '" + it->second.info.a_key + "' and '" + p.info.a_key +
                "' both hold the LoRA pair of layer " + std::to_string(p.info.layer) + " " +
                p.info.tensor);
}

void AdapterSource::Impl::finish(const std::string& where) {
  if (pending.empty()) throw Error(where + ": the adapter holds no LoRA tensors");
  for (int l = 0; l < int(base.num_decoder_layers); ++l)
    for (const std::string& t : lora_target_tensors(base, l)) {
      auto it = pending.find({l, t});
      if (it == pending.end()) continue;
      by_target.emplace(it->first, targets.size());
      targets.push_back(std::move(it->second.info));
      sources.push_back(it->second.src);
    }
  // Every pending pair was checked against the layer's targets when it was added.
  if (targets.size() != pending.size())
    throw Error(where + ": internal: LoRA pairs outside the model's targets");
  pending.clear();
}

void AdapterSource::Impl::open_maxtext(const AdapterConfig& cfg) {
  rank = cfg.positive_int("r");
  alpha = cfg.number("lora_alpha");
  const ordered_json& tm = cfg.required("target_modules", "a list of module names");
  if (!tm.is_array() || tm.empty())
    throw cfg.error("target_modules", "is " + tm.dump() + ", expected a non-empty list of strings");

  // target_modules: the q/k/v/o_proj short names MaxText maps (docs/maxtext.md §4.1), else a module
  // path.
  struct Entry {
    std::string given, path;
  };
  std::vector<Entry> entries;
  for (const ordered_json& e : tm) {
    if (!e.is_string() || e.get<std::string>().empty())
      throw cfg.error("target_modules", "holds " + e.dump() + ", expected module name strings");
    const std::string given = e.get<std::string>();
    static const std::map<std::string, std::string> kShort = {{"q_proj", "self_attention/query"},
                                                              {"k_proj", "self_attention/key"},
                                                              {"v_proj", "self_attention/value"},
                                                              {"o_proj", "self_attention/out"}};
    std::string path = given;
    if (auto it = kShort.find(given); it != kShort.end()) {
      path = it->second;
    } else {
      std::replace(path.begin(), path.end(), '.', '/');
    }
    entries.push_back({given, path});
  }

  // Every module path an adapter of this model may hold, scanned and unrolled.
  const std::vector<GroupSpan> groups = layer_groups(base);
  std::vector<std::string> supported;
  for (const GroupSpan& g : groups) {
    if (g.count <= 0) continue;
    std::vector<std::string> parents = {"decoder/" + g.name};
    for (int64_t i = 0; i < g.count; ++i)
      parents.push_back("decoder/" + g.name + "_" + std::to_string(i));
    for (const std::string& t : lora_target_tensors(base, int(g.first_layer)))
      for (const std::string& p : parents) supported.push_back(p + "/" + maxtext_module(base, t));
  }
  std::vector<std::string> supported_modules;
  for (const std::string& t : all_target_tensors(base))
    supported_modules.push_back(maxtext_module(base, t));
  for (const Entry& e : entries) {
    const bool any = std::any_of(supported.begin(), supported.end(), [&](const std::string& p) {
      return matches_trailing_components(p, e.path);
    });
    if (!any)
      throw cfg.error("target_modules", "entry '" + e.given +
                                            "' names no projection LoRA can target in a " +
                                            base.decoder_block +
                                            " model (q_proj, k_proj, v_proj, o_proj or a module "
                                            "path: " +
                                            join(supported_modules, ", ") + ")");
  }

  // The weights: one safetensors file of any name, or a sharded set with its index.
  std::vector<std::string> files, indexes;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    // Whatever the type: a FIFO or directory named like weights is refused by name when opened.
    const fs::directory_entry& de = *it;
    const std::string name = de.path().filename().string();
    if (name.ends_with(".index.json"))
      indexes.push_back(de.path().string());
    else if (name.ends_with(".safetensors"))
      files.push_back(de.path().string());
  }
  if (ec) throw Error(dir + ": cannot list the adapter directory: " + ec.message());
  std::sort(files.begin(), files.end());
  std::sort(indexes.begin(), indexes.end());
  if (indexes.size() > 1)
    throw Error(dir + ": several safetensors index files (" + join(indexes, ", ") +
                "); expected at most one");
  if (indexes.size() == 1) {
    weights = Checkpoint::open(indexes);
  } else if (files.size() == 1) {
    weights = Checkpoint::open(files);
  } else if (files.empty()) {
    throw Error(dir +
                ": no adapter weights (expected one *.safetensors file, or shards with an "
                "*.index.json, next to adapter_config.json)");
  } else {
    throw Error(dir + ": several safetensors files (" + join(files, ", ") +
                ") and no *.index.json; expected one adapter file or an index naming the shards");
  }
  std::string where;
  for (const auto& [path, size] : weights.files()) where += (where.empty() ? "" : ", ") + path;
  if (weights.tensors().empty()) throw Error(where + ": the adapter holds no LoRA tensors");

  // Keys: Linen `params/params/decoder/…`, NNX single-nested `decoder/…`; the NNX tree saved
  // inside a TrainState (docs/maxtext.md §4.3) adds one `params/`, which is dropped here so the key
  // layout code recognises it as NNX.
  std::vector<std::string> layout_keys;
  for (const SourceTensor& t : weights.tensors()) {
    std::vector<std::string> c = split_key(t.key);
    if (c.size() > 2 && c[0] == "params" && (c[1] == "decoder" || c[1] == "token_embedder"))
      layout_keys.push_back(join(std::vector<std::string>(c.begin() + 1, c.end()), "/"));
    else
      layout_keys.push_back(t.key);
  }
  const KeyLayout layout = detect_key_layout(layout_keys, where);

  struct Leaf {
    const SourceTensor* t = nullptr;
    std::string module_path;  // decoder/<group component>/<module>, for messages
  };
  struct Pair {
    const GroupSpan* group = nullptr;
    int64_t index = -1;  // -1: scanned
    std::string tensor;
    Leaf a, b;
  };
  std::map<std::tuple<std::string, int64_t, std::string>, Pair> pairs;
  for (size_t i = 0; i < weights.tensors().size(); ++i) {
    const SourceTensor& t = weights.tensors()[i];
    std::optional<std::string> ck = canonical_key(layout_keys[i], layout);
    if (!ck) continue;  // optimizer state / step, as for base checkpoints
    const std::string at = file_of(t) + ": key '" + t.key + "'";
    std::vector<std::string> c = split_key(*ck);
    // A component that is itself key syntax (e.g. `['[']`) re-splits to nothing.
    if (c.empty() || (c.back() != kLoraA && c.back() != kLoraB))
      throw Error(at +
                  " is not a LoRA tensor (expected leaves named 'lora_a.kernel' and "
                  "'lora_b.kernel' under the adapted module)");
    // decoder / <group> / <module…> / lora_x.kernel
    const GroupSpan* group = nullptr;
    int64_t index = -1;
    if (c.size() >= 4 && c[0] == "decoder") {
      for (const GroupSpan& g : groups) {
        if (c[1] == g.name) {
          group = &g;
        } else if (std::optional<int64_t> n = unrolled_layer_index(c[1], g.name)) {
          group = &g;
          index = *n;
        }
        if (group) break;
      }
    }
    std::string module_path = join(std::vector<std::string>(c.begin(), c.end() - 1), "/");
    if (!group || group->count <= 0)
      throw Error(at + ": unknown target '" + module_path +
                  "' (LoRA adapts decoder layer "
                  "projections: decoder/<" +
                  join(
                      [&] {
                        std::vector<std::string> n;
                        for (const GroupSpan& g : groups)
                          if (g.count > 0) n.push_back(g.name);
                        return n;
                      }(),
                      "|") +
                  ">[_N]/<module> of a " + base.decoder_block + " model)");
    if (index >= group->count)
      throw Error(at + ": layer index " + std::to_string(index) + " is out of range: group '" +
                  group->name + "' has " + std::to_string(group->count) +
                  " layers in the base config (layer count mismatch)");
    const std::string module = join(std::vector<std::string>(c.begin() + 2, c.end() - 1), "/");
    std::optional<std::string> tensor = tensor_of_module(base, module);
    const std::vector<std::string> allowed = lora_target_tensors(base, int(group->first_layer));
    if (!tensor || std::find(allowed.begin(), allowed.end(), *tensor) == allowed.end()) {
      std::vector<std::string> modules;
      for (const std::string& a : allowed) modules.push_back(maxtext_module(base, a));
      throw Error(at + ": unknown target '" + module + "' (LoRA targets of '" + group->name +
                  "' in a " + base.decoder_block + " model: " + join(modules, ", ") + ")");
    }
    const bool covered = std::any_of(entries.begin(), entries.end(), [&](const Entry& e) {
      return matches_trailing_components(module_path, e.path);
    });
    if (!covered) {
      std::vector<std::string> given;
      for (const Entry& e : entries) given.push_back(e.given);
      throw Error(at + ": unknown target '" + module + "': not covered by target_modules [" +
                  join(given, ", ") + "] of " + cfg.path());
    }
    Pair& p = pairs[{group->name, index, *tensor}];
    p.group = group;
    p.index = index;
    p.tensor = *tensor;
    (c.back() == kLoraA ? p.a : p.b) = Leaf{&t, module_path};
  }

  for (const auto& entry : pairs) {
    const auto& p = entry.second;  // not a structured binding: add_layer captures it (clang 14)
    if (!p.a.t || !p.b.t) {
      const Leaf& have = p.a.t ? p.a : p.b;
      throw Error(file_of(*have.t) + ": key '" + have.t->key + "' has no matching '" +
                  std::string(p.a.t ? kLoraB : kLoraA) + "' for module '" + have.module_path +
                  "' (a LoRA pair needs both A and B)");
    }
    const SourceTensor& a = *p.a.t;
    const SourceTensor& b = *p.b.t;
    if (a.shape.empty() || b.shape.empty() || a.shape.back() != b.shape.front())
      throw Error(file_of(a) + ": rank mismatch between A and B: key '" + a.key + "' has shape " +
                  shape_to_string(a.shape) + " (rank on the last axis), key '" + b.key +
                  "' has shape " + shape_to_string(b.shape) + " (rank on the first axis)");
    // docs/maxtext.md §4.1: A = in_dims + (r,), B = (r,) + out_dims; scanned: the layer axis at
    // index 1.
    const std::vector<int64_t> base_shape = *target_base_shape(base, p.tensor);
    const size_t k = input_axes(p.tensor);
    std::vector<int64_t> want_a(base_shape.begin(), base_shape.begin() + std::ptrdiff_t(k));
    want_a.push_back(rank);
    std::vector<int64_t> want_b = {rank};
    want_b.insert(want_b.end(), base_shape.begin() + std::ptrdiff_t(k), base_shape.end());
    const bool scanned = p.index < 0;
    if (scanned) {
      want_a.insert(want_a.begin() + 1, p.group->count);
      want_b.insert(want_b.begin() + 1, p.group->count);
    }
    for (const SourceTensor* t : {&a, &b}) {
      const std::vector<int64_t>& want = t == &a ? want_a : want_b;
      if (t->shape == want) continue;
      const std::string form = t == &a ? (scanned ? "[in..., L, r]" : "[in..., r]")
                                       : (scanned ? "[r, L, out...]" : "[r, out...]");
      const std::string which = scanned ? "scanned group '" + p.group->name + "' of " +
                                              std::to_string(p.group->count) +
                                              " layers in the base config"
                                        : "layer " + std::to_string(p.group->first_layer + p.index);
      throw Error(file_of(*t) + ": key '" + t->key + "' has shape " + shape_to_string(t->shape) +
                  ", expected " + shape_to_string(want) + " (" + which + ", " + p.tensor + " " +
                  shape_to_string(base_shape) + ": " + std::string(t == &a ? kLoraA : kLoraB) +
                  " = " + form + ", r = " + std::to_string(rank) + ")");
    }
    const double scale = alpha / double(rank) * user_scale;
    auto add_layer = [&](int64_t j) {
      PendingPair pp;
      pp.info = {int(p.group->first_layer + j), p.tensor, rank, scale, a.key, b.key};
      pp.src = {&a, &b, scanned, j};
      add(std::move(pp));
    };
    if (scanned)
      for (int64_t j = 0; j < p.group->count; ++j) add_layer(j);
    else
      add_layer(p.index);
  }
  finish(where);
}

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

const LoraTargetInfo& AdapterSource::Impl::info_for(int layer, const std::string& tensor,
                                                    size_t* index) const {
  auto it = by_target.find({layer, tensor});
  if (it == by_target.end())
    throw Error(dir + ": internal: the adapter has no LoRA pair for layer " +
                std::to_string(layer) + " " + tensor);
  *index = it->second;
  return targets[it->second];
}

AdapterSource AdapterSource::open(const std::string& dir, const ModelConfig& base,
                                  double user_scale) {
  if (!std::isfinite(user_scale))
    throw Error("LoRA scale " + std::to_string(user_scale) + " is not a finite number");
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw Error(dir + ": LoRA adapter directory does not exist (or is not a directory)");
  const std::string config_path = (fs::path(dir) / "adapter_config.json").string();
  if (!fs::exists(config_path, ec))
    throw Error(config_path +
                ": not found (a LoRA adapter directory holds adapter_config.json "
                "and the adapter weights)");
  AdapterConfig cfg(config_path);

  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  impl->base = base;
  impl->user_scale = user_scale;
  const bool peft = cfg.json().contains("peft_type") ||
                    fs::exists(fs::path(dir) / "adapter_model.safetensors", ec);
  impl->format = peft ? AdapterFormat::Peft : AdapterFormat::MaxText;
  if (peft)
    impl->open_peft(cfg);
  else
    impl->open_maxtext(cfg);
  return AdapterSource(std::move(impl));
}

AdapterSource::AdapterSource(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
AdapterSource::AdapterSource(AdapterSource&&) noexcept = default;
AdapterSource& AdapterSource::operator=(AdapterSource&&) noexcept = default;
AdapterSource::~AdapterSource() = default;

AdapterFormat AdapterSource::format() const {
  return impl_->format;
}
const std::string& AdapterSource::dir() const {
  return impl_->dir;
}
int64_t AdapterSource::rank() const {
  return impl_->rank;
}
double AdapterSource::lora_alpha() const {
  return impl_->alpha;
}
bool AdapterSource::use_rslora() const {
  return impl_->rslora;
}
double AdapterSource::user_scale() const {
  return impl_->user_scale;
}
const std::vector<LoraTargetInfo>& AdapterSource::targets() const {
  return impl_->targets;
}

const LoraTargetInfo* AdapterSource::find(int layer, const std::string& tensor) const {
  auto it = impl_->by_target.find({layer, tensor});
  return it == impl_->by_target.end() ? nullptr : &impl_->targets[it->second];
}

LoraDelta AdapterSource::read(int layer, const std::string& tensor) const {
  size_t i = 0;
  const LoraTargetInfo& info = impl_->info_for(layer, tensor, &i);
  const PairSource& src = impl_->sources[i];
  const ModelConfig& c = impl_->base;
  const auto [in, out] = lora_in_out(c, tensor);
  LoraDelta d;
  d.in = in;
  d.out = out;
  d.rank = info.rank;
  d.scale = float(info.scale);
  d.a.resize(size_t(in * d.rank));
  d.b.resize(size_t(d.rank * out));
  if (impl_->format == AdapterFormat::MaxText) {
    // Unscanned A is [in..., r] and B [r, out...] row-major: already [in, r] and [r, out].
    if (src.scanned) {
      read_slice_as_f32(*src.a, 1, src.index, d.a.data());
      read_slice_as_f32(*src.b, 1, src.index, d.b.data());
    } else {
      read_as_f32(*src.a, d.a.data());
      read_as_f32(*src.b, d.b.data());
    }
    return d;
  }

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
  return d;
}

void merge_lora(const LoraDelta& d, float* w) {
  if (d.a.size() != size_t(d.in * d.rank) || d.b.size() != size_t(d.rank * d.out))
    throw Error("internal: LoRA delta [" + std::to_string(d.in) + ", " + std::to_string(d.rank) +
                "]·[" + std::to_string(d.rank) + ", " + std::to_string(d.out) + "] holds " +
                std::to_string(d.a.size()) + " / " + std::to_string(d.b.size()) + " values");
  const int64_t in = d.in, out = d.out, rank = d.rank;
  const float scale = d.scale;
  // Row i of A·B is Σ_k a[i,k]·b[k,:]: accumulated into one row buffer with a unit-stride inner
  // loop over j that the compiler vectorises, then added to w once, scaled.
  std::vector<float> row(static_cast<size_t>(out));
  float* __restrict acc = row.data();
  for (int64_t i = 0; i < in; ++i) {
    std::fill(acc, acc + out, 0.0f);
    const float* ai = d.a.data() + i * rank;
    for (int64_t k = 0; k < rank; ++k) {
      const float aik = ai[k];
      const float* __restrict bk = d.b.data() + k * out;
      for (int64_t j = 0; j < out; ++j) acc[j] += aik * bk[j];
    }
    float* __restrict wi = w + i * out;
    for (int64_t j = 0; j < out; ++j) wi[j] += scale * acc[j];
  }
}

}  // namespace kiln
