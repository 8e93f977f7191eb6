#include "schema/blob_file.h"

#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numeric>

#include "common/crc32c.h"
#include "common/error.h"
#include "common/mapped_file.h"
#include "kiln_generated.h"
#include "schema/format.h"

using namespace kiln;
namespace fs = std::filesystem;

namespace {

fs::path temp_path(const std::string& name) {
  fs::path dir = fs::temp_directory_path() / "kiln_blob_test";
  fs::create_directories(dir);
  return dir / name;
}

std::vector<uint8_t> read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

// Two small bf16 tensors, the second written in two pieces.
fs::path write_sample(const std::string& name) {
  fs::path p = temp_path(name);
  std::vector<TensorSpec> specs = {{"a", {3, 5}}, {"b.long.name", {7}}};
  BlobWriter w(p.string(), 4, LayerKind::Dense, specs);
  std::vector<uint16_t> a(15), b(7);
  std::iota(a.begin(), a.end(), uint16_t(100));
  std::iota(b.begin(), b.end(), uint16_t(200));
  w.write_tensor("a", a.data(), a.size() * 2);
  w.append(b.data(), 6);
  w.append(b.data() + 3, 8);
  auto r = w.finish();
  CHECK(r.size == fs::file_size(p));
  return p;
}

}  // namespace

TEST_CASE("blob write/read round trip") {
  fs::path p = write_sample("roundtrip.kblob");
  MappedFile f(p.string());
  BlobView v(f.data(), f.size(), p.string());
  CHECK(v.layer() == 4);
  CHECK(v.kind() == LayerKind::Dense);
  REQUIRE(v.tensors().size() == 2);
  const auto& a = v.expect("a", DType::BF16, {3, 5});
  CHECK(a.offset % 64 == 0);
  const auto* data = reinterpret_cast<const uint16_t*>(v.bytes(a).data());
  CHECK(data[0] == 100);
  CHECK(data[14] == 114);
  const auto& b = v.expect("b.long.name", DType::BF16, {7});
  CHECK(b.offset % 64 == 0);
  CHECK(reinterpret_cast<const uint16_t*>(v.bytes(b).data())[6] == 206);
  CHECK_NOTHROW(v.verify_checksums());
  CHECK(v.find("missing") == nullptr);
  CHECK_THROWS_WITH_AS(v.expect("a", DType::BF16, {5, 3}), doctest::Contains("expected [5, 3]"),
                       Error);
}

TEST_CASE("writer refuses out-of-order, oversized and incomplete tensors") {
  fs::path p = temp_path("bad_writes.kblob");
  std::vector<TensorSpec> specs = {{"a", {2}}, {"b", {2}}};
  uint16_t x[4] = {};
  {
    BlobWriter w(p.string(), 0, LayerKind::Dense, specs);
    CHECK_THROWS_AS(w.write_tensor("b", x, 4), Error);
    CHECK_THROWS_AS(w.write_tensor("a", x, 6), Error);
  }
  {
    BlobWriter w(p.string(), 0, LayerKind::Dense, specs);
    w.write_tensor("a", x, 4);
    CHECK_THROWS_WITH_AS(w.finish(), doctest::Contains("'b' was not written"), Error);
  }
  {
    BlobWriter w(p.string(), 0, LayerKind::Dense, specs);
    w.append(x, 8);
    CHECK_THROWS_AS(w.append(x, 2), Error);
  }
}

