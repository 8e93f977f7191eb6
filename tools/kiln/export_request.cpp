#include "tools/kiln/export_request.h"

#include <charconv>

namespace kiln::cli {

namespace {

// The shortest text that reads back as the same double ("30", "0.25"): numbers are recorded the
// same whether they came as command-line text or as Python floats.
std::string shortest(double v) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

}  // namespace

PreparedExport prepare_export(const ExportRequest& r, OptionSpelling spelling,
                              const std::function<UsageError(const std::string&)>& refuse) {
  // `name` as the front end spells it: "--merge-lora" or "merge_lora".
  auto n = [spelling](std::string name) {
    if (spelling == OptionSpelling::Python) return name;
    for (char& c : name)
      if (c == '_') c = '-';
    return "--" + name;
  };

  PreparedExport p;
  ExportOptions& o = p.options;
  o.checkpoints = r.checkpoints;
  o.config_path = r.config;
  for (const std::string& kv : r.set) {
    const auto eq = kv.find('=');
    if (eq == std::string::npos || eq == 0)
      throw refuse(n("set") + " expects KEY=VALUE, got '" + kv + "'");
    o.overrides.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
  }
  o.scan_axis = r.scan_axis;
  o.out_dir = r.out;
  o.force = r.force;
  o.qk_clip.stats = r.max_logits;
  o.qk_clip.threshold = r.qk_clip_threshold.value_or(0);
  o.qk_clip.per_group = r.qk_clip_per_group;
  if (r.qk_clip_mode) o.qk_clip.mode = *r.qk_clip_mode;
  if (r.tokenizer) o.tokenizer_path = *r.tokenizer;
  if (r.weights_layout) {
    if (*r.weights_layout == "blocked")
      o.weights_layout = TensorLayout::BA16a64b2a;
    else if (*r.weights_layout == "row-major")
      o.weights_layout = TensorLayout::RowMajor;
    else
      throw refuse(n("weights_layout") + " is row-major or blocked, got '" + *r.weights_layout +
                   "'");
  }

  o.merge_lora = r.merge_lora;
  if (r.merge_lora && !r.lora_name.empty())
    throw refuse(n("merge_lora") + " folds the adapters into the weights; do not also give " +
                 n("lora_name"));
  if (r.merge_lora && r.lora.empty()) throw refuse(n("merge_lora") + " needs " + n("lora"));
  if (!r.merge_lora && r.lora_name.size() != r.lora.size())
    throw refuse("give one " + n("lora_name") + " per " + n("lora") + " (or " + n("merge_lora") +
                 "): " + std::to_string(r.lora.size()) + " " + n("lora") + ", " +
                 std::to_string(r.lora_name.size()) + " " + n("lora_name"));
  if (r.lora_scale && r.lora.empty()) throw refuse(n("lora_scale") + " needs " + n("lora"));
  for (size_t i = 0; i < r.lora.size(); ++i)
    o.loras.push_back({r.lora[i], r.merge_lora ? "" : r.lora_name[i], r.lora_scale.value_or(1)});

  if (r.qk_clip_calibrate) {
    if (!r.max_logits.empty())
      throw refuse(n("qk_clip_calibrate") + " computes the statistics; do not also give " +
                   n("max_logits"));
    if (!r.qk_clip_threshold)
      throw refuse(n("qk_clip_calibrate") + " needs " + n("qk_clip_threshold"));
    if (r.qk_clip_per_group)
      throw refuse(n("qk_clip_calibrate") + " clips layer by layer; " + n("qk_clip_per_group") +
                   " does not apply");
    p.calibrator = std::make_unique<PromptsCalibrator>(*r.qk_clip_calibrate);
    o.qk_clip.calibrator = p.calibrator.get();
  }

  // Provenance, always in the CLI's spelling and in this order.
  auto record = [&o](const char* option, std::string value) {
    o.recorded_options.emplace_back(option, std::move(value));
  };
  for (const auto& f : r.max_logits) record("--max-logits", f);
  if (r.qk_clip_threshold) record("--qk-clip-threshold", shortest(*r.qk_clip_threshold));
  if (r.qk_clip_per_group) record("--qk-clip-per-group", "");
  if (r.qk_clip_mode) record("--qk-clip-mode", *r.qk_clip_mode);
  for (const auto& c : r.checkpoints) record("--checkpoint", c);
  record("--config", r.config);
  for (const auto& kv : r.set) record("--set", kv);
  if (r.scan_axis) record("--scan-axis", std::to_string(*r.scan_axis));
  if (r.force) record("--force", "");
  if (r.tokenizer) record("--tokenizer", *r.tokenizer);
  for (size_t i = 0; i < r.lora.size(); ++i) {
    record("--lora", r.lora[i]);
    if (!r.merge_lora) record("--lora-name", r.lora_name[i]);
  }
  if (r.lora_scale) record("--lora-scale", shortest(*r.lora_scale));
  if (r.merge_lora) record("--merge-lora", "");
  if (r.qk_clip_calibrate) record("--qk-clip-calibrate", *r.qk_clip_calibrate);
  if (r.weights_layout) record("--weights-layout", *r.weights_layout);
  return p;
}

}  // namespace kiln::cli
