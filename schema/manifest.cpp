#include "schema/manifest.h"

#include <cstring>
#include <filesystem>
#include <optional>

#include "common/checked.h"
#include "common/crc32c.h"
#include "common/error.h"
#include "common/mapped_file.h"
#include "kiln_generated.h"
#include "schema/format.h"

namespace kiln {

namespace {

flatbuffers::Offset<fb::ModelConfig> config_to_fb(flatbuffers::FlatBufferBuilder& b,
                                                  const ModelConfig& c) {
  return fb::CreateModelConfigDirect(
      b, c.decoder_block.c_str(), c.model_name.c_str(), c.emb_dim, c.num_query_heads,
      c.num_kv_heads, c.head_dim, c.mlp_dim, c.num_decoder_layers, c.vocab_size,
      c.normalization_layer_epsilon, static_cast<fb::RopeLayout>(c.rope_layout),
      c.rope_min_timescale, c.rope_max_timescale, c.rope_linear_scaling_factor, c.rope_use_scale,
      c.use_qk_norm, c.query_scale, c.logits_via_embedding, c.normalize_embedding_logits,
      c.final_logits_soft_cap, c.max_target_length, c.first_num_dense_layers, c.q_lora_rank,
      c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.num_experts,
      c.num_experts_per_tok, c.moe_mlp_dim, c.shared_experts, c.routed_scaling_factor,
      c.routed_score_func.c_str(), c.routed_bias, c.routing_weights_pre_bias, c.n_routing_groups,
      c.topk_routing_group, c.max_position_embeddings, c.original_max_position_embeddings,
      c.rope_factor, c.beta_fast, c.beta_slow, c.mscale, c.rope_interleave, c.rope_truncate);
}

ModelConfig config_from_fb(const fb::ModelConfig& f) {
  ModelConfig c;
  c.decoder_block = f.decoder_block()->str();
  c.model_name = f.model_name() ? f.model_name()->str() : "";
  c.emb_dim = f.emb_dim();
  c.num_query_heads = f.num_query_heads();
  c.num_kv_heads = f.num_kv_heads();
  c.head_dim = f.head_dim();
  c.mlp_dim = f.mlp_dim();
  c.num_decoder_layers = f.num_decoder_layers();
  c.vocab_size = f.vocab_size();
  c.normalization_layer_epsilon = f.normalization_layer_epsilon();
  c.rope_layout = static_cast<RopeLayout>(f.rope_layout());
  c.rope_min_timescale = f.rope_min_timescale();
  c.rope_max_timescale = f.rope_max_timescale();
  c.rope_linear_scaling_factor = f.rope_linear_scaling_factor();
  c.rope_use_scale = f.rope_use_scale();
  c.use_qk_norm = f.use_qk_norm();
  c.query_scale = f.query_scale();
  c.logits_via_embedding = f.logits_via_embedding();
  c.normalize_embedding_logits = f.normalize_embedding_logits();
  c.final_logits_soft_cap = f.final_logits_soft_cap();
  c.max_target_length = f.max_target_length();
  c.first_num_dense_layers = f.first_num_dense_layers();
  c.q_lora_rank = f.q_lora_rank();
  c.kv_lora_rank = f.kv_lora_rank();
  c.qk_nope_head_dim = f.qk_nope_head_dim();
  c.qk_rope_head_dim = f.qk_rope_head_dim();
  c.v_head_dim = f.v_head_dim();
  c.num_experts = f.num_experts();
  c.num_experts_per_tok = f.num_experts_per_tok();
  c.moe_mlp_dim = f.moe_mlp_dim();
  c.shared_experts = f.shared_experts();
  c.routed_scaling_factor = f.routed_scaling_factor();
  c.routed_score_func = f.routed_score_func() ? f.routed_score_func()->str() : "";
  c.routed_bias = f.routed_bias();
  c.routing_weights_pre_bias = f.routing_weights_pre_bias();
  c.n_routing_groups = f.n_routing_groups();
  c.topk_routing_group = f.topk_routing_group();
  c.max_position_embeddings = f.max_position_embeddings();
  c.original_max_position_embeddings = f.original_max_position_embeddings();
  c.rope_factor = f.rope_factor();
  c.beta_fast = f.beta_fast();
  c.beta_slow = f.beta_slow();
  c.mscale = f.mscale();
  c.rope_interleave = f.rope_interleave();
  c.rope_truncate = f.rope_truncate();
  return c;
}

}  // namespace

std::vector<uint8_t> serialize_manifest(const Manifest& m) {
  flatbuffers::FlatBufferBuilder b(1 << 16);
  b.ForceDefaults(true);  // every hyper-parameter is written, even when it equals a default
  auto config = config_to_fb(b, m.config);
  std::vector<flatbuffers::Offset<fb::BlobRef>> blobs;
  for (const auto& e : m.blobs)
    blobs.push_back(fb::CreateBlobRefDirect(
        b, e.file.c_str(), e.layer, static_cast<fb::LayerKind>(e.kind), e.size, e.header_crc32c));
  const auto& p = m.provenance;
  std::vector<flatbuffers::Offset<fb::SourceFile>> sources;
  for (const auto& [path, size] : p.sources)
    sources.push_back(fb::CreateSourceFileDirect(b, path.c_str(), size));
  std::vector<flatbuffers::Offset<fb::KeyValue>> options;
  for (const auto& [k, v] : p.options)
    options.push_back(fb::CreateKeyValueDirect(b, k.c_str(), v.c_str()));
  auto prov = fb::CreateProvenanceDirect(
      b, p.exporter_version.c_str(), p.created_utc.c_str(), &sources, p.config_source.c_str(),
      p.key_layout.c_str(), p.scanned, p.scan_axis, &options, p.nonfinite_nan, p.nonfinite_inf);
  flatbuffers::Offset<fb::QkClip> qk = 0;
  if (m.qk_clip.applied) {
    const QkClipRecord& q = m.qk_clip;
    std::vector<flatbuffers::Offset<flatbuffers::String>> srcs;
    for (const auto& src : q.sources) srcs.push_back(b.CreateString(src));
    qk = fb::CreateQkClipDirect(b, q.threshold, q.mode.c_str(), q.per_group, &srcs, q.heads,
                                &q.gamma, &q.max_logit, q.targets.c_str());
  }
  std::vector<flatbuffers::Offset<fb::Adapter>> adapters;
  for (const auto& a : m.adapters) {
    std::vector<flatbuffers::Offset<fb::LoraTarget>> targets;
    for (const auto& t : a.targets)
      targets.push_back(fb::CreateLoraTargetDirect(b, t.layer, t.tensor.c_str(), t.rank, t.scale));
    std::vector<flatbuffers::Offset<fb::BlobRef>> ablobs;
    for (const auto& e : a.blobs)
      ablobs.push_back(fb::CreateBlobRefDirect(
          b, e.file.c_str(), e.layer, static_cast<fb::LayerKind>(e.kind), e.size, e.header_crc32c));
    adapters.push_back(fb::CreateAdapterDirect(
        b, a.name.c_str(), a.merged, a.format.c_str(), a.source.c_str(), a.rank, a.lora_alpha,
        a.use_rslora, a.lora_scale, &targets, &ablobs, a.created_utc.c_str()));
  }
  auto root = fb::CreateManifestDirect(b, kFormatMajor, kFormatMinor, config, &blobs,
                                       m.tokenizer.empty() ? nullptr : &m.tokenizer, prov, qk,
                                       adapters.empty() ? nullptr : &adapters);
  fb::FinishManifestBuffer(b, root);
  std::vector<uint8_t> out(b.GetBufferPointer(), b.GetBufferPointer() + b.GetSize());
  const uint32_t trailer[2] = {crc32c(out.data(), out.size()), 0};  // little-endian, as x86-64
  out.insert(out.end(), kManifestTrailerMagic, kManifestTrailerMagic + 8);
  const auto* t = reinterpret_cast<const uint8_t*>(trailer);
  out.insert(out.end(), t, t + sizeof trailer);
  return out;
}

Manifest parse_manifest(const uint8_t* data, size_t size, const std::string& path,
                        bool verify_checksum) {
  const bool has_trailer = size >= kManifestTrailerSize &&
                           std::memcmp(data + size - kManifestTrailerSize, kManifestTrailerMagic,
                                       sizeof kManifestTrailerMagic) == 0;
  if (has_trailer) {
    size -= kManifestTrailerSize;
    if (verify_checksum) {
      uint32_t stored[2];
      std::memcpy(stored, data + size + sizeof kManifestTrailerMagic, sizeof stored);
      if (stored[0] != crc32c(data, size) || stored[1] != 0)
        throw Error(path + ": checksum mismatch (the manifest was edited or is corrupt)");
    }
  }
  flatbuffers::Verifier verifier(data, size);
  if (size < 8 || !fb::ManifestBufferHasIdentifier(data))
    throw Error(path + ": not a kiln manifest (identifier 'KILN' missing)");
  if (!fb::VerifyManifestBuffer(verifier))
    throw Error(path + ": manifest fails FlatBuffers verification (corrupt or truncated)");
  // Checked after the FlatBuffer so that a truncated or foreign file is reported as such.
  if (!has_trailer && verify_checksum)
    throw Error(path +
                ": has no checksum (written by a kiln before format 1.3); re-export it, or pass "
                "--no-verify to read it unchecked");
  const fb::Manifest* f = fb::GetManifest(data);
  Manifest m;
  m.format_major = f->format_major();
  m.format_minor = f->format_minor();
  if (m.format_major != kFormatMajor)
    throw Error(path + ": manifest format version " + std::to_string(m.format_major) +
                " is not supported (this kiln reads version " + std::to_string(kFormatMajor) + ")");
  m.config = config_from_fb(*f->config());
  m.config.validate(path);
  for (const auto* e : *f->blobs())
    m.blobs.push_back({e->file()->str(), e->layer(), static_cast<LayerKind>(e->kind()), e->size(),
                       e->header_crc32c()});
  if (f->tokenizer()) m.tokenizer.assign(f->tokenizer()->begin(), f->tokenizer()->end());
  if (const auto* p = f->provenance()) {
    auto s = [](const flatbuffers::String* x) { return x ? x->str() : std::string(); };
    m.provenance.exporter_version = s(p->exporter_version());
    m.provenance.created_utc = s(p->created_utc());
    if (p->sources())
      for (const auto* src : *p->sources())
        m.provenance.sources.emplace_back(s(src->path()), src->size());
    m.provenance.config_source = s(p->config_source());
    m.provenance.key_layout = s(p->key_layout());
    m.provenance.scanned = p->scanned();
    m.provenance.scan_axis = p->scan_axis();
    if (p->options())
      for (const auto* kv : *p->options())
        m.provenance.options.emplace_back(s(kv->key()), s(kv->value()));
    m.provenance.nonfinite_nan = p->nonfinite_nan();
    m.provenance.nonfinite_inf = p->nonfinite_inf();
  }
  if (const auto* q = f->qk_clip()) {
    QkClipRecord& r = m.qk_clip;
    r.applied = true;
    r.threshold = q->threshold();
    r.mode = q->mode() ? q->mode()->str() : "";
    r.targets = q->targets() ? q->targets()->str() : "";
    r.per_group = q->per_group();
    if (q->sources())
      for (const auto* src : *q->sources()) r.sources.push_back(src->str());
    r.heads = q->heads();
    if (q->gamma()) r.gamma.assign(q->gamma()->begin(), q->gamma()->end());
    if (q->max_logit()) r.max_logit.assign(q->max_logit()->begin(), q->max_logit()->end());
    if (r.heads != m.config.num_query_heads)
      throw Error(path + ": QK-Clip record has " + std::to_string(r.heads) + " heads, the config " +
                  std::to_string(m.config.num_query_heads) + " query heads");
    // validate() bounds the config's sizes, but a crafted record must not wrap this product.
    const std::optional<uint64_t> want =
        checked_mul(uint64_t(m.config.num_decoder_layers), uint64_t(r.heads));
    if (!want || r.gamma.size() != *want || r.max_logit.size() != *want)
      throw Error(path + ": QK-Clip record does not match the config (expected " +
                  (want ? std::to_string(*want) : "num_decoder_layers × heads") + " gammas)");
  }
  if (f->adapters()) {
    auto s = [](const flatbuffers::String* x) { return x ? x->str() : std::string(); };
    for (const auto* a : *f->adapters()) {
      AdapterRecord r;
      r.name = a->name()->str();
      check_adapter_name(r.name, path);
      r.merged = a->merged();
      r.format = s(a->format());
      r.source = s(a->source());
      r.rank = a->rank();
      r.lora_alpha = a->lora_alpha();
      r.use_rslora = a->use_rslora();
      r.lora_scale = a->lora_scale();
      r.created_utc = s(a->created_utc());
      if (a->targets())
        for (const auto* t : *a->targets()) {
          if (t->layer() < 0 || t->layer() >= m.config.num_decoder_layers || t->rank() <= 0)
            throw Error(path + ": adapter '" + r.name + "' has a target outside the model (layer " +
                        std::to_string(t->layer()) + ", rank " + std::to_string(t->rank()) + ")");
          r.targets.push_back({t->layer(), s(t->tensor()), t->rank(), t->scale()});
        }
      if (a->blobs())
        for (const auto* e : *a->blobs())
          r.blobs.push_back({e->file()->str(), e->layer(), static_cast<LayerKind>(e->kind()),
                             e->size(), e->header_crc32c()});
      m.adapters.push_back(std::move(r));
    }
  }
  return m;
}

void check_adapter_name(const std::string& name, const std::string& where) {
  bool ok = !name.empty() && name.size() <= 128 && name[0] != '.';
  for (char ch : name)
    ok = ok && ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                ch == '-' || ch == '_' || ch == '.');
  if (!ok)
    throw Error(where + ": adapter name '" + name +
                "' is not allowed (letters, digits, '-', '_', '.'; not starting with '.')");
}

std::string manifest_path(const std::string& dir) {
  return (std::filesystem::path(dir) / kManifestFile).string();
}

Manifest read_manifest_file(const std::string& path, bool verify_checksum) {
  MappedFile f(path);
  return parse_manifest(f.data(), f.size(), path, verify_checksum);
}

Manifest read_manifest_in(const std::string& dir, bool verify_checksum) {
  const std::string path = manifest_path(dir);
  if (!std::filesystem::exists(path))
    throw Error(path + ": missing (not a kiln artifact directory?)");
  return read_manifest_file(path, verify_checksum);
}

}  // namespace kiln
