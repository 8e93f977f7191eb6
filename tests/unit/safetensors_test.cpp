#include "export/safetensors.h"

#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/error.h"

namespace fs = std::filesystem;
using kiln::Checkpoint;
using kiln::DType;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           ("kiln-safetensors-test-" + std::to_string(::getpid()) + "-" +
            std::to_string(counter++) + "-" + std::to_string(std::random_device{}()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  REQUIRE(out.good());
}

std::string le_u64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[size_t(i)] = char((v >> (8 * i)) & 0xff);
  return s;
}

std::string raw_file(const std::string& header, const std::string& data) {
  return le_u64(header.size()) + header + data;
}

template <typename T>
std::string bytes_of(const std::vector<T>& v) {
  std::string s(v.size() * sizeof(T), '\0');
  std::memcpy(s.data(), v.data(), s.size());
  return s;
}

struct Tensor {
  std::string key, dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

// A well-formed file with the tensors laid out back to back; `pad` spaces are appended to the
// header (allowed by the format) to control the alignment of the data buffer.
std::string safetensors(const std::vector<Tensor>& ts, size_t pad = 0) {
  std::string header = "{\"__metadata__\": {\"format\": \"pt\"}";
  std::string data;
  for (const Tensor& t : ts) {
    std::string shape;
    for (size_t i = 0; i < t.shape.size(); ++i) {
      if (i) shape += ",";
      shape += std::to_string(t.shape[i]);
    }
    header += ", \"" + t.key + "\": {\"dtype\": \"" + t.dtype + "\", \"shape\": [" + shape +
              "], \"data_offsets\": [" + std::to_string(data.size()) + ", " +
              std::to_string(data.size() + t.bytes.size()) + "]}";
    data += t.bytes;
  }
  header += "}";
  header.append(pad, ' ');
  return raw_file(header, data);
}

std::vector<float> iota_f32(size_t n, float start = 0.0f) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = start + float(i);
  return v;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out;
  for (float f : v) out.push_back(kiln::f32_to_bf16(f));
  return out;
}

// The message of the kiln::Error that `f` throws ("" if it throws none).
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const kiln::Error& e) {
    return e.what();
  }
  return "";
}

std::string open_error(const std::string& path) {
  return error_of([&] { (void)Checkpoint::open({path}); });
}

bool one_line(const std::string& s) {
  return !s.empty() && s.find('\n') == std::string::npos;
}

// Reference slice of a row-major tensor.
std::vector<float> slice_ref(const std::vector<float>& v, const std::vector<int64_t>& shape,
                             int axis, int64_t index) {
  size_t outer = 1, inner = 1;
  for (int i = 0; i < axis; ++i) outer *= size_t(shape[size_t(i)]);
  for (size_t i = size_t(axis) + 1; i < shape.size(); ++i) inner *= size_t(shape[i]);
  const size_t n = size_t(shape[size_t(axis)]);
  std::vector<float> out;
  for (size_t o = 0; o < outer; ++o)
    for (size_t i = 0; i < inner; ++i) out.push_back(v[(o * n + size_t(index)) * inner + i]);
  return out;
}

}  // namespace

