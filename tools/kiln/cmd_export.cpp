#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "export/exporter.h"
#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"
#include "tools/kiln/common.h"
#include "tools/kiln/export_request.h"

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
  p.option("--weights-layout", "LAYOUT",
           "blocked (default): the matrices in the layout the engine's kernels read "
           "(BA16a64b2a), so that it maps them in place at start-up instead of re-laying them; "
           "or row-major, MaxText's [in, out] order, for tools that read the blobs themselves "
           "(docs/architecture.md, \"Tensor layouts\")");
  p.flag("--force", "replace an existing artifact at --out");
  Args a = p.parse(argc, argv);

  ExportRequest r;
  r.checkpoints = a.get_all("--checkpoint");
  r.config = a.get("--config");
  r.set = a.get_all("--set");
  if (a.has("--scan-axis")) r.scan_axis = int(a.get_int("--scan-axis", -1000, 1000));
  r.out = a.get("--out");
  r.max_logits = a.get_all("--max-logits");
  if (a.has("--qk-clip-threshold"))
    r.qk_clip_threshold = a.get_double("--qk-clip-threshold", 1e-30, 1e30);
  r.qk_clip_per_group = a.has("--qk-clip-per-group");
  if (a.given("--qk-clip-mode")) r.qk_clip_mode = a.get("--qk-clip-mode");
  if (a.has("--qk-clip-calibrate")) r.qk_clip_calibrate = a.get("--qk-clip-calibrate");
  r.lora = a.get_all("--lora");
  r.lora_name = a.get_all("--lora-name");
  if (a.given("--lora-scale")) r.lora_scale = a.get_double("--lora-scale", -1e6, 1e6);
  r.merge_lora = a.has("--merge-lora");
  if (a.has("--tokenizer")) r.tokenizer = a.get("--tokenizer");
  if (a.given("--weights-layout")) r.weights_layout = a.get("--weights-layout");
  r.force = a.has("--force");
  const PreparedExport prepared =
      prepare_export(r, OptionSpelling::Cli, [&](const std::string& m) { return a.error(m); });
  const ExportOptions& opt = prepared.options;

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
