#include "schema/blob_file.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <numeric>
#include <optional>

#include "common/checked.h"
#include "common/crc32c.h"
#include "common/error.h"
#include "kiln_generated.h"
#include "schema/format.h"

namespace kiln {

namespace {

uint64_t align_up(uint64_t v, uint64_t a) {
  return (v + a - 1) / a * a;
}

template <typename T>
void put_le(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof v);  // x86-64 is little-endian, as the format is
}
template <typename T>
T get_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

uint64_t numel(const std::vector<int64_t>& shape) {
  return std::accumulate(shape.begin(), shape.end(), uint64_t{1},
                         [](uint64_t a, int64_t b) { return a * uint64_t(b); });
}

// The FlatBuffers verifier checks only 4-byte alignment of a vector<long>, so its elements are
// copied out rather than loaded in place.
std::vector<int64_t> read_shape(const flatbuffers::Vector<int64_t>& v) {
  std::vector<int64_t> shape(v.size());
  if (!shape.empty()) std::memcpy(shape.data(), v.Data(), shape.size() * sizeof(int64_t));
  return shape;
}

}  // namespace

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// ----------------------------------------------------------------------------------------------
BlobWriter::BlobWriter(const std::string& path, int layer, LayerKind kind,
                       const std::vector<TensorSpec>& tensors, DType dtype)
    : path_(path), layer_(layer), kind_(kind) {
  for (const auto& t : tensors) {
    BlobTensorInfo info{
        t.name,   dtype,      t.shape,       0, numel(t.shape) * dtype_size(dtype), 0,
        t.layout, t.matrix_k, t.matrix_batch};
    if (t.layout != TensorLayout::RowMajor) {
      const std::optional<BlockedMatrices> m =
          blocked_view(numel(t.shape), t.matrix_k, t.matrix_batch);
      if (!m || dtype != DType::BF16)
        throw Error(path + ": tensor '" + t.name + "' cannot be stored in " +
                    layout_name(t.layout) + " as " + std::to_string(t.matrix_batch) +
                    " bf16 matrices of " + std::to_string(t.matrix_k) + " rows");
      info.length = uint64_t(m->values()) * dtype_size(dtype);
      major_ = kFormatMajorBlocked;
    }
    tensors_.push_back(std::move(info));
  }
  // The header size does not depend on offsets or checksums (force_defaults keeps every scalar
  // present), so a first build fixes where the data starts.
  uint64_t pos = align_up(kBlobPreambleSize + build_header().size(), kTensorAlignment);
  for (auto& t : tensors_) {
    t.offset = pos;
    pos = align_up(pos + t.length, kTensorAlignment);
  }
  total_size_ = tensors_.empty() ? pos : tensors_.back().offset + tensors_.back().length;
  file_ = std::fopen(path.c_str(), "wb");
  if (!file_) throw Error(path + ": cannot create: " + std::strerror(errno));
  // 2 MiB: stdio then writes whole, 2 MiB-aligned 2 MiB pieces, from which the kernel (ext4 with
  // large folios) builds 2 MiB page-cache folios that a reader's mapping can map with one
  // page-table entry each (docs/performance.md, "Start-up"); with 1 MiB writes it cannot.
  std::setvbuf(file_, nullptr, _IOFBF, 2 << 20);
  file_pos_ = 0;
}

BlobWriter::~BlobWriter() {
  if (file_) std::fclose(file_);
}

std::vector<uint8_t> BlobWriter::build_header() const {
  flatbuffers::FlatBufferBuilder b(4096);
  b.ForceDefaults(true);
  std::vector<flatbuffers::Offset<fb::Tensor>> offs;
  for (const auto& t : tensors_) {
    offs.push_back(fb::CreateTensorDirect(
        b, t.name.c_str(), static_cast<fb::DType>(t.dtype), &t.shape, t.offset, t.length, t.crc32c,
        static_cast<fb::TensorLayout>(t.layout), t.matrix_k, t.matrix_batch));
  }
  auto h = fb::CreateBlobHeaderDirect(b, major_, kFormatMinor, layer_,
                                      static_cast<fb::LayerKind>(kind_), &offs);
  b.Finish(h);
  return {b.GetBufferPointer(), b.GetBufferPointer() + b.GetSize()};
}

void BlobWriter::write_at(uint64_t offset, const void* data, size_t bytes) {
  if (offset != file_pos_) {
    if (std::fseek(file_, long(offset), SEEK_SET) != 0)
      throw Error(path_ + ": seek failed: " + std::strerror(errno));
    file_pos_ = offset;
  }
  if (bytes && std::fwrite(data, 1, bytes, file_) != bytes)
    throw Error(path_ + ": write failed: " + std::strerror(errno));
  file_pos_ += bytes;
}