TEST_CASE("safetensors: f32, bf16 and f16 tensors read back as f32") {
  TempDir dir;
  const std::vector<float> f32 = {1.5f, -2.0f, 3.25f, 0.0f, -0.0f, 1e-30f};
  const std::vector<float> bf = {1.0f, -2.5f, 0.15625f, 3.0e38f, -1.0e-20f};
  // f16 bit patterns: 1, -2, 65504 (max), 2^-24 (smallest subnormal), +Inf, 0.333251953125.
  const std::vector<uint16_t> f16 = {0x3C00, 0xC000, 0x7BFF, 0x0001, 0x7C00, 0x3555};
  const std::string path = dir / "model.safetensors";
  write_file(path, safetensors({{"a", "F32", {2, 3}, bytes_of(f32)},
                                {"b", "BF16", {5}, bytes_of(to_bf16(bf))},
                                {"c", "F16", {3, 2}, bytes_of(f16)}}));
  Checkpoint ck = Checkpoint::open({path});
  REQUIRE(ck.tensors().size() == 3);
  REQUIRE(ck.files().size() == 1);
  CHECK(ck.files()[0].first == path);
  CHECK(ck.files()[0].second == fs::file_size(path));
  CHECK(ck.find("missing") == nullptr);

  const kiln::SourceTensor* a = ck.find("a");
  REQUIRE(a != nullptr);
  CHECK(a->dtype == DType::F32);
  CHECK(a->shape == std::vector<int64_t>{2, 3});
  CHECK(a->numel() == 6);
  CHECK(a->nbytes == 24);
  std::vector<float> out(6);
  kiln::read_as_f32(*a, out.data());
  CHECK(out == f32);

  const kiln::SourceTensor* b = ck.find("b");
  REQUIRE(b != nullptr);
  CHECK(b->dtype == DType::BF16);
  out.assign(5, 0.0f);
  kiln::read_as_f32(*b, out.data());
  for (size_t i = 0; i < bf.size(); ++i) CHECK(out[i] == kiln::round_to_bf16(bf[i]));
  CHECK(out[0] == 1.0f);
  CHECK(out[1] == -2.5f);

  const kiln::SourceTensor* c = ck.find("c");
  REQUIRE(c != nullptr);
  CHECK(c->dtype == DType::F16);
  out.assign(6, 0.0f);
  kiln::read_as_f32(*c, out.data());
  CHECK(out[0] == 1.0f);
  CHECK(out[1] == -2.0f);
  CHECK(out[2] == 65504.0f);
  CHECK(out[3] == std::ldexp(1.0f, -24));
  CHECK(std::isinf(out[4]));
  CHECK(out[5] == 0.333251953125f);
  ck.release_pages();  // must not invalidate the mapping
  kiln::read_as_f32(*a, out.data());
  CHECK(out[0] == 1.5f);
}

TEST_CASE("safetensors: 16-bit data at an odd address and empty tensors") {
  TempDir dir;
  const std::vector<float> vals = iota_f32(40, -20.0f);
  // Header length chosen so the data buffer starts at an odd offset in the file.
  std::string bytes;
  for (size_t pad = 0; pad < 8; ++pad) {
    bytes = safetensors({{"empty", "F32", {0, 4}, ""},
                         {"x", "BF16", {2, 20}, bytes_of(to_bf16(vals))},
                         {"h", "F16", {1}, bytes_of(std::vector<uint16_t>{0x3C00})}},
                        pad);
    uint64_t n = 0;
    std::memcpy(&n, bytes.data(), 8);
    if ((8 + n) % 2 == 1) break;
  }
  const std::string path = dir / "odd.safetensors";
  write_file(path, bytes);
  Checkpoint ck = Checkpoint::open({path});
  const kiln::SourceTensor* x = ck.find("x");
  REQUIRE(x != nullptr);
  CHECK(reinterpret_cast<uintptr_t>(x->data) % 2 == 1);
  std::vector<float> out(40);
  kiln::read_as_f32(*x, out.data());
  CHECK(out == vals);  // small integers are exact in bf16
  std::vector<float> row(20);
  kiln::read_slice_as_f32(*x, 0, 1, row.data());
  CHECK(row == std::vector<float>(vals.begin() + 20, vals.end()));
  float h = 0;
  kiln::read_as_f32(*ck.find("h"), &h);
  CHECK(h == 1.0f);
  CHECK(ck.find("empty")->numel() == 0);
}

