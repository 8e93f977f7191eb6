#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <optional>

#include "export/exporter.h"
#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"
#include "tools/kiln/common.h"

namespace kiln::cli {

namespace {

// A one-line progress bar redrawn in place, after a line of QK-Clip calibration progress if there
// is one; only when stderr is a terminal.
class ProgressBar {
 public:
  ProgressBar() : enabled_(::isatty(STDERR_FILENO) == 1) {}
  ~ProgressBar() {
    if (drawn_ || calibrating_) std::fputc('\n', stderr);
  }
  void update(const ExportProgress& p) {
    if (!enabled_) return;
    if (p.calibration_layers > 0) {
      std::fprintf(stderr, "\rqk-clip calibration: layer %lld/%lld (%d passes)",
                   static_cast<long long>(p.calibrated_layers),
                   static_cast<long long>(p.calibration_layers), p.calibration_passes);
      calibrating_ = true;
      return;
    }
    if (calibrating_) std::fputc('\n', stderr);
    calibrating_ = false;
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
  bool calibrating_ = false;
};

}  // namespace

int cmd_export(int argc, const char* const* argv) {
  ArgParser p("kiln export",
              "Exports a MaxText training checkpoint (safetensors; scanned or unrolled layers; "
              "Linen or NNX keys) to an artifact directory of per-layer bf16 blobs.");
  p.multi("--checkpoint", "PATH", "a .safetensors file or a sharded *.index.json", required);
  p.option("--config", "FILE", "model config: JSON or MaxText model YAML", required);
  p.multi("--set", "KEY=VALUE", "override a config field");
  p.option("--scan-axis", "N",
           "axis the scanned layers are stacked on (default: the config's "
           "param_scan_axis, MaxText default 1)");
  p.option("--out", "DIR", "artifact directory to write", required);
  p.multi("--max-logits", "FILE", "per-head max-logit statistics (safetensors) for QK-Clip");
  p.option("--qk-clip-threshold", "TAU",
           "QK-Clip threshold: heads whose max logit exceeds TAU "
           "are rescaled by gamma = TAU / max");
  p.flag("--qk-clip-per-group",
         "one gamma per head for a whole scanned group (MaxText's "
         "reduction) instead of per layer");
  p.option("--qk-clip-mode", "MODE",
           "mla (wq_b/wkv_b, MaxText) or query (scale each query head; "
           "works for any attention)",
           "mla");
  p.option("--qk-clip-calibrate", "PROMPTS",
           "compute the statistics while exporting: layer l is measured on these prompts (one "
           "per line, ids comma-separated) with layers 0..l-1 already clipped, so every head "
           "ends at or below the threshold on them");
  p.multi("--lora", "DIR",
          "a LoRA adapter (MaxText or PEFT directory): folded into the weights with "
          "--merge-lora, else written as a run-time adapter named by --lora-name");
  p.multi("--lora-name", "NAME", "name of the run-time adapter from the matching --lora");
  p.option("--lora-scale", "S", "multiplies every adapter's own scale (alpha/r)", "1");
  p.flag("--merge-lora",
         "fold the --lora adapters into the base weights (W + s·A·B in f32, rounded to bf16 "
         "once; before QK-Clip)");
  p.option("--tokenizer", "FILE",
           "a SentencePiece model to embed, so that `kiln run --prompt` and `kiln eval` take "
           "text");
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
  if (a.has("--tokenizer")) {
    opt.tokenizer_path = a.get("--tokenizer");
    opt.recorded_options.emplace_back("--tokenizer", opt.tokenizer_path);
  }

  const auto lora_dirs = a.get_all("--lora");
  const auto lora_names = a.get_all("--lora-name");
  const double lora_scale = a.get_double("--lora-scale", -1e6, 1e6);
  opt.merge_lora = a.has("--merge-lora");
  if (opt.merge_lora && !lora_names.empty())
    throw a.error("--merge-lora folds the adapters into the weights; do not also give --lora-name");
  if (opt.merge_lora && lora_dirs.empty()) throw a.error("--merge-lora needs --lora DIR");
  if (!opt.merge_lora && lora_names.size() != lora_dirs.size())
    throw a.error(
        "give one --lora-name per --lora (or --merge-lora): " + std::to_string(lora_dirs.size()) +
        " --lora, " + std::to_string(lora_names.size()) + " --lora-name");
  if (a.given("--lora-scale") && lora_dirs.empty()) throw a.error("--lora-scale needs --lora DIR");
  for (size_t i = 0; i < lora_dirs.size(); ++i) {
    opt.loras.push_back({lora_dirs[i], opt.merge_lora ? "" : lora_names[i], lora_scale});
    opt.recorded_options.emplace_back("--lora", lora_dirs[i]);
    if (!opt.merge_lora) opt.recorded_options.emplace_back("--lora-name", lora_names[i]);
  }
  if (a.given("--lora-scale"))
    opt.recorded_options.emplace_back("--lora-scale", a.get("--lora-scale"));
  if (opt.merge_lora) opt.recorded_options.emplace_back("--merge-lora", "");

  std::optional<PromptsCalibrator> calibrator;
  if (a.has("--qk-clip-calibrate")) {
    if (!opt.qk_clip.stats.empty())
      throw a.error("--qk-clip-calibrate computes the statistics; do not also give --max-logits");
    if (opt.qk_clip.threshold == 0) throw a.error("--qk-clip-calibrate needs --qk-clip-threshold");
    if (opt.qk_clip.per_group)
      throw a.error("--qk-clip-calibrate clips layer by layer; --qk-clip-per-group does not apply");
    opt.recorded_options.emplace_back("--qk-clip-calibrate", a.get("--qk-clip-calibrate"));
    calibrator.emplace(a.get("--qk-clip-calibrate"));
    opt.qk_clip.calibrator = &*calibrator;
  }

  ProgressBar bar;
  ExportSummary s = export_artifact(opt, [&](const ExportProgress& pr) { bar.update(pr); });
  if (s.qk_clip.applied) {
    std::printf("QK-Clip (tau %g, %s%s): %lld of %zu heads clipped, smallest gamma %.4g\n",
                s.qk_clip.threshold, s.qk_clip.mode.c_str(),
                s.qk_clip.per_group ? ", per group" : ", per layer",
                static_cast<long long>(s.qk_clip.clipped_heads()), s.qk_clip.gamma.size(),
                double(s.qk_clip.smallest_gamma()));
  }
  for (const auto& ad : s.adapters)
    std::printf("LoRA %s (%s, rank %lld, %zu tensors)%s\n", ad.name.c_str(), ad.format.c_str(),
                static_cast<long long>(ad.rank), ad.targets.size(),
                ad.merged ? ": merged into the weights" : ": run-time adapter");
  if (s.tokenizer_pieces)
    std::printf("tokenizer %s: %lld pieces, embedded in the manifest\n", opt.tokenizer_path.c_str(),
                static_cast<long long>(s.tokenizer_pieces));
  std::printf("exported %lld layers (%s, %s) to %s: %.1f MiB in %.2f s\n",
              static_cast<long long>(s.layers), s.key_layout.c_str(),
              s.scanned ? "scanned" : "unrolled", opt.out_dir.c_str(),
              double(s.bytes_written) / (1 << 20), s.seconds);
  return 0;
}

}  // namespace kiln::cli
