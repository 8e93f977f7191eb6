#include "export/exporter.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>

#include "common/bf16.h"
#include "common/durable_output.h"
#include "common/error.h"
#include "common/file_io.h"
#include "common/interrupt.h"
#include "export/adapter.h"
#include "export/config_reader.h"
#include "export/key_layout.h"
#include "export/param_names.h"
#include "export/safetensors.h"
#include "export/unroll.h"
#include "schema/format.h"
#include "schema/manifest.h"
#include "tokenizer/tokenizer.h"

namespace kiln {

namespace fs = std::filesystem;

namespace {

std::string file_of(const SourceTensor& t) {
  return t.file ? t.file->path() : "?";
}

uint64_t numel(const std::vector<int64_t>& s) {
  uint64_t n = 1;
  for (int64_t d : s) n *= uint64_t(d);
  return n;
}

struct PlannedTensor {
  TensorSpec spec;
  LayerTensorSource src;
};

struct PlannedBlob {
  std::string file;
  int layer = -1;
  LayerKind kind = LayerKind::Globals;
  std::vector<PlannedTensor> tensors;
};

struct Plan {
  std::vector<PlannedBlob> blobs;
  KeyLayout layout = KeyLayout::MaxTextLinen;
  bool scanned = false;
};

std::string checkpoint_names(const Checkpoint& ckpt) {
  std::string s;
  for (const auto& [path, size] : ckpt.files()) s += (s.empty() ? "" : ", ") + path;
  return s;
}

// Decides where every artifact tensor comes from and checks names and shapes against the config
// before a single byte is written.
Plan make_plan(const Checkpoint& ckpt, const ExportConfig& cfg) {
  const ModelConfig& mc = cfg.model;
  std::vector<std::string> raw_keys;
  for (const auto& t : ckpt.tensors()) raw_keys.push_back(t.key);
  Plan plan;
  plan.layout = detect_key_layout(raw_keys, checkpoint_names(ckpt));

  std::map<std::string, const SourceTensor*> canonical;
  for (const auto& t : ckpt.tensors()) {
    auto ck = canonical_key(t.key, plan.layout);
    if (!ck) continue;
    auto [it, inserted] = canonical.emplace(*ck, &t);
    if (!inserted)
      throw Error(file_of(t) + ": key '" + t.key + "' and key '" + it->second->key +
                  "' both name parameter '" + *ck + "'");
  }

  std::set<std::string> consumed;
  std::vector<std::string> missing;
  auto check_shape = [&](const SourceTensor& t, const std::vector<int64_t>& want,
                         const std::string& why) {
    if (t.shape != want)
      throw Error(file_of(t) + ": key '" + t.key + "' has shape " + shape_to_string(t.shape) +
                  ", expected " + shape_to_string(want) + " " + why);
  };

  PlannedBlob globals{kGlobalsFile, -1, LayerKind::Globals, {}};
  for (const auto& spec : global_tensor_specs(mc)) {
    std::string key = maxtext_path(kGlobalNames, spec.name);
    auto it = canonical.find(key);
    if (it == canonical.end()) {
      missing.push_back(key);
      continue;
    }
    check_shape(*it->second, spec.shape,
                "(vocab_size " + std::to_string(mc.vocab_size) + ", emb_dim " +
                    std::to_string(mc.emb_dim) + ")");
    consumed.insert(key);
    globals.tensors.push_back({spec, {it->second, -1, 0}});
  }
  plan.blobs.push_back(std::move(globals));

  for (const GroupSpan& span : layer_groups(mc)) {
    LayerGroup group(canonical, span.name, cfg.param_scan_axis);
    plan.scanned = plan.scanned || group.scanned();
    for (int64_t j = 0; j < span.count; ++j) {
      const int64_t l = span.first_layer + j;
      char name[32];
      std::snprintf(name, sizeof name, "layer-%03lld.kblob", static_cast<long long>(l));
      PlannedBlob blob{name, int(l), mc.is_moe_layer(l) ? LayerKind::MoE : LayerKind::Dense, {}};
      for (const auto& spec : layer_tensor_specs(mc, int(l))) {
        std::string param = mc.is_deepseek() ? maxtext_path(kDeepSeekLayerNames, spec.name)
                                             : maxtext_path(kLlamaLayerNames, spec.name);
        LayerTensorSource src = group.find(j, param);
        std::string key = group.key_for(j, param);
        if (!src.tensor) {
          if (!group.scanned() || j == 0) missing.push_back(key);
          continue;
        }
        if (group.scanned()) {
          if (j == 0)
            check_shape(*src.tensor,
                        scanned_shape(spec.shape, span.count, cfg.param_scan_axis, src.tensor->key),
                        "(layer parameter " + shape_to_string(spec.shape) + " with " +
                            std::to_string(span.count) + " layers of '" + span.name +
                            "' stacked on axis " + std::to_string(cfg.param_scan_axis) + ")");
        } else {
          check_shape(*src.tensor, spec.shape, "from the model config");
        }
        consumed.insert(key);
        blob.tensors.push_back({spec, src});
      }
      plan.blobs.push_back(std::move(blob));
    }
  }

  if (!missing.empty()) {
    std::string list;
    for (size_t i = 0; i < missing.size() && i < 4; ++i) list += (i ? "', '" : "") + missing[i];
    if (missing.size() > 4)
      list += "' and " + std::to_string(missing.size() - 4) + " more";
    else
      list += "'";
    throw Error(checkpoint_names(ckpt) + ": missing tensor" + (missing.size() > 1 ? "s" : "") +
                " '" + list + " (" + std::string(key_layout_name(plan.layout)) +
                " layout; required by decoder_block " + mc.decoder_block + ")");
  }
  for (const auto& [key, t] : canonical) {
    if (consumed.count(key)) continue;
    throw Error(file_of(*t) + ": unknown tensor '" + t->key + "' (parameter '" + key +
                "' is not part of a " + mc.decoder_block + " model with this config)");
  }
  return plan;
}

// Converts elements [begin, begin + n) of an unscanned source tensor to f32.
void source_range_to_f32(const SourceTensor& t, uint64_t begin, uint64_t n, float* out) {
  convert_to_f32(t.dtype, t.data + begin * dtype_size(t.dtype), size_t(n), out);
}

// NaN and infinite values of one artifact tensor after its conversion to bf16 (which also turns
// finite f32 values beyond the bf16 range into infinities).
struct NonFiniteScan {
  uint64_t nan = 0;
  uint64_t inf = 0;
  uint64_t first = 0;  // flat index of the first one, when any

