// Engine-level tests on a tiny exported model: the per-token path allocates nothing (which also
// rules out oneDNN primitive creation, which allocates), decoding through the KV cache gives the
// logits a full prefill gives, bad requests are errors, and run-time adapters load into a running
// engine, mix per slot and unload.
#include "engine/engine.h"

#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "common/bf16.h"
#include "common/error.h"
#include "export/adapter.h"
#include "export/exporter.h"
#include "export/safetensors.h"
#include "tests/unit/alloc_counter.h"

namespace fs = std::filesystem;
using namespace kiln;

namespace {

// A tiny Llama checkpoint in MaxText's scanned Linen layout (f32, layer axis 1) and its config.
struct TinyModel {
  fs::path dir;
  fs::path artifact;
};

TinyModel make_tiny_model(const std::string& name, bool tied) {
  const int64_t E = 64, H = 4, K = 2, D = 16, F = 128, L = 2, V = 256;
  TinyModel m{fs::temp_directory_path() / ("kiln_engine_test_" + name), {}};
  fs::remove_all(m.dir);
  fs::create_directories(m.dir);
  m.artifact = m.dir / "model.kiln";

  struct T {
    std::string key;
    std::vector<int64_t> shape;
    float scale;  // 0 → ones (norm scales)
  };
  const std::string p = "params.params.", l = p + "decoder.layers.";
  std::vector<T> ts = {
      {p + "token_embedder.embedding", {V, E}, 1.0f},
      {p + "decoder.decoder_norm.scale", {E}, 0},
      {l + "pre_self_attention_layer_norm.scale", {E, L}, 0},
      {l + "self_attention.query.kernel", {E, L, H, D}, 0.5f / 8 / 4},
      {l + "self_attention.key.kernel", {E, L, K, D}, 0.5f / 8},
      {l + "self_attention.value.kernel", {E, L, K, D}, 1.0f / 8},
      {l + "self_attention.out.kernel", {H, L, D, E}, 1.0f / 8},
      {l + "post_self_attention_layer_norm.scale", {E, L}, 0},
      {l + "mlp.wi_0.kernel", {E, L, F}, 1.0f / 8},
      {l + "mlp.wi_1.kernel", {E, L, F}, 1.0f / 8},
      {l + "mlp.wo.kernel", {F, L, E}, 1.0f / 11},
  };
  if (!tied) ts.push_back({p + "decoder.logits_dense.kernel", {E, V}, 1.0f / 8});
  std::vector<F32Tensor> tensors;
  uint64_t seed = 12345;
  for (const auto& t : ts) {
    int64_t n = 1;
    for (auto d : t.shape) n *= d;
    F32Tensor out{t.key, t.shape, {}};
    for (int64_t i = 0; i < n; ++i) {
      seed = seed * 6364136223846793005ull + 1442695040888963407ull;
      const float u = float((seed >> 40) & 0xffffff) / float(1 << 24) * 2.0f - 1.0f;  // [-1, 1)
      out.data.push_back(t.scale == 0 ? 1.0f : u * t.scale * 1.7f);
    }
    tensors.push_back(std::move(out));
  }
  write_safetensors_f32((m.dir / "model.safetensors").string(), tensors);

  nlohmann::json cfg = {{"decoder_block", "llama2"},   {"emb_dim", E},    {"num_query_heads", H},
                        {"num_kv_heads", K},           {"head_dim", D},   {"mlp_dim", F},
                        {"num_decoder_layers", L},     {"vocab_size", V}, {"max_target_length", 96},
                        {"logits_via_embedding", tied}};
  std::ofstream(m.dir / "config.json") << cfg.dump();

  ExportOptions opt;
  opt.checkpoints = {(m.dir / "model.safetensors").string()};
  opt.config_path = (m.dir / "config.json").string();
  opt.out_dir = m.artifact.string();
  export_artifact(opt);
  return m;
}

const TinyModel& tiny_untied() {
  static TinyModel m = make_tiny_model("untied", false);
  return m;
}

EngineOptions options(bool relayout) {
  EngineOptions o;
  o.model.threads = 2;
  o.model.relayout = relayout;
  return o;
}

}  // namespace

TEST_CASE("the allocation counter sees allocations (including operator new)") {
  kiln::test::start_counting_allocations();
  auto v = std::make_unique<std::vector<int>>(100);  // two allocations through operator new
  uint64_t n = kiln::test::stop_counting_allocations();
  CHECK(v->size() == 100);
  CHECK(n == 2);
}

