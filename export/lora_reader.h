// The parts of export/lora.cpp the two adapter readers share (lora_maxtext.cpp: MaxText's adapter
// format, lora_peft.cpp: PEFT's): the adapter_config.json reader, where a pair lives in the
// weights, and AdapterSource's state. Internal to export/lora*.cpp.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/error.h"
#include "common/file_io.h"
#include "export/lora.h"
#include "export/safetensors.h"
#include "schema/blob_file.h"

namespace kiln::lora_detail {

using nlohmann::ordered_json;

// attn.o [H, D, E] takes both head axes as input; every other targetable kernel has one.
size_t input_axes(const std::string& tensor);

std::string join(const std::vector<std::string>& v, const std::string& sep);

// The unscanned base shape of a targetable tensor, from a layer that has it.
std::optional<std::vector<int64_t>> target_base_shape(const ModelConfig& c,
                                                      const std::string& tensor);

// Every tensor LoRA may target in some layer of the model.
std::vector<std::string> all_target_tensors(const ModelConfig& c);

std::string file_of(const SourceTensor& t);

// --- adapter_config.json -------------------------------------------------------------------------

class AdapterConfig {
 public:
  explicit AdapterConfig(std::string path) : path_(std::move(path)) {
    const std::string text = read_whole_file(path_);
    try {
      j_ = ordered_json::parse(text);
    } catch (const ordered_json::exception& e) {  // a syntax error, or a number that does not fit
      std::string what = e.what();
      // Drop nlohmann's "[json.exception.parse_error.101] " tag; keep its description.
      if (auto p = what.find("] "); p != std::string::npos && what.starts_with("[json.exception"))
        what = what.substr(p + 2);
      for (char& ch : what)
        if (ch == '\n' || ch == '\r') ch = ' ';
      throw Error(path_ + ": malformed JSON: " + what);
    }
    if (!j_.is_object()) throw Error(path_ + ": expected a JSON object");
  }

  const std::string& path() const { return path_; }
  const ordered_json& json() const { return j_; }

  // Present and not null.
  bool has(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }

  Error error(const std::string& key, const std::string& what) const {
    return Error(path_ + ": key '" + key + "' " + what);
  }

  const ordered_json& required(const std::string& key, const char* expected) const {
    if (!has(key)) throw error(key, std::string("is missing (expected ") + expected + ")");
    return j_[key];
  }

  int64_t positive_int(const std::string& key) const {
    const ordered_json& v = required(key, "a positive integer");
    if (!v.is_number_integer() || v.get<int64_t>() <= 0)
      throw error(key, "is " + v.dump() + ", expected a positive integer");
    return v.get<int64_t>();
  }

  double number(const std::string& key) const {
    const ordered_json& v = required(key, "a number");
    if (!v.is_number() || !std::isfinite(v.get<double>()))
      throw error(key, "is " + v.dump() + ", expected a number");
    return v.get<double>();
  }

  bool flag(const std::string& key) const {
    if (!has(key)) return false;
    if (!j_[key].is_boolean())
      throw error(key, "is " + j_[key].dump() + ", expected true or false");
    return j_[key].get<bool>();
  }

 private:
  std::string path_;
  ordered_json j_;
};

// Where one adapted (layer, tensor) pair lives in the weights.
struct PairSource {
  const SourceTensor* a = nullptr;
  const SourceTensor* b = nullptr;
  bool scanned = false;  // MaxText scanned group: the layer is a slice of axis 1
  int64_t index = 0;     // layer within its group (scanned only)
};

struct PendingPair {
  LoraTargetInfo info;
  PairSource src;
};

}  // namespace kiln::lora_detail

namespace kiln {

struct AdapterSource::Impl {
  using AdapterConfig = lora_detail::AdapterConfig;
  using PairSource = lora_detail::PairSource;
  using PendingPair = lora_detail::PendingPair;

  AdapterFormat format = AdapterFormat::MaxText;
  std::string dir;
  ModelConfig base;
  int64_t rank = 0;
  double alpha = 0;
  bool rslora = false;
  double user_scale = 1;
  Checkpoint weights;
  std::vector<LoraTargetInfo> targets;
  std::vector<PairSource> sources;  // parallel to targets
  std::map<std::pair<int, std::string>, size_t> by_target;

  std::map<std::pair<int, std::string>, PendingPair> pending;

  // The two formats (lora_maxtext.cpp, lora_peft.cpp): checking the adapter against `base`,
  // and reading one pair as MaxText's A [in, r], B [r, out] (d's sizes already set).
  void open_maxtext(const AdapterConfig& cfg);
  void open_peft(const AdapterConfig& cfg);
  void read_maxtext(const PairSource& src, LoraDelta& d) const;
  void read_peft(const PairSource& src, const LoraTargetInfo& info, const std::string& tensor,
                 LoraDelta& d) const;
  void add(PendingPair p);
  void finish(const std::string& where);
  const LoraTargetInfo& info_for(int layer, const std::string& tensor, size_t* index) const;
};

}  // namespace kiln
