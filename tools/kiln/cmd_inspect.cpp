#include <cmath>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <type_traits>

#include "engine/artifact.h"
#include "tokenizer/tokenizer.h"
#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"
#include "tools/kiln/common.h"

namespace kiln::cli {

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
nlohmann::ordered_json config_json(const ModelConfig& c) {
  const FieldFamily other = c.is_deepseek() ? FieldFamily::Llama : FieldFamily::DeepSeek;
  nlohmann::ordered_json j;
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

}  // namespace

int cmd_inspect(int argc, const char* const* argv) {
  ArgParser p("kiln inspect",
              "Checks every checksum of an artifact (unless --no-verify) and shows its config, "
              "blobs, tensors and provenance.");
  p.positional("DIR", "artifact directory");
  // Kept for the scripts that ask for it explicitly.
  p.flag("--verify", "check every checksum (the default; kept for compatibility)");
  add_no_verify(p);
  p.flag("--tensors", "list every tensor of every blob");
  p.flag("--json", "print one JSON object");
  Args a = p.parse(argc, argv);
  if (a.has("--verify") && a.has("--no-verify"))
    throw a.error("--verify and --no-verify contradict each other");
  const bool verify = !a.has("--no-verify");
  auto art = Artifact::open(a.positional(0), {.verify_checksums = verify});
  const Manifest& m = art->manifest();
  const Provenance& pv = m.provenance;
  // Run-time adapters are mapped and checked like the engine loads them (checksums included
  // unless --no-verify); their memory is the mapped blob bytes.
  nlohmann::ordered_json adapters = nlohmann::ordered_json::array();
  uint64_t adapter_bytes = 0;
  for (const AdapterRecord& ad : m.adapters) {
    if (!ad.merged) adapter_bytes += LoraAdapter::open(art->dir(), m.config, ad, verify)->bytes();
    adapters.push_back({{"name", ad.name},
                        {"merged", ad.merged},
                        {"format", ad.format},
                        {"source", ad.source},
                        {"rank", ad.rank},
                        {"lora_alpha", ad.lora_alpha},
                        {"use_rslora", ad.use_rslora},
                        {"lora_scale", ad.lora_scale},
                        {"targets", ad.targets.size()},
                        {"tensors", ad.targets_per_tensor()},
                        {"bytes", ad.bytes()}});
  }

  uint64_t n_tensors = 0, n_params = 0;
  nlohmann::ordered_json blobs = nlohmann::ordered_json::array();
  for (size_t i = 0; i < m.blobs.size(); ++i) {
    const BlobView& v = i == 0 ? art->globals() : art->layer(int64_t(i) - 1);
    nlohmann::ordered_json tensors = nlohmann::ordered_json::array();
    for (const auto& t : v.tensors()) {
      ++n_tensors;
      n_params += t.length / dtype_size(t.dtype);
      tensors.push_back({{"name", t.name},
                         {"dtype", std::string(dtype_name(t.dtype))},
                         {"shape", t.shape},
                         {"bytes", t.length},
                         {"crc32c", t.crc32c}});
    }
    blobs.push_back({{"file", m.blobs[i].file},
                     {"layer", m.blobs[i].layer},
                     {"kind", kind_name(m.blobs[i].kind)},
                     {"bytes", m.blobs[i].size},
                     {"tensors", tensors}});
  }
  nlohmann::ordered_json sources = nlohmann::ordered_json::array();
  for (const auto& [path, size] : pv.sources) sources.push_back({{"path", path}, {"bytes", size}});
  nlohmann::ordered_json options = nlohmann::ordered_json::array();
  for (const auto& [k, val] : pv.options) options.push_back(val.empty() ? k : k + " " + val);

  const QkClipRecord& qk = m.qk_clip;
  nlohmann::ordered_json qk_json = nullptr;
  if (qk.applied) {
    nlohmann::ordered_json layers = nlohmann::ordered_json::array();
    for (int64_t l = 0; l < m.config.num_decoder_layers; ++l) {
      nlohmann::ordered_json g = nlohmann::ordered_json::array(),
                             s = nlohmann::ordered_json::array();
      for (int64_t h = 0; h < qk.heads; ++h) {
        g.push_back(qk.gamma[size_t(l * qk.heads + h)]);
        float x = qk.max_logit[size_t(l * qk.heads + h)];
        s.push_back(std::isnan(x) ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(x));
      }
      layers.push_back({{"layer", l}, {"gamma", g}, {"max_logit", s}});
    }
    qk_json = {{"threshold", qk.threshold}, {"mode", qk.mode},
               {"targets", qk.targets},     {"per_group", qk.per_group},
               {"sources", qk.sources},     {"heads_clipped", qk.clipped_heads()},
               {"layers", layers}};
  }

  // The tokenizer is parsed, not just counted: inspect is where a broken one should show.
  nlohmann::ordered_json tokenizer = nullptr;
  if (!m.tokenizer.empty()) {
    const Tokenizer tok(m.tokenizer, art->dir() + ": manifest tokenizer");
    tokenizer = {{"type", "sentencepiece"},
                 {"pieces", tok.vocab_size()},
                 {"bos_id", tok.bos_id()},
                 {"eos_id", tok.eos_id()},
                 {"bytes", m.tokenizer.size()}};
  }

  if (a.has("--json")) {
    nlohmann::ordered_json j = {
        {"dir", art->dir()},
        {"format_version", std::to_string(m.format_major) + "." + std::to_string(m.format_minor)},
        {"config", config_json(m.config)},
        {"parameters", n_params},
        {"tensors", n_tensors},
        {"bytes", art->total_bytes()},
        {"checksums_verified", verify},
        {"blobs", blobs},
        {"tokenizer", tokenizer},
        {"qk_clip", qk_json},
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
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }

  std::printf("artifact   %s (format %u.%u, %.1f MiB, %llu tensors, %.3f M parameters)\n",
              art->dir().c_str(), m.format_major, m.format_minor,
              double(art->total_bytes()) / (1 << 20), static_cast<unsigned long long>(n_tensors),
              double(n_params) / 1e6);
  std::printf("\nconfig\n");
  const nlohmann::ordered_json config = config_json(m.config);
  for (const auto& [k, val] : config.items())
    std::printf("  %-28s %s\n", k.c_str(),
                val.is_string() ? val.get<std::string>().c_str() : val.dump().c_str());
  std::printf("\nblobs\n");
  for (const auto& b : blobs) {
    std::printf("  %-18s %-8s %10.2f MiB  %zu tensors\n", b["file"].get<std::string>().c_str(),
                b["kind"].get<std::string>().c_str(), b["bytes"].get<double>() / (1 << 20),
                b["tensors"].size());
    if (a.has("--tensors"))
      for (const auto& t : b["tensors"])
        std::printf("      %-16s %-5s %-22s crc32c %08x\n", t["name"].get<std::string>().c_str(),
                    t["dtype"].get<std::string>().c_str(), t["shape"].dump().c_str(),
                    t["crc32c"].get<uint32_t>());
  }
  if (tokenizer.is_null())
    std::printf("\ntokenizer  none (exported without --tokenizer: token ids only)\n");
  else
    std::printf("\ntokenizer  SentencePiece, %lld pieces, bos %d, eos %d (%.1f KiB)\n",
                tokenizer["pieces"].get<long long>(), tokenizer["bos_id"].get<int>(),
                tokenizer["eos_id"].get<int>(), double(m.tokenizer.size()) / 1024);
  if (qk.applied) {
    std::printf("\nqk-clip    tau %g, mode %s (%s), %lld of %zu heads clipped; from %s\n",
                qk.threshold, qk.mode.c_str(), qk.per_group ? "per scanned group" : "per layer",
                static_cast<long long>(qk.clipped_heads()), qk.gamma.size(),
                qk.sources.empty() ? "-" : qk.sources.front().c_str());
    std::printf("  scaled: %s\n", qk.targets.c_str());
    for (int64_t l = 0; l < m.config.num_decoder_layers; ++l) {
      std::string line;
      bool any = false;
      for (int64_t h = 0; h < qk.heads; ++h) {
        float g = qk.gamma[size_t(l * qk.heads + h)];
        any |= g < 1.0f;
        char buf[32];
        std::snprintf(buf, sizeof buf, " %.4g", double(g));
        line += buf;
      }
      bool stats = !std::isnan(qk.max_logit[size_t(l * qk.heads)]);
      std::printf("  layer %3lld gamma%s%s\n", static_cast<long long>(l), line.c_str(),
                  !stats ? "   (no statistics: untouched)"
                  : any  ? ""
                         : "   (all below tau)");
    }
  }
  if (!m.adapters.empty()) {
    std::printf("\nadapters   %zu, %.2f MiB of run-time adapter blobs\n", m.adapters.size(),
                double(adapter_bytes) / (1 << 20));
    print_adapters(m);
  }
  std::printf("\nprovenance\n");
  std::printf("  exporter      kiln %s, %s\n", pv.exporter_version.c_str(), pv.created_utc.c_str());
  for (const auto& [path, size] : pv.sources)
    std::printf("  source        %s (%llu bytes)\n", path.c_str(),
                static_cast<unsigned long long>(size));
  std::printf("  config        %s\n", pv.config_source.c_str());
  std::printf("  key layout    %s, %s", pv.key_layout.c_str(), pv.scanned ? "scanned" : "unrolled");
  if (pv.scanned) std::printf(" on axis %d", pv.scan_axis);
  std::printf("\n  non-finite    %llu NaN, %llu Inf\n",
              static_cast<unsigned long long>(pv.nonfinite_nan),
              static_cast<unsigned long long>(pv.nonfinite_inf));
  std::printf("\n%s\n", verify
                            ? "verified: the manifest, every blob header and tensor checksum match"
                            : "checksums not verified (--no-verify): structure and headers only");
  return 0;
}

}  // namespace kiln::cli