TEST_CASE("generate() performs no heap allocation (and so creates no oneDNN primitive)") {
  for (bool relayout : {true, false}) {
    CAPTURE(relayout);
    auto engine = Engine::open(tiny_untied().artifact.string(), options(relayout));
    std::vector<int32_t> prompt = {3, 14, 15, 92, 65, 35};
    SamplingParams sp;
    sp.temperature = 0.8f;
    sp.top_k = 40;
    sp.top_p = 0.9f;
    sp.seed = 7;
    engine->prefill(prompt, sp);
    engine->generate();  // first token: lazily initialised state, if any, is not per-token
    kiln::test::start_counting_allocations();
    for (int i = 0; i < 32; ++i) engine->generate();
    CHECK(kiln::test::stop_counting_allocations() == 0);
  }
}

TEST_CASE("decoding through the KV cache gives the logits of a full prefill") {
  auto engine = Engine::open(tiny_untied().artifact.string(), options(true));
  const int64_t V = engine->config().vocab_size;
  std::vector<int32_t> seq = {7, 1, 200, 33, 5};
  std::vector<float> step_logits;
  int32_t tok = engine->prefill(seq, SamplingParams{});
  for (int i = 0; i < 12; ++i) {
    seq.push_back(tok);
    tok = engine->generate();
  }
  std::vector<float> last(engine->last_logits().begin(), engine->last_logits().end());
  std::vector<float> all(seq.size() * size_t(V));
  engine->prefill_logits(seq, all.data());
  double max_diff = 0, max_abs = 0;
  for (int64_t v = 0; v < V; ++v) {
    float ref = all[(seq.size() - 1) * size_t(V) + size_t(v)];
    max_diff = std::max(max_diff, double(std::fabs(ref - last[size_t(v)])));
    max_abs = std::max(max_abs, double(std::fabs(ref)));
  }
  MESSAGE("decode vs prefill: max |dlogit| = " << max_diff << " of max |logit| " << max_abs);
  // Same math, different matmul paths (GEMV vs blocked GEMM sum in different orders): at most a
  // few bf16 steps.
  CHECK(max_diff <= 0.02 * max_abs);
}

TEST_CASE("bad requests are errors, not undefined behaviour") {
  auto engine = Engine::open(tiny_untied().artifact.string(), options(false));
  CHECK_THROWS_WITH_AS(engine->generate(), doctest::Contains("before prefill"), Error);
  std::vector<int32_t> bad = {1, 256};
  CHECK_THROWS_WITH_AS(engine->prefill(bad, {}), doctest::Contains("outside the vocabulary"),
                       Error);
  std::vector<int32_t> negative = {-1};
  CHECK_THROWS_AS(engine->prefill(negative, {}), Error);
  CHECK_THROWS_WITH_AS(engine->prefill(std::vector<int32_t>{}, {}), doctest::Contains("empty"),
                       Error);
  std::vector<int32_t> too_long(97, 1);
  CHECK_THROWS_WITH_AS(engine->prefill(too_long, {}), doctest::Contains("longer than the context"),
                       Error);
  std::vector<int32_t> fits(95, 1);
  engine->prefill(fits, {});
  engine->generate();  // position 95 is the last one
  CHECK_THROWS_WITH_AS(engine->generate(), doctest::Contains("is full"), Error);
  SamplingParams sp;
  sp.top_p = 0;
  CHECK_THROWS_AS(engine->prefill(std::vector<int32_t>{1}, sp), Error);
}

TEST_CASE("a tied model runs and opening a missing artifact is a clear error") {
  TinyModel tied = make_tiny_model("tied", true);
  auto engine = Engine::open(tied.artifact.string(), options(true));
  int32_t t = engine->prefill(std::vector<int32_t>{1, 2, 3}, {});
  CHECK(t >= 0);
  CHECK(t < 256);
  CHECK_THROWS_WITH_AS(Engine::open((tied.dir / "nope").string()),
                       doctest::Contains("does not exist"), Error);
}

namespace {

// A rank-4 MaxText adapter (scanned Linen keys) on q, v and mlp.wo of the tiny model.
fs::path write_tiny_adapter(const fs::path& dir, float b_scale) {
  const int64_t E = 64, H = 4, K = 2, D = 16, F = 128, L = 2, r = 4;
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string l = "params.params.decoder.layers.";
  std::vector<F32Tensor> ts = {
      {l + "self_attention.query.lora_a.kernel", {E, L, r}, {}},
      {l + "self_attention.query.lora_b.kernel", {r, L, H, D}, {}},
      {l + "self_attention.value.lora_a.kernel", {E, L, r}, {}},
      {l + "self_attention.value.lora_b.kernel", {r, L, K, D}, {}},
      {l + "mlp.wo.lora_a.kernel", {F, L, r}, {}},
      {l + "mlp.wo.lora_b.kernel", {r, L, E}, {}},
  };
  uint64_t seed = 99;
  for (F32Tensor& t : ts) {
    int64_t n = 1;
    for (auto d : t.shape) n *= d;
    const bool is_b = t.key.find("lora_b") != std::string::npos;
    for (int64_t i = 0; i < n; ++i) {
      seed = seed * 6364136223846793005ull + 1442695040888963407ull;
      const float u = float((seed >> 40) & 0xffffff) / float(1 << 24) * 2.0f - 1.0f;
      t.data.push_back(u * (is_b ? b_scale : 0.25f));
    }
  }
  write_safetensors_f32((dir / "adapter.safetensors").string(), ts);
  nlohmann::json cfg = {
      {"r", r}, {"lora_alpha", 8}, {"target_modules", {"q_proj", "v_proj", "mlp.wo"}}};
  std::ofstream(dir / "adapter_config.json") << cfg.dump();
  return dir;
}

std::vector<int32_t> greedy_alone(Engine& e, const std::vector<int32_t>& prompt, int n,
                                  const std::string& adapter) {
  std::vector<int32_t> out = {e.prefill(prompt, SamplingParams{}, adapter)};
  while (int(out.size()) < n) out.push_back(e.generate());
  return out;
}

}  // namespace

