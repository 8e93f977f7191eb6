#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "export/exporter.h"
#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"

namespace kiln::cli {

namespace {

// A one-line progress bar redrawn in place; only when stderr is a terminal.
class ProgressBar {
 public:
  ProgressBar() : enabled_(::isatty(STDERR_FILENO) == 1) {}
  ~ProgressBar() {
    if (drawn_) std::fputc('\n', stderr);
  }
  void update(const ExportProgress& p) {
    if (!enabled_) return;
    constexpr int kWidth = 30;
    int filled = p.blobs_total ? int(kWidth * p.blobs_done / p.blobs_total) : kWidth;
    std::fprintf(stderr, "\rexport [%.*s%*s] %lld/%lld blobs, %.1f MiB", filled,
                 "##############################", kWidth - filled, "",
                 static_cast<long long>(p.blobs_done), static_cast<long long>(p.blobs_total),
                 double(p.bytes_written) / (1 << 20));
    std::fflush(stderr);
    drawn_ = true;
  }

 private:
  bool enabled_;
  bool drawn_ = false;
};

}  // namespace

int cmd_export(int argc, const char* const* argv) {
  ArgParser p("kiln export",
              "Exports a MaxText training checkpoint (safetensors; scanned or unrolled layers; "
              "Linen or NNX keys) to an artifact directory of per-layer bf16 blobs.");
  p.multi("--checkpoint", "PATH", "a .safetensors file or a sharded *.index.json (repeatable)",
          required);
  p.option("--config", "FILE", "model config: JSON or MaxText model YAML", required);
  p.multi("--set", "KEY=VALUE", "override a config field (repeatable)");
  p.option("--scan-axis", "N", "axis the scanned layers are stacked on (default: the config's "
                               "param_scan_axis, MaxText default 1)");
  p.option("--out", "DIR", "artifact directory to write", required);
  p.multi("--max-logits", "FILE", "per-head max-logit statistics (safetensors) for QK-Clip");
  p.option("--qk-clip-threshold", "TAU", "QK-Clip threshold: heads whose max logit exceeds TAU "
                                         "are rescaled by gamma = TAU / max");
  p.flag("--qk-clip-per-group", "one gamma per head for a whole scanned group (MaxText's "
                                "reduction) instead of per layer");
  p.option("--qk-clip-mode", "MODE", "mla (wq_b/wkv_b, MaxText) or query (scale each query head; "
                                     "works for any attention)", "mla");
  p.flag("--force", "replace an existing artifact at --out");
  Args a = p.parse(argc, argv);

  ExportOptions opt;
  opt.checkpoints = a.get_all("--checkpoint");
  opt.config_path = a.get("--config");
  for (const auto& kv : a.get_all("--set")) {
    auto eq = kv.find('=');
    if (eq == std::string::npos || eq == 0)
      throw a.error("--set expects KEY=VALUE, got '" + kv + "'");
    opt.overrides.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
  }
  if (a.has("--scan-axis")) opt.scan_axis = int(a.get_int("--scan-axis", -1000, 1000));
  opt.out_dir = a.get("--out");
  opt.force = a.has("--force");
  opt.qk_clip.stats = a.get_all("--max-logits");
  if (a.has("--qk-clip-threshold"))
    opt.qk_clip.threshold = a.get_double("--qk-clip-threshold", 1e-30, 1e30);
  opt.qk_clip.per_group = a.has("--qk-clip-per-group");
  opt.qk_clip.mode = a.get("--qk-clip-mode");
  for (const auto& f : opt.qk_clip.stats) opt.recorded_options.emplace_back("--max-logits", f);
  if (a.has("--qk-clip-threshold"))
    opt.recorded_options.emplace_back("--qk-clip-threshold", a.get("--qk-clip-threshold"));
  if (opt.qk_clip.per_group) opt.recorded_options.emplace_back("--qk-clip-per-group", "");
  if (a.given("--qk-clip-mode"))
    opt.recorded_options.emplace_back("--qk-clip-mode", opt.qk_clip.mode);
  for (const auto& c : opt.checkpoints) opt.recorded_options.emplace_back("--checkpoint", c);
  opt.recorded_options.emplace_back("--config", opt.config_path);
  for (const auto& kv : a.get_all("--set")) opt.recorded_options.emplace_back("--set", kv);
  if (opt.scan_axis) opt.recorded_options.emplace_back("--scan-axis", a.get("--scan-axis"));
  if (opt.force) opt.recorded_options.emplace_back("--force", "");

  ProgressBar bar;
  ExportSummary s = export_artifact(opt, [&](const ExportProgress& pr) { bar.update(pr); });
  if (s.nonfinite_nan || s.nonfinite_inf)
    std::fprintf(stderr, "kiln: warning: the weights contain %llu NaN and %llu Inf values "
                         "(kept as they are; recorded in the manifest)\n",
                 static_cast<unsigned long long>(s.nonfinite_nan),
                 static_cast<unsigned long long>(s.nonfinite_inf));
  if (s.qk_clip.applied) {
    float min_gamma = 1.0f;
    for (float g : s.qk_clip.gamma) min_gamma = std::min(min_gamma, g);
    std::printf("QK-Clip (tau %g, %s%s): %lld of %zu heads clipped, smallest gamma %.4g\n",
                s.qk_clip.threshold, s.qk_clip.mode.c_str(),
                s.qk_clip.per_group ? ", per group" : ", per layer",
                static_cast<long long>(s.qk_clip.clipped_heads()), s.qk_clip.gamma.size(),
                double(min_gamma));
  }
  std::printf("exported %lld layers (%s, %s) to %s: %.1f MiB in %.2f s\n",
              static_cast<long long>(s.layers), s.key_layout.c_str(),
              s.scanned ? "scanned" : "unrolled", opt.out_dir.c_str(),
              double(s.bytes_written) / (1 << 20), s.seconds);
  return 0;
}

}  // namespace kiln::cli