TEST_CASE("safetensors: slicing along the first, middle and last axis") {
  TempDir dir;
  // Shapes cover short runs (element-wise gather) and long runs (bulk conversion per run).
  const std::vector<std::vector<int64_t>> shapes = {{3, 4, 5}, {2, 3, 40}, {4, 3}, {40, 2}, {7}};
  for (const char* dtype : {"F32", "BF16", "F16"}) {
    for (const auto& shape : shapes) {
      size_t n = 1;
      for (int64_t d : shape) n *= size_t(d);
      const std::vector<float> vals = iota_f32(n, -50.0f);  // exact in f32, bf16 and f16
      std::string bytes;
      if (std::string(dtype) == "F32") {
        bytes = bytes_of(vals);
      } else if (std::string(dtype) == "BF16") {
        bytes = bytes_of(to_bf16(vals));
      } else {
        std::vector<uint16_t> h;
        for (float f : vals) {
          // Integers |v| <= 2048 in f16: sign, exponent and mantissa built by hand.
          uint16_t sign = f < 0 ? 0x8000 : 0;
          float a = std::fabs(f);
          if (a == 0) {
            h.push_back(sign);
            continue;
          }
          int e = int(std::floor(std::log2(a)));
          uint16_t man = uint16_t((a / std::ldexp(1.0f, e) - 1.0f) * 1024.0f);
          h.push_back(uint16_t(sign | uint16_t((e + 15) << 10) | man));
        }
        bytes = bytes_of(h);
      }
      const std::string path = dir / (std::string(dtype) + std::to_string(shape.size()) + "-" +
                                      std::to_string(n) + ".safetensors");
      write_file(path, safetensors({{"t", dtype, shape, bytes}}));
      Checkpoint ck = Checkpoint::open({path});
      const kiln::SourceTensor& t = *ck.find("t");
      std::vector<float> all(n);
      kiln::read_as_f32(t, all.data());
      REQUIRE(all == vals);
      for (int axis = 0; axis < int(shape.size()); ++axis) {
        for (int64_t idx = 0; idx < shape[size_t(axis)]; ++idx) {
          CAPTURE(dtype);
          CAPTURE(axis);
          CAPTURE(idx);
          std::vector<float> got(n / size_t(shape[size_t(axis)]), 12345.0f);
          kiln::read_slice_as_f32(t, axis, idx, got.data());
          CHECK(got == slice_ref(vals, shape, axis, idx));
        }
      }
    }
  }
}

TEST_CASE("safetensors: scanned [E, L, H, D] query kernel unrolls along axis 1") {
  TempDir dir;
  const int64_t E = 3, L = 4, H = 2, D = 8;
  // Each value is its flat index (< 256, exact in bf16), so a wrong stride shows as a wrong value.
  const std::vector<float> vals = iota_f32(size_t(E * L * H * D));
  const std::string path = dir / "scan.safetensors";
  write_file(path, safetensors({{"params.params.decoder.layers.self_attention.query.kernel",
                                 "BF16",
                                 {E, L, H, D},
                                 bytes_of(to_bf16(vals))}}));
  Checkpoint ck = Checkpoint::open({path});
  const kiln::SourceTensor& t = ck.tensors()[0];
  std::vector<float> layer(size_t(E * H * D));
  kiln::read_slice_as_f32(t, 1, 2, layer.data());
  for (int64_t e = 0; e < E; ++e)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d)
        CHECK(layer[size_t((e * H + h) * D + d)] == float(((e * L + 2) * H + h) * D + d));
}

TEST_CASE("safetensors: slice axis and index are validated") {
  TempDir dir;
  const std::string path = dir / "s.safetensors";
  write_file(path, safetensors({{"w", "F32", {2, 3}, bytes_of(iota_f32(6))}}));
  Checkpoint ck = Checkpoint::open({path});
  const kiln::SourceTensor& t = *ck.find("w");
  std::vector<float> out(6);
  for (int axis : {-1, 2}) {
    std::string msg = error_of([&] { kiln::read_slice_as_f32(t, axis, 0, out.data()); });
    CHECK(one_line(msg));
    CHECK(msg.find("key 'w'") != std::string::npos);
    CHECK(msg.find("axis " + std::to_string(axis)) != std::string::npos);
    CHECK(msg.find("[2, 3]") != std::string::npos);
  }
  for (int64_t idx : {int64_t(-1), int64_t(3)}) {
    std::string msg = error_of([&] { kiln::read_slice_as_f32(t, 1, idx, out.data()); });
    CHECK(one_line(msg));
    CHECK(msg.find("index " + std::to_string(idx)) != std::string::npos);
    CHECK(msg.find("[0, 3)") != std::string::npos);
  }
}

