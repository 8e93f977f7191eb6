#include "engine/artifact.h"

#include <algorithm>
#include <filesystem>

#include "common/clock.h"
#include "common/crc32c.h"
#include "common/error.h"
#include "engine/ops/parallel.h"
#include "schema/format.h"

namespace kiln {

namespace fs = std::filesystem;

namespace {

// Every tensor the config implies, in bf16 with its shape; the matrices (matrix_view) may be
// stored blocked, everything else must be row-major.
void check_tensor_set(const BlobView& view, const std::vector<TensorSpec>& specs,
                      const ModelConfig& config) {
  for (const auto& s : specs) {
    if (const std::optional<MatrixView> m = matrix_view(config, s))
      view.expect_matrix(s.name, s.shape, m->K, m->batch);
    else
      view.expect(s.name, DType::BF16, s.shape);
  }
  if (view.tensors().size() != specs.size()) {
    for (const auto& t : view.tensors()) {
      bool known = false;
      for (const auto& s : specs) known |= s.name == t.name;
      if (!known)
        throw Error(view.path() + ": unexpected tensor '" + t.name + "' for this model config");
    }
  }
}

}  // namespace

std::unique_ptr<Artifact> Artifact::open(const std::string& dir, const ArtifactOptions& opt) {
  const double t0 = now_seconds();
  if (!fs::is_directory(dir)) throw Error(dir + ": not an artifact directory (does not exist)");
  auto a = std::unique_ptr<Artifact>(new Artifact());
  a->dir_ = dir;
  const std::string mpath = manifest_path(dir);
  a->verify_ = opt.verify_checksums;
  a->manifest_ = read_manifest_in(dir, opt.verify_checksums);
  a->manifest_bytes_ = fs::file_size(mpath);
  const ModelConfig& c = a->manifest_.config;

  const auto& blobs = a->manifest_.blobs;
  if (blobs.size() != size_t(c.num_decoder_layers) + 1)
    throw Error(mpath + ": lists " + std::to_string(blobs.size()) + " blobs, expected " +
                std::to_string(c.num_decoder_layers + 1) + " (globals + one per layer)");
  for (size_t i = 0; i < blobs.size(); ++i) {
    const BlobEntry& e = blobs[i];
    int want_layer = int(i) - 1;
    if (e.layer != want_layer)
      throw Error(mpath + ": blob '" + e.file + "' is listed for layer " + std::to_string(e.layer) +
                  ", expected " + std::to_string(want_layer));
    if (e.file.find('/') != std::string::npos || e.file.find("..") != std::string::npos)
      throw Error(mpath + ": blob file name '" + e.file + "' must be a plain file name");
    std::string path = (fs::path(dir) / e.file).string();
    auto file = std::make_unique<MappedFile>(path);
    BlobView view = check_listed_blob(*file, e, path);
    check_tensor_set(
        view, want_layer < 0 ? global_tensor_specs(c) : layer_tensor_specs(c, want_layer), c);
    a->verified_.emplace_back(view.tensors().size(), !opt.verify_checksums);
    a->files_.push_back(std::move(file));
    a->views_.push_back(std::move(view));
  }
  a->open_seconds_ = now_seconds() - t0;
  if (opt.verify_checksums && !opt.verify_on_first_use) a->verify_remaining();
  return a;
}

void verify_tensor(const BlobView& blob, const BlobTensorInfo& t) {
  const std::span<const uint8_t> bytes = blob.bytes(t);
  // 1 MiB pieces taken by whichever thread is free (on a shared VM one core is often slowed by
  // its neighbours); their CRCs are joined in order. Below a few pieces a region costs more than
  // it saves.
  constexpr size_t kPiece = size_t(1) << 20;
  const int threads = ops::max_threads();
  const size_t pieces = (bytes.size() + kPiece - 1) / kPiece;
  uint32_t crc = 0;
  if (threads <= 1 || pieces < 4) {
    crc = crc32c(bytes.data(), bytes.size());
  } else {
    std::vector<uint32_t> part(pieces);
    ops::run_ranges_stealing(int64_t(pieces), threads, [&](int64_t b, int64_t e) {
      for (size_t i = size_t(b); i < size_t(e); ++i)
        part[i] = crc32c(bytes.data() + i * kPiece, std::min(kPiece, bytes.size() - i * kPiece));
    });
    for (size_t i = 0; i < pieces; ++i)
      crc = crc32c_combine(crc, part[i], std::min(kPiece, bytes.size() - i * kPiece));
  }
  blob.check_crc(t, crc);
}

void Artifact::verify(size_t b, size_t i) const {
  const double t0 = now_seconds();
  verify_tensor(views_[b], views_[b].tensors()[i]);
  verified_[b][i] = true;
  verify_seconds_ += now_seconds() - t0;
}

void Artifact::verify_remaining() const {
  for (size_t b = 0; b < views_.size(); ++b)
    for (size_t i = 0; i < views_[b].tensors().size(); ++i)
      if (!verified_[b][i]) verify(b, i);
}

BlobView check_listed_blob(const MappedFile& file, const BlobEntry& e, const std::string& path) {
  if (file.size() != e.size)
    throw Error(path + ": is " + std::to_string(file.size()) + " bytes, the manifest says " +
                std::to_string(e.size) + " (truncated or replaced)");
  BlobView view(file.data(), file.size(), path);
  if (view.header_crc32c() != e.header_crc32c)
    throw Error(path + ": header checksum differs from the manifest's (blob replaced?)");
  if (view.layer() != e.layer)
    throw Error(path + ": header says layer " + std::to_string(view.layer()) +
                ", the manifest lists layer " + std::to_string(e.layer));
  if (view.kind() != e.kind)
    throw Error(path + ": header says layer kind " + std::to_string(int(view.kind())) +
                ", the manifest lists kind " + std::to_string(int(e.kind)) +
                " (0 globals, 1 dense, 2 moe)");
  return view;
}

uint64_t Artifact::total_bytes() const {
  uint64_t n = manifest_bytes_;
  for (const auto& f : files_) n += f->size();
  return n;
}

size_t Artifact::index_of(const BlobView& blob) const {
  size_t b = 0;
  while (b < views_.size() && &views_[b] != &blob) ++b;
  if (b == views_.size()) throw Error(blob.path() + ": not a blob of the artifact " + dir_);
  return b;
}

void Artifact::release_tensor_pages(const BlobView& blob, const std::string& name) const {
  const BlobTensorInfo* t = blob.find(name);
  if (!t) throw Error(blob.path() + ": tensor '" + name + "' is missing");
  const std::span<const uint8_t> bytes = blob.bytes(*t);
  files_[index_of(blob)]->release_range(bytes.data(), bytes.size());
}

const uint16_t* Artifact::bf16(const BlobView& blob, const std::string& name,
                               const std::vector<int64_t>& shape) const {
  const BlobTensorInfo& t = blob.expect(name, DType::BF16, shape);
  const size_t b = index_of(blob);
  const size_t i = size_t(&t - blob.tensors().data());  // expect() returns an element of tensors()
  if (!verified_[b][i]) verify(b, i);
  return reinterpret_cast<const uint16_t*>(blob.bytes(t).data());
}

Artifact::Matrix Artifact::matrix_deferred(const BlobView& blob, const std::string& name,
                                           const std::vector<int64_t>& shape, int64_t K,
                                           int64_t batch) const {
  const BlobTensorInfo& t = blob.expect_matrix(name, shape, K, batch);
  Matrix m;
  m.data = reinterpret_cast<const uint16_t*>(blob.bytes(t).data());
  m.blocked = t.layout == TensorLayout::BA16a64b2a;
  if (m.blocked) m.layout = t.blocked();
  m.pending = !verified_[index_of(blob)][size_t(&t - blob.tensors().data())];
  return m;
}

void Artifact::settle_checksum(const BlobView& blob, const std::string& name,
                               std::optional<uint32_t> crc) const {
  const BlobTensorInfo* t = blob.find(name);
  if (!t) throw Error(blob.path() + ": tensor '" + name + "' is missing");
  const size_t b = index_of(blob), i = size_t(t - blob.tensors().data());
  if (verified_[b][i]) return;
  if (!crc) {
    verify(b, i);
    return;
  }
  blob.check_crc(*t, *crc);
  verified_[b][i] = true;
}

}  // namespace kiln