  bool any() const { return nan + inf > 0; }
  // Scans x[0, n), element `base` of the tensor.
  void add(const uint16_t* x, size_t n, uint64_t base) {
    constexpr uint16_t kExponent = 0x7f80;
    constexpr size_t kBlock = 4096;
    for (size_t b = 0; b < n; b += kBlock) {
      const size_t e = std::min(n, b + kBlock);
      bool hit = false;
      for (size_t i = b; i < e; ++i) hit |= (x[i] & kExponent) == kExponent;  // vectorised
      if (!hit) continue;
      for (size_t i = b; i < e; ++i) {
        if ((x[i] & kExponent) != kExponent) continue;
        if (!any()) first = base + i;
        ++((x[i] & 0x7f) ? nan : inf);
      }
    }
  }
};

// A weight the engine would turn into NaN logits is refused with where it came from.
void refuse_nonfinite(const NonFiniteScan& scan, const PlannedBlob& blob, const PlannedTensor& t) {
  if (!scan.any()) return;
  const std::string where =
      blob.layer < 0 ? "tensor '" + t.spec.name + "'"
                     : "layer " + std::to_string(blob.layer) + " tensor '" + t.spec.name + "'";
  throw Error(file_of(*t.src.tensor) + ": key '" + t.src.tensor->key + "' (" + where +
              "): " + std::to_string(scan.nan) + " NaN and " + std::to_string(scan.inf) +
              " infinite values in bf16, the first at flat index " + std::to_string(scan.first) +
              " (kiln does not export non-finite weights)");
}

// The bytes of a SentencePiece model whose ids fit the model's vocabulary; `pieces` gets its size.
std::vector<uint8_t> read_tokenizer(const std::string& path, const ModelConfig& c,
                                    int64_t& pieces) {
  const std::string text = read_whole_file(path);
  std::vector<uint8_t> bytes(text.begin(), text.end());
  const Tokenizer tok(bytes, path);
  if (tok.vocab_size() > c.vocab_size)
    throw Error(path + ": the tokenizer has " + std::to_string(tok.vocab_size()) +
                " pieces but the model's vocab_size is " + std::to_string(c.vocab_size) +
                " (expected at most as many pieces as vocabulary entries)");
  pieces = tok.vocab_size();
  return bytes;
}

}  // namespace

std::string check_out_dir(const ExportOptions& opt) {
  fs::path out = fs::path(opt.out_dir);
  if (out.filename().empty()) out = out.parent_path();
  if (fs::exists(out) && !opt.force)
    throw Error(out.string() + ": already exists (use --force to replace it)");
  const fs::path parent = out.has_parent_path() ? out.parent_path() : fs::path(".");
  if (!fs::is_directory(parent))
    throw Error(out.string() + ": parent directory '" + parent.string() + "' does not exist");
  return out.string();
}

namespace {

using ProgressFn = std::function<void(const ExportProgress&)>;

// How export_once is asked to write: the options' own QK-Clip statistics, or a plan made by the
// calibration; a scratch artifact (a calibration pass) is written without fsync, since a crash
// loses nothing the user asked for.
struct Pass {
  const QkClipRecord* qk_clip = nullptr;
  bool scratch = false;
};

ExportSummary export_once(const ExportOptions& opt, const ProgressFn& progress, Pass pass) {
  auto t0 = std::chrono::steady_clock::now();
  if (opt.checkpoints.empty()) throw Error("export: no --checkpoint given");
  const fs::path out = check_out_dir(opt);
  // Before any work, so that a malformed SOURCE_DATE_EPOCH is reported at once.
  const std::string created_utc = output_time_utc();

  ExportConfig cfg = read_export_config(opt.config_path, opt.overrides);
  if (opt.scan_axis) cfg.param_scan_axis = *opt.scan_axis;
  cfg.model.validate(opt.config_path);
  if (cfg.param_scan_axis < 0 || cfg.param_scan_axis > 1)
    throw Error(opt.config_path + ": param_scan_axis " + std::to_string(cfg.param_scan_axis) +
                " is out of range (the scanned layer parameters include 1-D norm scales, so the "
                "axis must be 0 or 1)");

  Checkpoint ckpt = Checkpoint::open(opt.checkpoints);
  Plan plan = make_plan(ckpt, cfg);
  QkClipRecord qk_clip;
  if (pass.qk_clip) {
    qk_clip = *pass.qk_clip;
  } else if (opt.qk_clip.threshold != 0 || !opt.qk_clip.stats.empty()) {
    if (opt.qk_clip.stats.empty())
      throw Error("--qk-clip-threshold needs statistics: give --max-logits FILE");
    if (opt.qk_clip.threshold == 0) throw Error("--max-logits needs --qk-clip-threshold TAU");
    qk_clip = plan_qk_clip(opt.qk_clip, cfg.model, read_max_logits(opt.qk_clip, cfg.model));
  }

  std::vector<uint8_t> tokenizer_bytes;
  int64_t tokenizer_pieces = 0;
  if (!opt.tokenizer_path.empty()) {
    tokenizer_bytes = read_tokenizer(opt.tokenizer_path, cfg.model, tokenizer_pieces);
  }

  // Adapters are checked against the config before anything is written.
  std::vector<AdapterSource> loras;
  for (const LoraOption& l : opt.loras) {
    if (!opt.merge_lora) check_adapter_name(l.name, l.dir + " (--lora-name)");
    loras.push_back(AdapterSource::open(l.dir, cfg.model, l.scale));
  }
  for (size_t i = 0; i < opt.loras.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (!opt.merge_lora && opt.loras[i].name == opt.loras[j].name)
        throw Error("--lora-name '" + opt.loras[i].name + "' is given twice");

  // Written into a locked temporary sibling and swapped into place at the end (common/
  // durable_output.h); it also removes what killed exports to the same place left.
  StagedDirectory staged(out.string());
  const fs::path tmp = staged.path();

  Manifest manifest;
  manifest.config = cfg.model;
  manifest.qk_clip = qk_clip;
  manifest.tokenizer = std::move(tokenizer_bytes);
  ExportSummary summary;
  summary.tokenizer_pieces = tokenizer_pieces;
  ExportProgress prog;
  prog.blobs_total = int64_t(plan.blobs.size());

  // One tensor in f32 at a time; the globals (the embedding is the largest tensor of a model)
  // stream in chunks since no stage but the conversion touches them.
  constexpr uint64_t kChunk = uint64_t(1) << 22;
  uint64_t max_layer_numel = kChunk;
  for (const auto& b : plan.blobs)
    for (const auto& t : b.tensors)
      if (b.layer >= 0) max_layer_numel = std::max(max_layer_numel, numel(t.spec.shape));
  std::vector<float> f32(max_layer_numel);
  std::vector<uint16_t> bf16(max_layer_numel);
  std::vector<uint16_t> whole, blocked;  // a matrix stored blocked: bf16, then its blocked form

  for (const auto& blob : plan.blobs) {
    std::vector<TensorSpec> specs;
    for (const auto& t : blob.tensors) {
      specs.push_back(t.spec);
      if (opt.weights_layout == TensorLayout::RowMajor) continue;
      if (const std::optional<MatrixView> m = matrix_view(cfg.model, t.spec)) {
        specs.back().layout = opt.weights_layout;
        specs.back().matrix_k = m->K;
        specs.back().matrix_batch = m->batch;
      }
    }
    BlobWriter writer((tmp / blob.file).string(), blob.layer, blob.kind, specs);
    for (size_t ti = 0; ti < blob.tensors.size(); ++ti) {
      const PlannedTensor& t = blob.tensors[ti];
      const TensorSpec& stored = specs[ti];
      throw_if_interrupted("export");
      uint64_t n = numel(t.spec.shape);
      NonFiniteScan nonfinite;
      const bool blocked_layout = stored.layout != TensorLayout::RowMajor;
      if (blob.layer < 0 && !blocked_layout) {
        for (uint64_t b = 0; b < n; b += kChunk) {
          uint64_t m = std::min(kChunk, n - b);
          source_range_to_f32(*t.src.tensor, b, m, f32.data());
          convert_f32_to_bf16(f32.data(), bf16.data(), m);
          nonfinite.add(bf16.data(), m, b);
          writer.append(bf16.data(), m * 2);
          // Read pages of an mmapped input count as resident; drop them as we go so a
          // multi-GB embedding does not add its size to the peak.
          const size_t esize = dtype_size(t.src.tensor->dtype);
          t.src.tensor->file->release_range(t.src.tensor->data + b * esize, m * esize);
        }
        refuse_nonfinite(nonfinite, blob, t);
        continue;
      }
      // The whole tensor in bf16: a layer's after unrolling, merging and clipping; a global
      // matrix stored blocked (the output head) converted in chunks into one buffer.
      uint16_t* values = bf16.data();
      if (blocked_layout && blob.layer < 0) {
        whole.resize(n);
        values = whole.data();
        for (uint64_t b = 0; b < n; b += kChunk) {
          const uint64_t m = std::min(kChunk, n - b);
          source_range_to_f32(*t.src.tensor, b, m, f32.data());
          convert_f32_to_bf16(f32.data(), values + b, m);
        }
      } else {
        unroll_scanned_layer(t.src, f32.data());
        if (opt.merge_lora)
          for (const AdapterSource& lora : loras)
            if (lora.find(blob.layer, t.spec.name))
              merge_lora(lora.read(blob.layer, t.spec.name), f32.data());
        apply_qk_clip(qk_clip, cfg.model, blob.layer, t.spec.name, f32.data());
        convert_f32_to_bf16(f32.data(), values, n);
      }
      nonfinite.add(values, n, 0);
      refuse_nonfinite(nonfinite, blob, t);
      if (blocked_layout) {
        const BlockedMatrices m = *blocked_view(n, stored.matrix_k, stored.matrix_batch);
        blocked.resize(size_t(m.values()));
        for (int64_t x = 0; x < m.batch; ++x)
          to_ba16a64b2a(values + x * m.K * m.N, m, blocked.data() + x * m.matrix_values());
        writer.write_tensor(t.spec.name, blocked.data(), blocked.size() * 2);
      } else {
        writer.write_tensor(t.spec.name, values, n * 2);
      }
      t.src.tensor->file->release_range(t.src.tensor->data, t.src.tensor->nbytes);
    }
    auto res = writer.finish();
    manifest.blobs.push_back({blob.file, blob.layer, blob.kind, res.size, res.header_crc32c});
    prog.blobs_done++;
    prog.bytes_written += res.size;
    if (progress) progress(prog);
  }

  for (size_t i = 0; i < loras.size(); ++i) {
    if (opt.merge_lora) {
      manifest.adapters.push_back(merged_adapter_record(loras[i]));
    } else {
      const std::string& name = opt.loras[i].name;
      AdapterRecord r = write_adapter_blobs(loras[i], cfg.model, qk_clip, name,
                                            (tmp / kAdaptersDir / name).string());
      for (const auto& b : r.blobs) prog.bytes_written += b.size;
      manifest.adapters.push_back(std::move(r));
    }
  }

  Provenance& p = manifest.provenance;
  p.exporter_version = KILN_VERSION;
  p.created_utc = created_utc;
  p.sources = ckpt.files();
  p.config_source = opt.config_path;
  p.key_layout = std::string(key_layout_name(plan.layout));
  p.scanned = plan.scanned;
  p.scan_axis = cfg.param_scan_axis;
  p.options = opt.recorded_options;
  // p.nonfinite_nan / nonfinite_inf stay 0: a non-finite weight stops the export above. The
  // fields remain in the schema so that artifacts of earlier builds, which exported them with a
  // warning, still read.
  std::vector<uint8_t> bytes = serialize_manifest(manifest);
  {
    std::ofstream f(tmp / kManifestFile, std::ios::binary);
    f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    f.close();
    if (!f) throw Error((tmp / kManifestFile).string() + ": write failed");
  }

  staged.commit(opt.force, !pass.scratch);

  summary.layers = cfg.model.num_decoder_layers;
  summary.bytes_written = prog.bytes_written + bytes.size();
  summary.key_layout = p.key_layout;
  summary.scanned = plan.scanned;
  summary.qk_clip = qk_clip;
  summary.adapters = manifest.adapters;
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return summary;
}

// The sequential calibrate-and-clip of export_artifact (exporter.h): the QK-Clip plan, every
// layer's gammas measured with the layers before it clipped.
QkClipRecord calibrate_qk_clip(const ExportOptions& opt, const ProgressFn& progress) {
  MaxLogitCalibrator& calibrator = *opt.qk_clip.calibrator;
  const ExportConfig cfg = read_export_config(opt.config_path, opt.overrides);
  const ModelConfig& c = cfg.model;
  const int64_t L = c.num_decoder_layers, H = c.num_query_heads;
  QkClipRecord rec = plan_qk_clip(opt.qk_clip, c,
                                  MaxLogits{L,
                                            H,
                                            std::vector<float>(size_t(L * H), NAN),
                                            {calibrator.source() + " (sequential calibration)"}});
  const float tau = float(opt.qk_clip.threshold);

  const StagedDirectory scratch(check_out_dir(opt), "kiln-calibrate");
  ExportOptions scratch_opt = opt;
  scratch_opt.out_dir = (fs::path(scratch.path()) / "model.kiln").string();
  scratch_opt.force = true;

  ExportProgress prog;
  prog.calibration_layers = L;
  std::vector<float> stats;
  bool stale = true;  // the last measurement predates a clip
  for (int64_t l = 0; l < L; ++l) {
    if (stale) {
      export_once(scratch_opt, {}, Pass{&rec, true});
      stats = calibrator.max_logits(scratch_opt.out_dir);
      if (stats.size() != size_t(L * H))
        throw std::logic_error("calibrate_qk_clip: " + std::to_string(stats.size()) +
                               " statistics for " + std::to_string(L) + " layers x " +
                               std::to_string(H) + " heads");
      stale = false;
      ++prog.calibration_passes;
    }
    for (int64_t h = 0; h < H; ++h) {
      const size_t i = size_t(l * H + h);
      rec.max_logit[i] = stats[i];
      rec.gamma[i] = qk_clip_gamma(stats[i], tau);
      stale = stale || rec.gamma[i] < 1.0f;
    }
    prog.calibrated_layers = l + 1;
    if (progress) progress(prog);
  }
  return rec;
}

}  // namespace

ExportSummary export_artifact(const ExportOptions& opt, const ProgressFn& progress) {
  if (!opt.qk_clip.calibrator) return export_once(opt, progress, Pass{});
  const QkClipRecord plan = calibrate_qk_clip(opt, progress);
  return export_once(opt, progress, Pass{&plan, false});
}

}  // namespace kiln