TEST_CASE("verifier rejects truncated and corrupted blobs") {
  fs::path good = write_sample("good.kblob");
  std::vector<uint8_t> bytes = read_all(good);
  auto open = [](const std::vector<uint8_t>& b) { BlobView v(b.data(), b.size(), "x.kblob"); };

  SUBCASE("truncated in the data") {
    std::vector<uint8_t> b(bytes.begin(), bytes.end() - 3);
    CHECK_THROWS_WITH_AS(open(b), doctest::Contains("x.kblob: tensor 'b.long.name'"), Error);
  }
  SUBCASE("truncated inside the header") {
    std::vector<uint8_t> b(bytes.begin(), bytes.begin() + 40);
    CHECK_THROWS_WITH_AS(open(b), doctest::Contains("header length"), Error);
  }
  SUBCASE("shorter than the preamble") {
    std::vector<uint8_t> b(bytes.begin(), bytes.begin() + 10);
    CHECK_THROWS_WITH_AS(open(b), doctest::Contains("preamble"), Error);
  }
  SUBCASE("bad magic") {
    bytes[0] = 'X';
    CHECK_THROWS_WITH_AS(open(bytes), doctest::Contains("magic"), Error);
  }
  SUBCASE("unknown major version") {
    bytes[8] = 99;
    CHECK_THROWS_WITH_AS(open(bytes), doctest::Contains("version 99"), Error);
  }
  SUBCASE("every flipped preamble or header byte is caught") {
    uint64_t hlen;
    std::memcpy(&hlen, bytes.data() + 16, 8);
    for (size_t i = 0; i < 32 + hlen; ++i) {
      if (i == 10 || i == 11) continue;  // the minor version: newer minors are readable
      std::vector<uint8_t> b = bytes;
      b[i] ^= 0x10;
      CHECK_THROWS_AS(open(b), Error);
    }
  }
  SUBCASE("flipped data byte fails the checksum, naming the tensor") {
    bytes[bytes.size() - 2] ^= 1;
    BlobView v(bytes.data(), bytes.size(), "x.kblob");
    CHECK_THROWS_WITH_AS(v.verify_checksums(), doctest::Contains("tensor 'b.long.name'"), Error);
  }
}

TEST_CASE("every byte outside the preamble, header and tensors is zero") {
  // Odd element counts, a zero-length tensor in the middle and at the end, and names long enough
  // that the padding after the header and between tensors spans more than 64 bytes.
  fs::path p = temp_path("padding.kblob");
  const std::string tail(90, 'x');
  std::vector<TensorSpec> specs = {{"one." + tail, {1}},   {"three." + tail, {3}},
                                   {"empty." + tail, {0}}, {"odd." + tail, {3, 11}},
                                   {"big." + tail, {129}}, {"last-empty", {0, 5}}};
  uint64_t total = 0;
  {
    BlobWriter w(p.string(), 2, LayerKind::Dense, specs);
    for (const auto& t : w.tensors()) {
      std::vector<uint16_t> data(t.length / 2, 0xffff);  // no zero byte inside a tensor
      w.write_tensor(t.name, data.data(), t.length);
    }
    total = w.finish().size;
  }
  const std::vector<uint8_t> bytes = read_all(p);
  REQUIRE(bytes.size() == total);
  MappedFile f(p.string());
  BlobView v(f.data(), f.size(), p.string());
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data() + 16, 8);
  std::vector<bool> used(bytes.size(), false);
  for (size_t i = 0; i < kBlobPreambleSize + header_len; ++i) used[i] = true;
  for (const auto& t : v.tensors())
    for (uint64_t i = t.offset; i < t.offset + t.length; ++i) used[i] = true;
  size_t nonzero_padding = 0, padding = 0;
  for (size_t i = 0; i < bytes.size(); ++i) {
    if (used[i]) continue;
    ++padding;
    nonzero_padding += bytes[i] != 0;
  }
  CHECK(padding > 64);  // the gaps this test is about exist
  CHECK(nonzero_padding == 0);
  CHECK(bytes[12] == 0);  // reserved preamble bytes
  CHECK(bytes[28] == 0);
  CHECK_NOTHROW(v.verify_checksums());
}

TEST_CASE("a blob of zero-length tensors only ends after its header") {
  fs::path p = temp_path("empty_tensors.kblob");
  BlobWriter w(p.string(), 0, LayerKind::Dense, {{"a", {0}}, {"b", {4, 0}}});
  const auto r = w.finish();
  CHECK(r.size == fs::file_size(p));
  MappedFile f(p.string());
  BlobView v(f.data(), f.size(), p.string());
  CHECK(v.tensors().size() == 2);
}

