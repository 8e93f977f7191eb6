#include "export/safetensors.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string_view>

#include "common/bf16.h"
#include "common/checked.h"
#include "common/durable_output.h"
#include "common/error.h"

namespace kiln {

namespace fs = std::filesystem;
using nlohmann::json;

int64_t SourceTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

namespace {

// Messages must stay on one line even when they quote file content.
std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

uint64_t read_le_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

struct ParsedEntry {
  SourceTensor tensor;
  uint64_t begin = 0, end = 0;  // relative to the data buffer
};

std::string range_text(const ParsedEntry& e) {
  return "[" + std::to_string(e.begin) + ", " + std::to_string(e.end) + ")";
}

// nlohmann's description of a parse failure without its "[json.exception.parse_error.101] " tag.
std::string json_what(const json::exception& e) {
  std::string what = e.what();
  if (auto p = what.find("] "); p != std::string::npos && what.starts_with("[json.exception"))
    what = what.substr(p + 2);
  return what;
}

// `__metadata__` is a map of strings to strings (null: none).
void check_metadata(const std::string& path, const json& m) {
  if (m.is_null()) return;
  if (!m.is_object())
    throw Error(path + ": __metadata__ is a " + std::string(m.type_name()) +
                ", expected an object of strings");
  for (auto it = m.begin(); it != m.end(); ++it)
    if (!it.value().is_string())
      throw Error(path + ": __metadata__ key '" + it.key() + "' is " + one_line(it.value().dump()) +
                  ", expected a string");
}

// The tensors' byte ranges, sorted, must tile the data buffer exactly: no two overlap (they
// would alias one another), no gap lies between them and no byte follows the last one (bytes
// that belong to no tensor mean a corrupt or hand-made file; the reference implementation
// refuses them too).
void check_tiling(const std::string& path, const std::vector<ParsedEntry>& entries,
                  uint64_t data_size) {
  std::vector<const ParsedEntry*> sorted;
  for (const ParsedEntry& e : entries) sorted.push_back(&e);
  std::sort(sorted.begin(), sorted.end(), [](const ParsedEntry* a, const ParsedEntry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t covered = 0;
  const ParsedEntry* last = nullptr;  // the latest non-empty range
  for (const ParsedEntry* e : sorted) {
    if (e->begin < covered)
      throw Error(path + ": data ranges of keys '" + last->tensor.key + "' " + range_text(*last) +
                  " and '" + e->tensor.key + "' " + range_text(*e) + " overlap");
    if (e->begin > covered)
      throw Error(path + ": key '" + e->tensor.key + "': data_offsets " + range_text(*e) +
                  " leave bytes [" + std::to_string(covered) + ", " + std::to_string(e->begin) +
                  ") of the data buffer to no tensor (the ranges must be contiguous)");
    if (e->end > e->begin) last = e;
    covered = e->end;
  }
  if (covered != data_size)
    throw Error(path + ": " + std::to_string(data_size - covered) +
                " bytes follow the last tensor's data (bytes [" + std::to_string(covered) + ", " +
                std::to_string(data_size) + ") of the data buffer belong to no tensor)");
}

// Parses and validates one file's header. Nothing in the file is trusted: every offset and size
// is checked against the mapping before a pointer into it is formed.
std::vector<ParsedEntry> parse_header(const MappedFile& f) {
  const std::string& path = f.path();
  const size_t size = f.size();
  if (size < 8)
    throw Error(path + ": file is " + std::to_string(size) +
                " bytes, shorter than the 8-byte safetensors header length; not a safetensors file "
                "or truncated");
  const uint64_t n = read_le_u64(f.data());
  if (n > kMaxSafetensorsHeader)
    throw Error(path + ": header length " + std::to_string(n) + " is over the " +
                std::to_string(kMaxSafetensorsHeader) +
                "-byte limit of the safetensors format; not a safetensors file or corrupt");
  if (n > size - 8)
    throw Error(path + ": header length " + std::to_string(n) + " is larger than the file (" +
                std::to_string(size) + " bytes); not a safetensors file or truncated");
  const char* hdr = reinterpret_cast<const char*>(f.data() + 8);
  json j;
  // nlohmann keeps the last of duplicate keys silently; a header naming one tensor twice is
  // corrupt, so top-level keys are checked while parsing.
  std::set<std::string> seen;
  auto reject_duplicates = [&](int depth, json::parse_event_t ev, json& parsed) {
    if (depth == 1 && ev == json::parse_event_t::key &&
        !seen.insert(parsed.get<std::string>()).second)
      throw Error(path + ": key '" + parsed.get<std::string>() + "' appears twice in the header");
    return true;
  };
  try {
    j = json::parse(hdr, hdr + n, reject_duplicates);
  } catch (const json::parse_error& e) {
    throw Error(one_line(path + ": malformed header JSON at byte " + std::to_string(e.byte) +
                         " of the " + std::to_string(n) + "-byte header: " + json_what(e)));
  } catch (const json::exception& e) {  // a number that does not fit (1e999)
    throw Error(one_line(path + ": malformed header JSON: " + json_what(e)));
  }
  if (!j.is_object())
    throw Error(path + ": header JSON is a " + std::string(j.type_name()) +
                ", expected an object {key: {dtype, shape, data_offsets}}");

  const uint64_t data_size = size - 8 - n;
  const uint8_t* data = f.data() + 8 + n;
  std::vector<ParsedEntry> out;
  out.reserve(j.size());
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const json& e = it.value();
    if (key == "__metadata__") {  // a free-form string map; checked as the format demands, unused
      check_metadata(path, e);
      continue;
    }
    const std::string where = path + ": key '" + key + "'";
    if (!e.is_object())
      throw Error(where + ": entry is a " + std::string(e.type_name()) +
                  ", expected an object with dtype, shape and data_offsets");
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!e.contains(field))
        throw Error(where + ": entry has no '" + field +
                    "' field (expected dtype, shape and data_offsets)");

    ParsedEntry pe;
    SourceTensor& t = pe.tensor;
    t.key = key;
    t.file = &f;

    const json& dt = e["dtype"];
    if (!dt.is_string()) throw Error(where + ": dtype is not a string: " + one_line(dt.dump()));
    const std::string dts = dt.get<std::string>();
    if (dts == "F32") {
      t.dtype = DType::F32;
    } else if (dts == "BF16") {
      t.dtype = DType::BF16;
    } else if (dts == "F16") {
      t.dtype = DType::F16;
    } else {
      throw Error(where + ": unsupported dtype '" + dts + "' (supported: F32, BF16, F16)");
    }

    const json& sh = e["shape"];
    if (!sh.is_array())
      throw Error(where + ": shape is not a list of integers: " + one_line(sh.dump()));
    bool too_large = false;
    for (const json& d : sh) {
      if (d.is_number_integer() && !d.is_number_unsigned())
        throw Error(where + ": shape " + one_line(sh.dump()) + " has a negative dimension");
      if (!d.is_number_integer())
        throw Error(where + ": shape " + one_line(sh.dump()) + " is not a list of integers");
      const uint64_t dim = d.get<uint64_t>();
      too_large = too_large || dim > kMaxSize;
      t.shape.push_back(int64_t(std::min(dim, kMaxSize)));
    }
    const std::optional<uint64_t> bytes = checked_bytes(t.shape, dtype_size(t.dtype));
    if (too_large || !bytes)
      throw Error(where + ": shape " + one_line(sh.dump()) + " is too large");
    const uint64_t expect_bytes = *bytes;

    const json& off = e["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned())
      throw Error(where + ": data_offsets " + one_line(off.dump()) +
                  " is not a pair of non-negative integers [begin, end]");
    pe.begin = off[0].get<uint64_t>();
    pe.end = off[1].get<uint64_t>();
    const std::string range = range_text(pe);
    if (pe.end < pe.begin)
      throw Error(where + ": data_offsets " + range + " end before they begin");
    if (pe.end - pe.begin != expect_bytes)
      throw Error(where + ": data_offsets " + range + " hold " + std::to_string(pe.end - pe.begin) +
                  " bytes but shape " + shape_str(t.shape) + " of " + dts + " needs " +
                  std::to_string(expect_bytes) + " bytes");
    if (pe.end > data_size)
      throw Error(where + ": data_offsets " + range + " lie past the end of the file (" +
                  std::to_string(size) + " bytes, data buffer " + std::to_string(data_size) +
                  " bytes); the file looks truncated");
    t.data = data + pe.begin;
    t.nbytes = size_t(expect_bytes);
    out.push_back(std::move(pe));
  }

  check_tiling(path, out, data_size);
  return out;
}

// Shards named by an index, each with the keys the index assigns to it.
struct IndexShards {
  std::vector<std::string> paths;  // resolved, in first-mention order
  std::map<std::string, std::set<std::string>> keys;
};

IndexShards read_index(const std::string& index_path) {
  MappedFile f(index_path);
  const char* p = reinterpret_cast<const char*>(f.data());
  json j;
  try {
    j = json::parse(p, p + f.size());
  } catch (const json::parse_error& e) {
    throw Error(one_line(index_path + ": malformed index JSON at byte " + std::to_string(e.byte) +
                         ": " + json_what(e)));
  } catch (const json::exception& e) {  // a number that does not fit (1e999)
    throw Error(one_line(index_path + ": malformed index JSON: " + json_what(e)));
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    throw Error(index_path +
                ": expected a JSON object with a 'weight_map' object {key: shard file}");
  const fs::path dir = fs::path(index_path).parent_path();
  IndexShards out;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string() || it.value().get<std::string>().empty())
      throw Error(index_path + ": weight_map key '" + it.key() + "' maps to " +
                  one_line(it.value().dump()) + ", expected a shard file name");
    // Shards sit beside their index (that is how every writer lays them out); a name that
    // climbs out of the directory or is absolute would read an unrelated file.
    const fs::path name = it.value().get<std::string>();
    bool climbs = name.is_absolute();
    for (const auto& part : name) climbs = climbs || part == "..";
    if (climbs)
      throw Error(index_path + ": weight_map key '" + it.key() + "' maps to '" + name.string() +
                  "', expected a shard file inside the index's directory");
    const std::string shard = (dir / name).string();
    auto [pos, inserted] = out.keys.try_emplace(shard);
    if (inserted) out.paths.push_back(shard);
    pos->second.insert(it.key());
  }
  return out;
}

std::string where_of(const SourceTensor& t) {
  return (t.file ? t.file->path() : std::string("<tensor>")) + ": key '" + t.key + "'";
}

}  // namespace

Checkpoint Checkpoint::open(const std::vector<std::string>& paths) {
  if (paths.empty()) throw Error("no checkpoint files given");
  Checkpoint ck;
  std::map<std::string, std::string> opened;  // canonical path → path as first given
  // Opens one .safetensors file; `expected` (from an index) lists the keys it must hold.
  auto add_file = [&](const std::string& path, const std::set<std::string>* expected,
                      const std::string& index_path) {
    std::error_code ec;
    fs::path canon = fs::weakly_canonical(path, ec);
    const std::string id = ec ? path : canon.string();
    if (auto [it, inserted] = opened.emplace(id, path); !inserted)
      throw Error(path + ": checkpoint file given twice (also as '" + it->second + "')");
    if (!index_path.empty() && !fs::exists(path, ec) && !ec)
      throw Error(index_path + ": shard '" + path + "' (holding key '" + *expected->begin() +
                  "') does not exist");
    auto f = std::make_unique<MappedFile>(path);
    std::vector<ParsedEntry> entries = parse_header(*f);
    std::set<std::string> present;
    for (ParsedEntry& pe : entries) {
      const std::string& key = pe.tensor.key;
      if (expected && !expected->count(key))
        throw Error(
            path + ": key '" + key + "' is in the shard but " + index_path +
            " does not list it in weight_map for this shard; the index and shards disagree");
      if (auto it = ck.index_.find(key); it != ck.index_.end())
        throw Error(path + ": key '" + key + "' is also in " +
                    ck.tensors_[it->second].file->path() + "; a key may appear in only one file");
      present.insert(key);
      ck.index_.emplace(key, ck.tensors_.size());
      ck.tensors_.push_back(std::move(pe.tensor));
    }
    if (expected)
      for (const std::string& key : *expected)
        if (!present.count(key))
          throw Error(index_path + ": key '" + key + "' is mapped to shard " + path +
                      ", which does not contain it");
    ck.files_.push_back(std::move(f));
  };

  for (const std::string& path : paths) {
    if (ends_with(path, ".json")) {
      IndexShards shards = read_index(path);
      for (const std::string& shard : shards.paths) add_file(shard, &shards.keys[shard], path);
    } else {
      add_file(path, nullptr, "");
    }
  }
  return ck;
}

const SourceTensor* Checkpoint::find(const std::string& key) const {
  auto it = index_.find(key);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

std::vector<std::pair<std::string, uint64_t>> Checkpoint::files() const {
  std::vector<std::pair<std::string, uint64_t>> out;
  out.reserve(files_.size());
  for (const auto& f : files_) out.emplace_back(f->path(), uint64_t(f->size()));
  return out;
}

void Checkpoint::release_pages() const {
  for (const auto& f : files_) f->release_pages();
}

void read_as_f32(const SourceTensor& t, float* out) {
  convert_to_f32(t.dtype, t.data, size_t(t.numel()), out);
}

void read_slice_as_f32(const SourceTensor& t, int axis, int64_t index, float* out) {
  const int rank = int(t.shape.size());
  if (axis < 0 || axis >= rank)
    throw Error(where_of(t) + ": cannot slice axis " + std::to_string(axis) +
                " of a tensor of shape " + shape_str(t.shape) + " (rank " + std::to_string(rank) +
                "); expected 0 <= axis < " + std::to_string(rank));
  const int64_t n = t.shape[size_t(axis)];
  if (index < 0 || index >= n)
    throw Error(where_of(t) + ": slice index " + std::to_string(index) + " on axis " +
                std::to_string(axis) + " of shape " + shape_str(t.shape) + " is out of range [0, " +
                std::to_string(n) + ")");
  size_t outer = 1, inner = 1;
  for (int i = 0; i < axis; ++i) outer *= size_t(t.shape[size_t(i)]);
  for (int i = axis + 1; i < rank; ++i) inner *= size_t(t.shape[size_t(i)]);
  const size_t esz = dtype_size(t.dtype);
  const size_t stride = size_t(n) * inner * esz;  // bytes between consecutive outer rows
  const uint8_t* src = t.data + size_t(index) * inner * esz;
  // Short runs (e.g. a norm scale [E, L] sliced on its last axis) would spend more time in call
  // overhead than in converting, so they are gathered element by element instead.
  if (inner < 16) {
    for (size_t o = 0; o < outer; ++o, src += stride)
      for (size_t i = 0; i < inner; ++i) *out++ = to_f32(t.dtype, src + i * esz);
    return;
  }
  for (size_t o = 0; o < outer; ++o, src += stride, out += inner)
    convert_to_f32(t.dtype, src, inner, out);
}

void write_safetensors_f32(const std::string& path, const std::vector<F32Tensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    uint64_t n = 1;
    for (int64_t d : t.shape) n *= uint64_t(d);
    if (n != t.data.size())
      throw Error(path + ": tensor '" + t.key + "' has " + std::to_string(t.data.size()) +
                  " values for shape " + shape_str(t.shape));
    header[t.key] = {
        {"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + n * 4}}};
    offset += n * 4;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // keep the data 8-byte aligned, as the format suggests
  StagedFile f(path);
  const uint64_t hlen = h.size();
  f.write(&hlen, 8);
  f.write(h.data(), h.size());
  for (const auto& t : tensors) f.write(t.data.data(), t.data.size() * 4);
  f.commit();
}

}  // namespace kiln
