#include "export/unroll.h"

#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "common/error.h"

using namespace kiln;
namespace fs = std::filesystem;

namespace {

// Writes a one-tensor f32 safetensors file whose values are their own flat index.
fs::path write_iota_tensor(const std::string& name, const std::vector<int64_t>& shape) {
  fs::path dir = fs::temp_directory_path() / "kiln_unroll_test";
  fs::create_directories(dir);
  fs::path p = dir / name;
  int64_t n = 1;
  for (auto d : shape) n *= d;
  F32Tensor t{"t", shape, std::vector<float>(size_t(n))};
  for (int64_t i = 0; i < n; ++i) t.data[size_t(i)] = float(i);
  write_safetensors_f32(p.string(), {t});
  return p;
}

}  // namespace

TEST_CASE("scanned_shape inserts the layer axis") {
  CHECK(scanned_shape({64, 4, 16}, 3, 1, "q") == std::vector<int64_t>{64, 3, 4, 16});
  CHECK(scanned_shape({64, 4, 16}, 3, 0, "q") == std::vector<int64_t>{3, 64, 4, 16});
  CHECK(scanned_shape({64}, 3, 1, "norm") == std::vector<int64_t>{64, 3});
  CHECK_THROWS_WITH_AS(scanned_shape({64}, 3, 2, "norm"), doctest::Contains("'norm'"), Error);
  CHECK_THROWS_AS(scanned_shape({64}, 3, -1, "norm"), Error);
}

TEST_CASE("unrolling along axis 1 takes the [:, l] slice") {
  // [E=2, L=3, H=2, D=2]: element (e, l, h, d) has value ((e*3 + l)*2 + h)*2 + d.
  auto ckpt = Checkpoint::open({write_iota_tensor("axis1.safetensors", {2, 3, 2, 2}).string()});
  const SourceTensor* t = ckpt.find("t");
  REQUIRE(t);
  std::vector<float> out(8);
  unroll_scanned_layer({t, 1, 2}, out.data());
  std::vector<float> want;
  for (int e = 0; e < 2; ++e)
    for (int h = 0; h < 2; ++h)
      for (int d = 0; d < 2; ++d) want.push_back(float(((e * 3 + 2) * 2 + h) * 2 + d));
  CHECK(out == want);
}

TEST_CASE("unrolling along axis 0 takes the [l] slice") {
  auto ckpt = Checkpoint::open({write_iota_tensor("axis0.safetensors", {3, 4}).string()});
  std::vector<float> out(4);
  unroll_scanned_layer({ckpt.find("t"), 0, 1}, out.data());
  CHECK(out == std::vector<float>{4, 5, 6, 7});
  // Not scanned: the whole tensor.
  std::vector<float> all(12);
  unroll_scanned_layer({ckpt.find("t"), -1, 0}, all.data());
  CHECK(all[11] == 11.0f);
}

TEST_CASE("LayerGroup recognises scanned and unrolled forms and refuses a mix") {
  SourceTensor a, b;
  a.key = "params.params.decoder.layers.mlp.wo.kernel";
  b.key = "params.params.decoder.layers_1.mlp.wo.kernel";
  std::map<std::string, const SourceTensor*> scanned = {{"decoder/layers/mlp/wo/kernel", &a}};
  LayerGroup g1(scanned, "layers", 1);
  CHECK(g1.scanned());
  auto s = g1.find(1, "mlp/wo/kernel");
  CHECK(s.tensor == &a);
  CHECK(s.scan_axis == 1);
  CHECK(s.index == 1);
  CHECK(g1.find(0, "mlp/wi_0/kernel").tensor == nullptr);

  std::map<std::string, const SourceTensor*> unrolled = {{"decoder/layers_1/mlp/wo/kernel", &b}};
  LayerGroup g2(unrolled, "layers", 1);
  CHECK_FALSE(g2.scanned());
  CHECK(g2.find(1, "mlp/wo/kernel").tensor == &b);
  CHECK(g2.find(1, "mlp/wo/kernel").scan_axis == -1);
  CHECK(g2.find(0, "mlp/wo/kernel").tensor == nullptr);
  int64_t layer;
  std::string param;
  CHECK(g2.owns("decoder/layers_12/self_attention/query/kernel", &layer, &param));
  CHECK(layer == 12);
  CHECK(param == "self_attention/query/kernel");
  CHECK_FALSE(g2.owns("decoder/decoder_norm/scale", &layer, &param));

  std::map<std::string, const SourceTensor*> mixed = {{"decoder/layers/mlp/wo/kernel", &a},
                                                      {"decoder/layers_1/mlp/wo/kernel", &b}};
  CHECK_THROWS_WITH_AS(LayerGroup(mixed, "layers", 1), doctest::Contains("mixes"), Error);
}