namespace {

// A blob whose header declares one tensor as given, built directly (not by BlobWriter) so that
// the header can say what no writer would.
std::vector<uint8_t> crafted_blob(const std::vector<int64_t>& shape, uint64_t length) {
  flatbuffers::FlatBufferBuilder b;
  b.ForceDefaults(true);
  const uint64_t offset = 256;  // past this small header, 64-byte aligned
  std::vector<flatbuffers::Offset<fb::Tensor>> ts = {
      fb::CreateTensorDirect(b, "t", fb::DType::BF16, &shape, offset, length, crc32c("", 0))};
  b.Finish(fb::CreateBlobHeaderDirect(b, kFormatMajor, kFormatMinor, 0, fb::LayerKind::Dense, &ts));
  REQUIRE(kBlobPreambleSize + b.GetSize() <= offset);
  std::vector<uint8_t> out(offset + length);
  std::memcpy(out.data(), kBlobMagic, 8);
  const uint16_t major = kFormatMajor, minor = kFormatMinor;
  const uint64_t hlen = b.GetSize();
  const uint32_t hcrc = crc32c(b.GetBufferPointer(), b.GetSize());
  std::memcpy(out.data() + 8, &major, 2);
  std::memcpy(out.data() + 10, &minor, 2);
  std::memcpy(out.data() + 16, &hlen, 8);
  std::memcpy(out.data() + 24, &hcrc, 4);
  std::memcpy(out.data() + kBlobPreambleSize, b.GetBufferPointer(), b.GetSize());
  return out;
}

}  // namespace

TEST_CASE("a shape whose byte count wraps in 64 bits is refused, not taken for its wrapped size") {
  // 2^58 × 64 bf16 values are 2^65 bytes: 0 once wrapped, which the header then claims.
  const std::vector<uint8_t> wrapped = crafted_blob({int64_t(1) << 58, 64}, 0);
  CHECK_THROWS_WITH_AS(
      BlobView(wrapped.data(), wrapped.size(), "x.kblob"),
      "x.kblob: tensor 't' has shape [288230376151711744, 64], too large to address", Error);
  const std::vector<uint8_t> fine = crafted_blob({4, 8}, 64);
  CHECK(BlobView(fine.data(), fine.size(), "x.kblob").tensors().at(0).shape ==
        std::vector<int64_t>{4, 8});
}

TEST_CASE("shapes are read without 8-byte loads at 4-byte-aligned addresses") {
  // The FlatBuffers verifier checks vector<long> for 4-byte alignment only; a blob placed at an
  // address that is 4 mod 8 (as a crafted header can arrange) must still read correctly (and
  // cleanly under UBSan).
  const std::vector<uint8_t> bytes = read_all(write_sample("misaligned.kblob"));
  std::vector<uint64_t> storage(bytes.size() / 8 + 2);
  uint8_t* at = reinterpret_cast<uint8_t*>(storage.data()) + 4;
  std::memcpy(at, bytes.data(), bytes.size());
  const BlobView v(at, bytes.size(), "x.kblob");
  CHECK(v.expect("a", DType::BF16, {3, 5}).length == 30);
  CHECK(v.expect("b.long.name", DType::BF16, {7}).length == 14);
}

TEST_CASE("BA16a64b2a: the layout's index formula, padding and round trip") {
  // 3 matrices of K = 37 rows by N = 70 columns: K pads to 64, N to 128.
  const std::optional<BlockedMatrices> m = blocked_view(3 * 37 * 70, 37, 3);
  REQUIRE(m);
  CHECK(m->N == 70);
  CHECK(m->Kp() == 64);
  CHECK(m->Np() == 128);
  CHECK(m->values() == 3 * 64 * 128);
  CHECK_FALSE(blocked_view(3 * 37 * 70, 38, 3));  // K · batch must divide the values
  CHECK_FALSE(blocked_view(100, 0, 1));
  CHECK_FALSE(blocked_view(100, 10, -1));
  // K · batch wrapping to 0 in 64 bits (found by fuzz_blob): refused, not a division by zero.
  CHECK_FALSE(blocked_view(100, int64_t(1) << 32, int64_t(1) << 32));
  std::vector<uint16_t> w(37 * 70), blocked(size_t(m->matrix_values()), 0xffff), back(w.size());
  std::iota(w.begin(), w.end(), uint16_t(1));
  to_ba16a64b2a(w.data(), *m, blocked.data());
  // (k, n) = (5, 66): block 1, pair 2, column 2 of the block, odd row.
  CHECK(blocked[size_t(1 * 64 * 64 + 2 * 128 + 2 * 2 + 1)] == w[5 * 70 + 66]);
  size_t nonzero = 0;
  for (uint16_t v : blocked) nonzero += v != 0;
  CHECK(nonzero == w.size());  // everything else is zero padding
  from_ba16a64b2a(blocked.data(), *m, back.data());
  CHECK(back == w);
}