TEST_CASE("safetensors: malformed files give distinct one-line errors") {
  TempDir dir;
  const std::string key = "params.params.decoder.layers.mlp.wo.kernel";
  const std::string good_entry =
      "{\"dtype\": \"F32\", \"shape\": [2, 2], \"data_offsets\": [0, 16]}";
  const std::string data16(16, '\x01');
  auto check = [&](const std::string& name, const std::string& bytes,
                   std::vector<std::string> expect) {
    CAPTURE(name);
    const std::string path = dir / name;
    write_file(path, bytes);
    const std::string msg = open_error(path);
    CAPTURE(msg);
    CHECK(one_line(msg));
    CHECK(msg.starts_with(path + ":"));
    for (const std::string& e : expect) CHECK(msg.find(e) != std::string::npos);
  };

  SUBCASE("file shorter than 8 bytes") {
    check("empty.safetensors", "", {"0 bytes", "shorter than the 8-byte"});
    check("short.safetensors", "abcde", {"5 bytes", "shorter than the 8-byte"});
  }
  SUBCASE("header length larger than the file") {
    check("hdr.safetensors", le_u64(1000) + "{}",
          {"header length 1000", "larger than the file (10 bytes)"});
    check("huge.safetensors", le_u64(~uint64_t(0)) + "{}", {"header length 18446744073709551615"});
  }
  SUBCASE("malformed header JSON names the position") {
    check("json.safetensors", raw_file("{\"a\": {\"dtype\": \"F32\",, }}", ""),
          {"malformed header JSON at byte 23", "of the 26-byte header"});
    check("json2.safetensors", raw_file("{\"a\":\n{", ""), {"malformed header JSON"});
    check("notobj.safetensors", raw_file("[1, 2]", ""),
          {"header JSON is a array", "expected an object"});
  }
  SUBCASE("entry not an object or missing fields") {
    check("entry.safetensors", raw_file("{\"" + key + "\": 5}", ""),
          {"key '" + key + "'", "entry is a number"});
    check("nodtype.safetensors",
          raw_file("{\"" + key + "\": {\"shape\": [2], \"data_offsets\": [0, 8]}}", ""),
          {"key '" + key + "'", "no 'dtype' field"});
    check("noshape.safetensors",
          raw_file("{\"w\": {\"dtype\": \"F32\", \"data_offsets\": [0, 8]}}", ""),
          {"no 'shape' field"});
    check("nooffs.safetensors", raw_file("{\"w\": {\"dtype\": \"F32\", \"shape\": [2]}}", ""),
          {"no 'data_offsets' field"});
    check("badoffs.safetensors",
          raw_file("{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0]}}", ""),
          {"key 'w'", "data_offsets [0] is not a pair"});
    check("negoffs.safetensors",
          raw_file("{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [-8, 0]}}", ""),
          {"data_offsets [-8,0] is not a pair of non-negative integers"});
    check("dtypetype.safetensors",
          raw_file("{\"w\": {\"dtype\": 3, \"shape\": [2], \"data_offsets\": [0, 8]}}", ""),
          {"dtype is not a string"});
    check("shapetype.safetensors",
          raw_file("{\"w\": {\"dtype\": \"F32\", \"shape\": [2.5], \"data_offsets\": [0, 8]}}", ""),
          {"shape [2.5] is not a list of integers"});
    check("dup.safetensors",
          raw_file("{\"w\": " + good_entry + ", \"w\": " + good_entry + "}", data16),
          {"key 'w' appears twice"});
  }
  SUBCASE("unsupported dtype names dtype and key") {
    check("i32.safetensors",
          raw_file(
              "{\"" + key + "\": {\"dtype\": \"I32\", \"shape\": [2], \"data_offsets\": [0, 8]}}",
              std::string(8, '\0')),
          {"key '" + key + "'", "unsupported dtype 'I32'", "F32, BF16, F16"});
  }
  SUBCASE("shape and byte length disagree") {
    check("len.safetensors",
          raw_file("{\"w\": {\"dtype\": \"BF16\", \"shape\": [2, 3], \"data_offsets\": [0, 16]}}",
                   data16),
          {"key 'w'", "hold 16 bytes", "shape [2, 3] of BF16 needs 12 bytes"});
    check(
        "order.safetensors",
        raw_file("{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 0]}}", data16),
        {"end before they begin"});
  }
  SUBCASE("negative dimension") {
    check("neg.safetensors",
          raw_file("{\"w\": {\"dtype\": \"F32\", \"shape\": [-2, 2], \"data_offsets\": [0, 16]}}",
                   data16),
          {"key 'w'", "negative dimension"});
  }
  SUBCASE("truncated file") {
    const std::string full = safetensors(
        {{"a", "F32", {2}, std::string(8, '\0')}, {key, "F32", {200}, std::string(800, '\0')}});
    const std::string cut = full.substr(0, full.size() - 300);
    check("trunc.safetensors", cut,
          {"key '" + key + "'",
           "data_offsets [8, 808) lie past the end of the file (" + std::to_string(cut.size()) +
               " bytes",
           "looks truncated"});
  }
  SUBCASE("overlapping data ranges name both keys") {
    check("overlap.safetensors",
          raw_file("{\"first\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]},"
                   " \"second\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 16]}}",
                   data16),
          {"'first' [0, 16)", "'second' [8, 16)", "overlap"});
    // A range nested inside an earlier, longer one after a short one in between.
    check("overlap2.safetensors",
          raw_file("{\"big\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]},"
                   " \"small\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]},"
                   " \"tail\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [12, 16]}}",
                   data16),
          {"'big'", "'small'", "overlap"});
  }
  SUBCASE("missing file") {
    const std::string msg = open_error(dir / "nope.safetensors");
    CHECK(one_line(msg));
    CHECK(msg.find("nope.safetensors") != std::string::npos);
  }
}

