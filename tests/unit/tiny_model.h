// A tiny Llama model exported to an artifact, for the tests that run the engine.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "export/safetensors.h"

namespace kiln::test {

// A tensor of a synthetic checkpoint: uniform values in ±1.7·scale from a fixed LCG, or, for
// scale 0 (norm scales), 1 + norm_jitter·u.
struct SeededTensorSpec {
  std::string key;
  std::vector<int64_t> shape;
  float scale;
};
std::vector<F32Tensor> seeded_tensors(const std::vector<SeededTensorSpec>& specs, uint64_t seed,
                                      float norm_jitter);

// A tiny Llama checkpoint in MaxText's scanned Linen layout (f32, layer axis 1), its config and
// its artifact, under the temporary directory (kiln_engine_test_<name>/).
struct TinyModel {
  std::filesystem::path dir;
  std::filesystem::path artifact;
};

// E 64, 4 query heads, 2 KV heads, 2 layers, context 96; `tied`: logits via the embedding.
TinyModel make_tiny_model(const std::string& name, bool tied, int64_t V = 256);

// Exports the checkpoint `dir`/model.safetensors with its `dir`/config.json to `artifact`.
void export_fixture(const std::filesystem::path& dir, const std::filesystem::path& artifact);

// make_tiny_model("untied", false), made once per process.
const TinyModel& tiny_untied();

}  // namespace kiln::test
