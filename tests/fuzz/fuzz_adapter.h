// A LoRA adapter directory (`kiln export --lora DIR`, `kiln adapter add`): the input is a bundle
// (fuzz_common.h) holding the base model's config.json and the adapter's files under adapter/
// (adapter_config.json and the weights). kiln tells MaxText from PEFT by the directory's content,
// so the MaxText and PEFT targets share this code and differ in their seed corpora, which keeps
// a campaign's executions on one format each.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"
#include "export/config_reader.h"
#include "export/lora.h"
#include "tests/fuzz/fuzz_common.h"

namespace kiln::fuzz {

inline int open_adapter_bundle(const uint8_t* data, size_t size) {
  const auto files = unpack_bundle({data, size});
  if (!find_file(files, "config.json")) return 0;
  constexpr int64_t kMaxFloats = int64_t(1) << 20;  // what one input may read or merge
  auto small = [](int64_t a, int64_t b) {
    int64_t n = 0;
    return a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, &n) && n <= kMaxFloats;
  };
  auto pair_is_small = [&](int64_t in, int64_t out, int64_t rank) {
    int64_t in_out = 0;
    return !__builtin_add_overflow(in, out, &in_out) && small(in_out, rank);
  };
  write_bundle(files);
  ModelConfig base;
  try {
    base = read_export_config(scratch_dir() + "/config.json", {}).model;
  } catch (...) {
    return 0;  // the config targets fuzz this parser; here it only has to give a base model
  }
  try {
    const AdapterSource adapter = AdapterSource::open(scratch_dir() + "/adapter", base);
    for (const LoraTargetInfo& t : adapter.targets()) {
      const auto [in, out] = lora_in_out(base, t.tensor);
      if (!pair_is_small(in, out, t.rank)) continue;
      const LoraDelta d = adapter.read(t.layer, t.tensor);
      if (d.a.size() != size_t(d.in * d.rank) || d.b.size() != size_t(d.rank * d.out) ||
          d.in != in || d.out != out)
        throw Finding("adapter pair " + t.a_key + " / " + t.b_key +
                      " was read with sizes that do not match its [in, r] x [r, out] shape");
      if (!small(in, out)) continue;
      std::vector<float> w(size_t(in * out));
      merge_lora(d, w.data());
    }
  } catch (const Error& e) {
    refused(e);
  }
  return 0;
}

}  // namespace kiln::fuzz