TEST_CASE("safetensors: the reference implementation's rules (tiling, metadata, header size)") {
  TempDir dir;
  auto entry = [](const std::string& key, const std::string& shape, uint64_t b, uint64_t e) {
    return "\"" + key + "\": {\"dtype\": \"F32\", \"shape\": " + shape + ", \"data_offsets\": [" +
           std::to_string(b) + ", " + std::to_string(e) + "]}";
  };
  auto open_raw = [&](const std::string& name, const std::string& header, const std::string& data) {
    const std::string path = dir / name;
    write_file(path, raw_file(header, data));
    return open_error(path);
  };
  const std::string data16(16, '\x01');

  SUBCASE("ranges that tile the data buffer exactly are accepted, in any key order") {
    CHECK(open_raw("ok.safetensors",
                   "{" + entry("b", "[2]", 8, 16) + ", " + entry("a", "[2]", 0, 8) + ", " +
                       entry("empty", "[0]", 8, 8) + "}",
                   data16) == "");
    CHECK(open_raw("none.safetensors", "{}", "") == "");
    CHECK(open_raw("meta.safetensors", "{\"__metadata__\": null, " + entry("a", "[4]", 0, 16) + "}",
                   data16) == "");
  }
  SUBCASE("a hole between two tensors names the tensor after it") {
    const std::string msg =
        open_raw("hole.safetensors",
                 "{" + entry("a", "[1]", 0, 4) + ", " + entry("b", "[2]", 8, 16) + "}", data16);
    CHECK(one_line(msg));
    CHECK(msg == dir / "hole.safetensors" +
                     ": key 'b': data_offsets [8, 16) leave bytes [4, 8) of the data buffer to no "
                     "tensor (the ranges must be contiguous)");
    CHECK(open_raw("lead.safetensors", "{" + entry("a", "[2]", 8, 16) + "}", data16)
              .find("key 'a': data_offsets [8, 16) leave bytes [0, 8)") != std::string::npos);
  }
  SUBCASE("bytes after the last tensor") {
    CHECK(open_raw("tail.safetensors", "{" + entry("a", "[2]", 0, 8) + "}", data16) ==
          dir / "tail.safetensors" +
              ": 8 bytes follow the last tensor's data (bytes [8, 16) of the data buffer belong "
              "to no tensor)");
    CHECK(open_raw("nodata.safetensors", "{}", data16).find("16 bytes follow") !=
          std::string::npos);
  }
  SUBCASE("__metadata__ must map strings to strings") {
    CHECK(open_raw("m1.safetensors",
                   "{\"__metadata__\": {\"format\": \"pt\", \"step\": 3}, " +
                       entry("a", "[4]", 0, 16) + "}",
                   data16) ==
          dir / "m1.safetensors" + ": __metadata__ key 'step' is 3, expected a string");
    CHECK(open_raw("m2.safetensors",
                   "{\"__metadata__\": [\"pt\"], " + entry("a", "[4]", 0, 16) + "}", data16) ==
          dir / "m2.safetensors" + ": __metadata__ is a array, expected an object of strings");
  }
  SUBCASE("a header over 100,000,000 bytes is refused before it is read") {
    const std::string path = dir / "big.safetensors";
    write_file(path, le_u64(kiln::kMaxSafetensorsHeader + 1) + "{}");
    CHECK(open_error(path) == path +
                                  ": header length 100000001 is over the 100000000-byte limit of "
                                  "the safetensors format; not a safetensors file or corrupt");
    write_file(path, le_u64(kiln::kMaxSafetensorsHeader) + "{}");
    CHECK(open_error(path).find("larger than the file") != std::string::npos);
  }
  SUBCASE("numbers that do not fit: a shape too large, a JSON number overflowing a double") {
    CHECK(open_raw("wrap.safetensors", "{" + entry("w", "[288230376151711744, 64]", 0, 0) + "}", "")
              .find("key 'w': shape [288230376151711744,64] is too large") != std::string::npos);
    const std::string msg =
        open_raw("inf.safetensors", "{" + entry("w", "[1e999]", 0, 0) + "}", "");
    CHECK(msg ==
          dir / "inf.safetensors" + ": malformed header JSON: number overflow parsing '1e999'");
    // The sharded index, the same.
    const std::string index = dir / "bad.index.json";
    write_file(index, "{\"metadata\": {\"total_size\": 1e999}, \"weight_map\": {}}");
    CHECK(open_error(index) == index + ": malformed index JSON: number overflow parsing '1e999'");
  }
  SUBCASE("a FIFO in place of a checkpoint or a shard is refused without blocking") {
    const std::string fifo = dir / "fifo.safetensors";
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    CHECK(open_error(fifo) == fifo + ": not a regular file (a FIFO)");
    const std::string index = dir / "fifo.index.json";
    write_file(index, "{\"weight_map\": {\"w\": \"fifo.safetensors\"}}");
    CHECK(open_error(index) == fifo + ": not a regular file (a FIFO)");
  }
}