TEST_CASE("run-time adapters: added while the engine runs, per slot, unloaded") {
  const fs::path art = tiny_untied().dir / "lora.kiln";
  fs::remove_all(art);
  fs::copy(tiny_untied().artifact, art, fs::copy_options::recursive);
  EngineOptions o = options(true);
  o.slots = 3;
  auto engine = Engine::open(art.string(), o);
  CHECK_THROWS_WITH_AS(engine->load_adapter("a"), doctest::Contains("no adapter named 'a'"), Error);

  // Added after the engine opened: load_adapter re-reads the manifest.
  add_adapter({art.string(), write_tiny_adapter(tiny_untied().dir / "adapter-a", 0.3f).string(),
               "a", 1.0, false});
  add_adapter({art.string(), write_tiny_adapter(tiny_untied().dir / "adapter-z", 0.0f).string(),
               "zero", 1.0, false});
  engine->load_adapter("a");
  engine->load_adapter("zero");
  CHECK(engine->loaded_adapters() == std::vector<std::string>{"a", "zero"});

  const std::vector<int32_t> p1 = {5, 9, 200, 31, 7}, p2 = {100, 3, 3, 64};
  const int64_t V = engine->config().vocab_size;
  std::vector<float> base(p1.size() * size_t(V)), with_a(base.size()), with_zero(base.size());
  engine->prefill_logits(p1, base.data());
  engine->prefill_logits(p1, with_a.data(), "a");
  engine->prefill_logits(p1, with_zero.data(), "zero");
  CHECK(with_zero == base);  // B = 0: bit-identical
  double moved = 0;
  for (size_t i = 0; i < base.size(); ++i)
    moved = std::max(moved, double(std::fabs(with_a[i] - base[i])));
  CHECK(moved > 0.05);

  // Slots with different adapters in one step give each request's solo tokens.
  const int n = 10;
  const auto solo_a = greedy_alone(*engine, p1, n, "a");
  const auto solo_base = greedy_alone(*engine, p2, n, "");
  std::vector<int32_t> got_a = {engine->insert(0, p1, {}, "a")};
  std::vector<int32_t> got_base = {engine->insert(2, p2, {}, "")};
  std::vector<int32_t> step(3);
  engine->generate_slots(step);  // warm-up step: the batch vectors reach their size here
  got_a.push_back(step[0]);
  got_base.push_back(step[2]);
  CHECK(step[1] == -1);
  uint64_t allocs = 0;
  while (int(got_a.size()) < n) {
    kiln::test::start_counting_allocations();
    engine->generate_slots(step);
    allocs += kiln::test::stop_counting_allocations();  // not counting our own push_backs
    got_a.push_back(step[0]);
    got_base.push_back(step[2]);
  }
  CHECK(allocs == 0);
  CHECK(got_a == solo_a);
  CHECK(got_base == solo_base);

  // The single-sequence path with an adapter allocates nothing per token either.
  engine->prefill(p2, SamplingParams{}, "a");
  engine->generate();
  kiln::test::start_counting_allocations();
  for (int i = 0; i < 8; ++i) engine->generate();
  CHECK(kiln::test::stop_counting_allocations() == 0);

  CHECK_THROWS_WITH_AS(engine->unload_adapter("a"), doctest::Contains("in use by slot 0"), Error);
  engine->release(0);
  engine->release(2);
  engine->unload_adapter("a");
  CHECK(engine->loaded_adapters() == std::vector<std::string>{"zero"});
  CHECK_THROWS_WITH_AS(engine->prefill(p1, {}, "a"), doctest::Contains("not loaded"), Error);
  CHECK_THROWS_AS(engine->unload_adapter("a"), Error);
  // Loading again after unloading gives the same logits as before.
  engine->load_adapter("a");
  std::vector<float> again(base.size());
  engine->prefill_logits(p1, again.data(), "a");
  CHECK(again == with_a);
}