void BlobWriter::pad_to(uint64_t offset) {
  static constexpr uint8_t kZeros[kTensorAlignment] = {};
  while (file_pos_ < offset)
    write_at(file_pos_, kZeros, size_t(std::min<uint64_t>(sizeof kZeros, offset - file_pos_)));
}

void BlobWriter::append(const void* data, size_t bytes) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (bytes > 0) {
    if (current_ >= tensors_.size())
      throw Error(path_ + ": more tensor data written than the header declares");
    auto& t = tensors_[current_];
    size_t n = std::min<uint64_t>(bytes, t.length - written_);
    if (written_ == 0) pad_to(t.offset);
    write_at(t.offset + written_, p, n);
    t.crc32c = crc32c(p, n, t.crc32c);
    written_ += n;
    p += n;
    bytes -= n;
    if (written_ == t.length) {
      ++current_;
      written_ = 0;
    }
  }
}

void BlobWriter::write_tensor(const std::string& name, const void* data, size_t bytes) {
  if (current_ >= tensors_.size() || tensors_[current_].name != name || written_ != 0)
    throw Error(path_ + ": tensor '" + name + "' written out of the declared order");
  if (bytes != tensors_[current_].length)
    throw Error(path_ + ": tensor '" + name + "' has " + std::to_string(bytes) +
                " bytes, expected " + std::to_string(tensors_[current_].length));
  if (bytes == 0) ++current_;  // append() has no byte to move on with
  append(data, bytes);
}

BlobWriter::Result BlobWriter::finish() {
  while (current_ < tensors_.size() && tensors_[current_].length == 0) ++current_;
  if (current_ != tensors_.size())
    throw Error(path_ + ": tensor '" + tensors_[current_].name + "' was not written completely");
  pad_to(total_size_);  // trailing zero-length tensors, or none at all: the file still ends there
  std::vector<uint8_t> header = build_header();
  uint8_t pre[kBlobPreambleSize] = {};
  std::memcpy(pre, kBlobMagic, 8);
  put_le<uint16_t>(pre + 8, major_);
  put_le<uint16_t>(pre + 10, kFormatMinor);
  put_le<uint64_t>(pre + 16, header.size());
  uint32_t hcrc = crc32c(header.data(), header.size());
  put_le<uint32_t>(pre + 24, hcrc);
  write_at(0, pre, sizeof pre);
  write_at(kBlobPreambleSize, header.data(), header.size());
  if (std::fflush(file_) != 0) throw Error(path_ + ": write failed: " + std::strerror(errno));
  int rc = std::fclose(file_);
  file_ = nullptr;
  if (rc != 0) throw Error(path_ + ": close failed: " + std::strerror(errno));
  return {total_size_, hcrc};
}