TEST_CASE("safetensors: sharded checkpoint via index.json and multiple files") {
  TempDir dir;
  fs::create_directories(dir.path / "ckpt");
  const std::vector<float> a = {1, 2, 3, 4}, b = {5, 6}, c = {7};
  write_file(
      dir / "ckpt/model-00001-of-00002.safetensors",
      safetensors({{"a", "F32", {2, 2}, bytes_of(a)}, {"b", "BF16", {2}, bytes_of(to_bf16(b))}}));
  write_file(dir / "ckpt/model-00002-of-00002.safetensors",
             safetensors({{"c", "F32", {1}, bytes_of(c)}}));
  const std::string index = dir / "ckpt/model.safetensors.index.json";
  auto write_index = [&](const std::string& map) {
    write_file(index, "{\"metadata\": {\"total_size\": 28}, \"weight_map\": {" + map + "}}");
  };
  const std::string good_map =
      "\"a\": \"model-00001-of-00002.safetensors\", \"b\": \"model-00001-of-00002.safetensors\", "
      "\"c\": \"model-00002-of-00002.safetensors\"";

  SUBCASE("reads every shard once") {
    write_index(good_map);
    Checkpoint ck = Checkpoint::open({index});
    CHECK(ck.tensors().size() == 3);
    CHECK(ck.files().size() == 2);
    std::vector<float> out(4);
    kiln::read_as_f32(*ck.find("a"), out.data());
    CHECK(out == a);
    kiln::read_as_f32(*ck.find("b"), out.data());
    CHECK(out[1] == 6.0f);
    kiln::read_as_f32(*ck.find("c"), out.data());
    CHECK(out[0] == 7.0f);
  }
  SUBCASE("a shard name outside the index's directory is refused") {
    for (const std::string bad :
         {"../model-00002-of-00002.safetensors", "/etc/passwd", "sub/../../x.safetensors"}) {
      write_index(good_map + ", \"d\": \"" + bad + "\"");
      CHECK(open_error(index) == index + ": weight_map key 'd' maps to '" + bad +
                                     "', expected a shard file inside the index's directory");
    }
  }
  SUBCASE("missing shard") {
    write_index(good_map + ", \"d\": \"model-00003-of-00002.safetensors\"");
    const std::string msg = open_error(index);
    CHECK(one_line(msg));
    CHECK(msg.starts_with(index + ":"));
    CHECK(msg.find("model-00003-of-00002.safetensors") != std::string::npos);
    CHECK(msg.find("does not exist") != std::string::npos);
  }
  SUBCASE("key in the map missing from its shard") {
    write_index(good_map + ", \"x\": \"model-00002-of-00002.safetensors\"");
    const std::string msg = open_error(index);
    CHECK(one_line(msg));
    CHECK(msg.find("key 'x'") != std::string::npos);
    CHECK(msg.find("does not contain it") != std::string::npos);
  }
  SUBCASE("key in a shard but mapped elsewhere") {
    write_index(
        "\"a\": \"model-00001-of-00002.safetensors\", \"c\": \"model-00002-of-00002.safetensors\"");
    const std::string msg = open_error(index);
    CHECK(one_line(msg));
    CHECK(msg.find("key 'b'") != std::string::npos);
    CHECK(msg.find("weight_map") != std::string::npos);
  }
  SUBCASE("malformed index") {
    write_file(index, "{\"weight_map\": [1]}");
    CHECK(open_error(index).find("'weight_map' object") != std::string::npos);
    write_file(index, "{\"weight_map\": {\"a\": 3}}");
    CHECK(open_error(index).find("weight_map key 'a'") != std::string::npos);
    write_file(index, "{\"weight_map\": ");
    CHECK(open_error(index).find("malformed index JSON") != std::string::npos);
  }
  SUBCASE("several plain files; a key in two files names both") {
    const std::string s1 = dir / "ckpt/model-00001-of-00002.safetensors";
    const std::string s2 = dir / "ckpt/model-00002-of-00002.safetensors";
    Checkpoint ck = Checkpoint::open({s1, s2});
    CHECK(ck.tensors().size() == 3);
    const std::string dup = dir / "dup.safetensors";
    write_file(dup, safetensors({{"b", "F32", {1}, bytes_of(c)}}));
    const std::string msg = error_of([&] { (void)Checkpoint::open({s1, dup}); });
    CHECK(one_line(msg));
    CHECK(msg.find("key 'b'") != std::string::npos);
    CHECK(msg.find(s1) != std::string::npos);
    CHECK(msg.find(dup) != std::string::npos);
  }
  SUBCASE("the same file twice") {
    write_index(good_map);
    const std::string s2 = dir / "ckpt/model-00002-of-00002.safetensors";
    const std::string msg = error_of([&] { (void)Checkpoint::open({index, s2}); });
    CHECK(one_line(msg));
    CHECK(msg.find("given twice") != std::string::npos);
  }
  SUBCASE("no paths") {
    CHECK(error_of([] { (void)Checkpoint::open({}); }) != "");
  }
}
