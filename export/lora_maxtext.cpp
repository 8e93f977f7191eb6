// MaxText's adapter format (docs/maxtext.md §4.1): adapter_config.json {r, lora_alpha,
// target_modules} and the `lora_a.kernel` / `lora_b.kernel` leaves under the adapted modules,
// scanned or unrolled.
#include <algorithm>
#include <filesystem>
#include <map>
#include <optional>
#include <string_view>
#include <tuple>

#include "export/key_layout.h"
#include "export/lora_reader.h"
#include "export/param_names.h"

namespace kiln {

namespace fs = std::filesystem;
using namespace lora_detail;

namespace {

constexpr std::string_view kLoraA = "lora_a.kernel";
constexpr std::string_view kLoraB = "lora_b.kernel";

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

// MaxText target_modules matching is on whole trailing path components: `self_attention.query`
// matches `decoder/layers/self_attention/query` but NOT `decoder/layers/self_attention/query_norm`
// (MaxText's own substring test would match the latter, docs/maxtext.md §4.1; kiln does not).
bool matches_trailing_components(const std::string& path, const std::string& entry) {
  if (path == entry) return true;
  return path.size() > entry.size() && path.ends_with(entry) &&
         path[path.size() - entry.size() - 1] == '/';
}

}  // namespace

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

void AdapterSource::Impl::read_maxtext(const PairSource& src, LoraDelta& d) const {
  // Unscanned A is [in..., r] and B [r, out...] row-major: already [in, r] and [r, out].
  if (src.scanned) {
    read_slice_as_f32(*src.a, 1, src.index, d.a.data());
    read_slice_as_f32(*src.b, 1, src.index, d.b.data());
  } else {
    read_as_f32(*src.a, d.a.data());
    read_as_f32(*src.b, d.b.data());
  }
}

}  // namespace kiln