// ----------------------------------------------------------------------------------------------
BlobView::BlobView(const uint8_t* data, size_t size, const std::string& path)
    : data_(data), size_(size), path_(path) {
  if (size < kBlobPreambleSize)
    throw Error(path + ": file is " + std::to_string(size) +
                " bytes, shorter than the 32-byte blob preamble (truncated?)");
  if (std::memcmp(data, kBlobMagic, 8) != 0)
    throw Error(path + ": not a kiln blob (magic 'KILNBLOB' missing)");
  uint16_t major = get_le<uint16_t>(data + 8);
  if (major != kFormatMajor && major != kFormatMajorBlocked)
    throw Error(path + ": blob format version " + std::to_string(major) +
                " is not supported (this kiln reads versions " + std::to_string(kFormatMajor) +
                " and " + std::to_string(kFormatMajorBlocked) + ")");
  if (get_le<uint32_t>(data + 12) != 0 || get_le<uint32_t>(data + 28) != 0)
    throw Error(path + ": reserved preamble bytes are not zero (corrupt)");
  uint64_t hlen = get_le<uint64_t>(data + 16);
  if (hlen > size - kBlobPreambleSize)
    throw Error(path + ": header length " + std::to_string(hlen) + " runs past the end of the " +
                std::to_string(size) + "-byte file (truncated or corrupt)");
  const uint8_t* hdr = data + kBlobPreambleSize;
  header_crc_ = get_le<uint32_t>(data + 24);
  if (crc32c(hdr, hlen) != header_crc_)
    throw Error(path + ": header checksum mismatch (the blob header is corrupt)");
  flatbuffers::Verifier verifier(hdr, hlen);
  if (!verifier.VerifyBuffer<fb::BlobHeader>(nullptr))
    throw Error(path + ": header fails FlatBuffers verification (corrupt)");
  const auto* h = flatbuffers::GetRoot<fb::BlobHeader>(hdr);
  layer_ = h->layer();
  kind_ = static_cast<LayerKind>(h->kind());
  for (const auto* t : *h->tensors()) {
    BlobTensorInfo info;
    info.name = t->name()->str();
    if (t->dtype() > fb::DType::MAX)
      throw Error(path + ": tensor '" + info.name + "' has an unknown dtype");
    info.dtype = static_cast<DType>(t->dtype());
    info.shape = read_shape(*t->shape());
    for (int64_t d : info.shape)
      if (d < 0) throw Error(path + ": tensor '" + info.name + "' has a negative dimension");
    info.offset = t->offset();
    info.length = t->length();
    info.crc32c = t->crc32c();
    std::optional<uint64_t> bytes = checked_bytes(info.shape, dtype_size(info.dtype));
    if (!bytes)
      throw Error(path + ": tensor '" + info.name + "' has shape " + shape_to_string(info.shape) +
                  ", too large to address");
    if (t->layout() > fb::TensorLayout::MAX)
      throw Error(path + ": tensor '" + info.name + "' has an unknown layout");
    info.layout = static_cast<TensorLayout>(t->layout());
    info.matrix_k = t->matrix_k();
    info.matrix_batch = t->matrix_batch();
    if (info.layout != TensorLayout::RowMajor) {
      const std::optional<BlockedMatrices> m =
          blocked_view(*bytes / dtype_size(info.dtype), info.matrix_k, info.matrix_batch);
      if (major != kFormatMajorBlocked || info.dtype != DType::BF16 || !m)
        throw Error(path + ": tensor '" + info.name + "' has layout " + layout_name(info.layout) +
                    " with " + std::to_string(info.matrix_batch) + " matrices of " +
                    std::to_string(info.matrix_k) + " rows, which does not fit " + "its shape " +
                    shape_to_string(info.shape) + ", dtype or format version");
      bytes = uint64_t(m->values()) * dtype_size(info.dtype);
    }
    if (info.length != *bytes)
      throw Error(path + ": tensor '" + info.name + "' length " + std::to_string(info.length) +
                  " does not match shape " + shape_to_string(info.shape));
    if (info.offset % kTensorAlignment != 0 || info.offset < kBlobPreambleSize + hlen)
      throw Error(path + ": tensor '" + info.name + "' has a misplaced offset " +
                  std::to_string(info.offset));
    if (info.offset > size || info.length > size - info.offset)
      throw Error(path + ": tensor '" + info.name + "' bytes [" + std::to_string(info.offset) +
                  ", " + std::to_string(info.offset + info.length) + ") lie past the end of the " +
                  std::to_string(size) + "-byte file (truncated)");
    tensors_.push_back(std::move(info));
  }
}

const BlobTensorInfo* BlobView::find(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

const BlobTensorInfo& BlobView::expect(const std::string& name, DType dtype,
                                       const std::vector<int64_t>& shape) const {
  const BlobTensorInfo* t = find(name);
  if (!t) throw Error(path_ + ": tensor '" + name + "' is missing");
  if (t->dtype != dtype)
    throw Error(path_ + ": tensor '" + name + "' is " + std::string(dtype_name(t->dtype)) +
                ", expected " + std::string(dtype_name(dtype)));
  if (t->shape != shape)
    throw Error(path_ + ": tensor '" + name + "' has shape " + shape_to_string(t->shape) +
                ", expected " + shape_to_string(shape) + " from the model config");
  if (t->layout != TensorLayout::RowMajor)
    throw Error(path_ + ": tensor '" + name + "' is stored in layout " + layout_name(t->layout) +
                ", expected row-major here");
  return *t;
}

const BlobTensorInfo& BlobView::expect_matrix(const std::string& name,
                                              const std::vector<int64_t>& shape, int64_t K,
                                              int64_t batch) const {
  const BlobTensorInfo* t = find(name);
  if (t && t->layout == TensorLayout::BA16a64b2a) {
    if (t->dtype != DType::BF16 || t->shape != shape || t->matrix_k != K ||
        t->matrix_batch != batch)
      throw Error(path_ + ": tensor '" + name + "' is " + std::to_string(t->matrix_batch) +
                  " blocked matrices of " + std::to_string(t->matrix_k) + " rows, shape " +
                  shape_to_string(t->shape) + "; expected " + std::to_string(batch) + " of " +
                  std::to_string(K) + " rows, shape " + shape_to_string(shape));
    return *t;
  }
  return expect(name, DType::BF16, shape);
}

BlockedMatrices BlobTensorInfo::blocked() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= uint64_t(d);
  return *blocked_view(n, matrix_k, matrix_batch);
}

void BlobView::check_crc(const BlobTensorInfo& t, uint32_t crc) const {
  if (crc != t.crc32c)
    throw Error(path_ + ": tensor '" + t.name + "' fails its CRC-32C check (data corrupt)");
}

void BlobView::verify_checksums() const {
  for (const auto& t : tensors_) check_crc(t, crc32c(data_ + t.offset, t.length));
}

}  // namespace kiln
