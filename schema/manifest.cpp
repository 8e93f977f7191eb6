#include "schema/manifest.h"

#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <type_traits>

#include "common/checked.h"
#include "common/crc32c.h"
#include "common/error.h"
#include "common/mapped_file.h"
#include "kiln_generated.h"
#include "schema/format.h"

namespace kiln {

namespace {

// A field's FlatBuffers slot is its position in visit_fields(), which follows kiln.fbs
// (model_config_test.cpp holds the two together). Scalars are stored in the schema's types: bool
// and RopeLayout as ubyte.
template <class T>
using FbScalar =
    std::conditional_t<std::is_same_v<T, bool> || std::is_same_v<T, RopeLayout>, uint8_t, T>;

// The same bytes as flatc's CreateModelConfigDirect, which the manifests before this list were
// written with: the strings first, in field order; then the fields from the widest to the
// narrowest (8-byte scalars, 4-byte string offsets, 1-byte scalars), within a width the last
// field first.
flatbuffers::Offset<fb::ModelConfig> config_to_fb(flatbuffers::FlatBufferBuilder& b,
                                                  const ModelConfig& c) {
  struct Slot {
    size_t width;
    std::function<void()> add;
  };
  std::vector<Slot> slots;
  visit_fields(c, [&](const char*, const auto& value, const auto&) {
    using T = std::decay_t<decltype(value)>;
    const auto vt = flatbuffers::FieldIndexToOffset(flatbuffers::voffset_t(slots.size()));
    if constexpr (std::is_same_v<T, std::string>) {
      const auto s = b.CreateString(value);
      slots.push_back({sizeof(flatbuffers::uoffset_t), [&b, vt, s] { b.AddOffset(vt, s); }});
    } else {
      using S = FbScalar<T>;
      slots.push_back(
          {sizeof(S), [&b, vt, v = static_cast<S>(value)] { b.AddElement(vt, v, S{}); }});
    }
  });
  const auto start = b.StartTable();
  for (const size_t width : {8, 4, 2, 1})
    for (auto it = slots.rbegin(); it != slots.rend(); ++it)
      if (it->width == width) it->add();
  return flatbuffers::Offset<fb::ModelConfig>(b.EndTable(start));
}

ModelConfig config_from_fb(const fb::ModelConfig& f) {
  // The generated accessors are named per field; the slot positions are read through the table.
  const auto& t = reinterpret_cast<const flatbuffers::Table&>(f);
  ModelConfig c;
  flatbuffers::voffset_t index = 0;
  visit_fields(c, [&](const char*, auto& value, const auto&) {
    using T = std::decay_t<decltype(value)>;
    const auto vt = flatbuffers::FieldIndexToOffset(index++);
    if constexpr (std::is_same_v<T, std::string>) {
      const auto* s = t.GetPointer<const flatbuffers::String*>(vt);
      value = s ? s->str() : "";
    } else if constexpr (std::is_same_v<T, bool>) {
      value = t.GetField<uint8_t>(vt, 0) != 0;
    } else {
      value = static_cast<T>(t.GetField<FbScalar<T>>(vt, 0));
    }
  });
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
