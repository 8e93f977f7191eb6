#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "engine/artifact.h"
#include "engine/inspect.h"
#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"
#include "tools/kiln/common.h"

namespace kiln::cli {

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
  const nlohmann::ordered_json j = inspect_artifact(*art);
  if (a.has("--json")) {
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }

  std::printf("artifact   %s (format %u.%u, %.1f MiB, %llu tensors, %.3f M parameters)\n",
              art->dir().c_str(), m.format_major, m.format_minor,
              double(art->total_bytes()) / (1 << 20), j["tensors"].get<unsigned long long>(),
              double(j["parameters"].get<uint64_t>()) / 1e6);
  if (const uint64_t blocked = j["blocked_tensors"].get<uint64_t>())
    std::printf(
        "weights    %llu matrices stored in the engine's blocked layout (BA16a64b2a, "
        "mapped in place)\n",
        static_cast<unsigned long long>(blocked));
  std::printf("\nconfig\n");
  for (const auto& [k, val] : j["config"].items())
    std::printf("  %-28s %s\n", k.c_str(),
                val.is_string() ? val.get<std::string>().c_str() : val.dump().c_str());
  std::printf("\nblobs\n");
  for (const auto& b : j["blobs"]) {
    std::printf("  %-18s %-8s %10.2f MiB  %zu tensors\n", b["file"].get<std::string>().c_str(),
                b["kind"].get<std::string>().c_str(), b["bytes"].get<double>() / (1 << 20),
                b["tensors"].size());
    if (a.has("--tensors"))
      for (const auto& t : b["tensors"])
        std::printf("      %-16s %-5s %-22s %-10s crc32c %08x\n",
                    t["name"].get<std::string>().c_str(), t["dtype"].get<std::string>().c_str(),
                    t["shape"].dump().c_str(), t["layout"].get<std::string>().c_str(),
                    t["crc32c"].get<uint32_t>());
  }
  const nlohmann::ordered_json& tokenizer = j["tokenizer"];
  if (tokenizer.is_null())
    std::printf("\ntokenizer  none (exported without --tokenizer: token ids only)\n");
  else
    std::printf("\ntokenizer  SentencePiece, %lld pieces, bos %d, eos %d (%.1f KiB)\n",
                tokenizer["pieces"].get<long long>(), tokenizer["bos_id"].get<int>(),
                tokenizer["eos_id"].get<int>(), double(m.tokenizer.size()) / 1024);
  const QkClipRecord& qk = m.qk_clip;
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
                double(j["adapter_bytes"].get<uint64_t>()) / (1 << 20));
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