TEST_CASE("a blob with a blocked tensor: format major 2, padded length, row-major readers refuse") {
  fs::path p = temp_path("blocked.kblob");
  TensorSpec blocked_spec{"w", {2, 40, 3}};  // one matrix of K = 2 · 40 rows, N = 3
  blocked_spec.layout = TensorLayout::BA16a64b2a;
  blocked_spec.matrix_k = 80;
  std::vector<TensorSpec> specs = {{"norm", {5}}, blocked_spec};
  const BlockedMatrices m = *blocked_view(240, 80, 1);
  {
    BlobWriter w(p.string(), 0, LayerKind::Dense, specs);
    std::vector<uint16_t> norm(5, 7), rows(240), data(size_t(m.values()));
    std::iota(rows.begin(), rows.end(), uint16_t(1));
    to_ba16a64b2a(rows.data(), m, data.data());
    w.write_tensor("norm", norm.data(), norm.size() * 2);
    w.write_tensor("w", data.data(), data.size() * 2);
    w.finish();
  }
  MappedFile f(p.string());
  uint16_t major = 0;
  std::memcpy(&major, f.data() + 8, 2);
  CHECK(major == kFormatMajorBlocked);
  BlobView v(f.data(), f.size(), p.string());
  const BlobTensorInfo* t = v.find("w");
  REQUIRE(t);
  CHECK(t->layout == TensorLayout::BA16a64b2a);
  CHECK(t->length == uint64_t(m.values()) * 2);  // 96 × 64 values: K 80 → 96, N 3 → 64
  CHECK(t->blocked().K == 80);
  CHECK_THROWS_WITH_AS(v.expect("w", DType::BF16, {2, 40, 3}),
                       doctest::Contains("stored in layout BA16a64b2a"), Error);
  CHECK(&v.expect_matrix("w", {2, 40, 3}, 80) == t);
  CHECK_THROWS_WITH_AS(v.expect_matrix("w", {2, 40, 3}, 2), doctest::Contains("expected 1 of 2"),
                       Error);
  CHECK(&v.expect_matrix("norm", {5}, 5) == v.find("norm"));  // row-major passes through
  v.verify_checksums();
  // A row-major-only blob (major 1) may not hold it: patch the preamble's major back to 1.
  std::vector<uint8_t> bytes = read_all(p);
  const uint16_t one = 1;
  std::memcpy(bytes.data() + 8, &one, 2);
  CHECK_THROWS_WITH_AS(BlobView(bytes.data(), bytes.size(), "patched"),
                       doctest::Contains("does not fit"), Error);
}

TEST_CASE("BlobWriter refuses a blocked layout that does not fit the tensor, naming it") {
  TensorSpec bad{"w", {6, 5}};
  bad.layout = TensorLayout::BA16a64b2a;
  bad.matrix_k = 4;  // 4 rows do not divide 30 values
  CHECK_THROWS_WITH_AS(
      BlobWriter(temp_path("bad-layout.kblob").string(), 0, LayerKind::Dense, {bad}),
      doctest::Contains("tensor 'w' cannot be stored in BA16a64b2a"), Error);
  bad.matrix_k = 6;
  CHECK_THROWS_WITH_AS(
      BlobWriter(temp_path("bad-layout.kblob").string(), 0, LayerKind::Dense, {bad}, DType::F32),
      doctest::Contains("bf16 matrices of 6 rows"), Error);
}
