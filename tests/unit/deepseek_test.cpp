// DeepSeek-family pieces: MoE routing and expert grouping (docs/maxtext.md §2.7), and the DeepSeek
// forward pass end to end on a tiny exported model: decoding through the latent KV cache gives the
// logits of a full prefill, the per-token path allocates nothing, and the cache holds Rkv + Dr
// values per token and layer. YaRN and MLA's strided products: rope_test.cpp,
// matmul_strided_test.cpp.
//
// Built as its own executable (it needs the exporter and the engine, and interposes malloc):
//   deepseek_tests = executable('deepseek_tests', 'tests/unit/deepseek_test.cpp',
//     link_with : test_main, dependencies : [export_dep, engine_dep, doctest_dep, json_dep])
//   test('deepseek', deepseek_tests)
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/error.h"
#include "engine/engine.h"
#include "engine/ops/elementwise.h"
#include "engine/ops/matmul_strided.h"
#include "engine/ops/moe.h"
#include "engine/ops/rope.h"
#include "export/exporter.h"
#include "export/safetensors.h"
#include "tests/unit/alloc_counter.h"
#include "tests/unit/tiny_model.h"

namespace fs = std::filesystem;
using namespace kiln;
using namespace kiln::ops;

namespace {

std::vector<float> random_bf16(std::mt19937& rng, size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = round_to_bf16(dist(rng));
  return v;
}

std::vector<uint16_t> bits_of(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = f32_to_bf16(v[i]);
  return out;
}

YarnParams deepseek_v3_yarn() {
  return YarnParams{10000.0, 40.0, 4096.0, 32.0, 1.0, true, true};
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Routing

namespace {

RoutingParams routing(int64_t X, int64_t k, ScoreFunc f, bool pre_bias, double rsf = 1.0) {
  RoutingParams p;
  p.num_experts = X;
  p.top_k = k;
  p.score_func = f;
  p.weights_pre_bias = pre_bias;
  p.routed_scaling_factor = rsf;
  return p;
}

double sigmoid_bf16(double l) {
  return round_to_bf16(float(1.0 / (1.0 + std::exp(-l))));
}

}  // namespace

TEST_CASE("routing, sigmoid + bias: select with the bias, weight pre- or post-bias, renormalise") {
  const std::vector<float> logits = {0.0f, 1.0f, -1.0f, 2.0f, 0.5f};
  // The bias lifts expert 2 (lowest score) into the top 2 and sinks expert 3 (highest).
  const std::vector<uint16_t> bias = bits_of({0.0f, 0.0f, 1.0f, -1.0f, 0.0f});
  const double rsf = round_to_bf16(2.827f);  // Kimi's factor, taken as a bf16 constant
  for (bool pre : {true, false}) {
    CAPTURE(pre);
    Router router(routing(5, 2, ScoreFunc::Sigmoid, pre, 2.827));
    int32_t e[2];
    float w[2];
    router.route(logits.data(), bias.data(), 1, e, w);
    const double s2 = sigmoid_bf16(-1.0), s1 = sigmoid_bf16(1.0);
    const double b2 = round_to_bf16(float(s2 + 1.0));  // biased score of expert 2
    CHECK(e[0] == 2);                                  // 1.27 > 0.73
    CHECK(e[1] == 1);
    const double w0 = pre ? s2 : b2, w1 = s1;
    const double sum = round_to_bf16(float(w0 + w1)) + double(round_to_bf16(1e-20f));
    CHECK(w[0] == round_to_bf16(float(w0 / sum * rsf)));
    CHECK(w[1] == round_to_bf16(float(w1 / sum * rsf)));
    CHECK(double(w[0]) + w[1] == doctest::Approx(rsf).epsilon(0.01));  // renormalised × rsf
  }
  // Without a bias the top scores win.
  Router plain(routing(5, 2, ScoreFunc::Sigmoid, true));
  int32_t e[2];
  float w[2];
  plain.route(logits.data(), nullptr, 1, e, w);
  CHECK(e[0] == 3);
  CHECK(e[1] == 1);
}

TEST_CASE("routing, softmax: probabilities × rsf, no renormalisation") {
  const float ln2 = round_to_bf16(float(std::log(2.0)));
  const std::vector<float> logits = {0.0f, ln2, -4.0f, 0.0f};
  Router router(routing(4, 2, ScoreFunc::Softmax, false, 1.5));
  int32_t e[2];
  float w[2];
  router.route(logits.data(), nullptr, 1, e, w);
  CHECK(e[0] == 1);
  CHECK(e[1] == 0);  // tie with expert 3: the lower index wins
  // e_i = bf16(exp(l_i − max)), s = bf16(Σe), p = bf16(e/s), w = bf16(p · 1.5).
  double ex[4], s = 0;
  for (int i = 0; i < 4; ++i)
    s += ex[i] = round_to_bf16(float(std::exp(double(logits[size_t(i)] - ln2))));
  s = round_to_bf16(float(s));
  CHECK(w[0] == round_to_bf16(float(double(round_to_bf16(float(ex[1] / s))) * 1.5)));
  CHECK(w[1] == round_to_bf16(float(double(round_to_bf16(float(ex[0] / s))) * 1.5)));
  CHECK(w[0] + w[1] < 1.5f * 0.99f);  // the top 2 of 4 do not carry all the mass
}

TEST_CASE("routing, no score function: raw logits; ties go to the lower expert") {
  const std::vector<float> logits = {1.0f, 3.0f, 3.0f, 3.0f, -2.0f, 1.0f};
  Router router(routing(6, 3, ScoreFunc::None, false, 2.0));
  std::vector<int32_t> e(6);
  std::vector<float> w(6);
  router.route(logits.data(), nullptr, 1, e.data(), w.data());
  CHECK(e[0] == 1);
  CHECK(e[1] == 2);
  CHECK(e[2] == 3);
  CHECK(w[0] == 6.0f);
  // Two tokens in one call are independent.
  const std::vector<float> two = {1.0f, 3.0f,  3.0f, 3.0f, -2.0f, 1.0f,
                                  9.0f, -1.0f, 0.0f, 0.0f, 8.0f,  7.0f};
  router.route(two.data(), nullptr, 2, e.data(), w.data());
  CHECK(std::vector<int32_t>(e.begin() + 3, e.end()) == std::vector<int32_t>{0, 4, 5});
  // A NaN score is never chosen over a number.
  const std::vector<float> nan = {
      std::numeric_limits<float>::quiet_NaN(), -5.0f, -6.0f, -7.0f, -8.0f, -9.0f};
  router.route(nan.data(), nullptr, 1, e.data(), w.data());
  CHECK(e[0] == 1);
  CHECK(e[1] == 2);
  CHECK(e[2] == 3);
}

TEST_CASE("group-limited routing keeps the groups with the best top-2 sums") {
  // 4 groups of 2. Group sums of the top 2: g0 = 5 − 10 = −5, g1 = 8, g2 = 4.5 − 10 = −5.5,
  // g3 = 0. Kept: g1, g3 → experts 2, 3 (not 0 and 4, the two best experts overall).
  const std::vector<float> logits = {5.0f, -10.0f, 4.0f, 4.0f, 4.5f, -10.0f, 0.0f, 0.0f};
  RoutingParams p = routing(8, 2, ScoreFunc::None, true);
  p.n_groups = 4;
  p.topk_groups = 2;
  Router router(p);
  int32_t e[2];
  float w[2];
  router.route(logits.data(), nullptr, 1, e, w);
  CHECK(e[0] == 2);
  CHECK(e[1] == 3);
  // Groups score the biased values, weights come from the unbiased ones.
  const std::vector<uint16_t> bias = bits_of({0, 0, 0, 0, 0, 20, 0, 0});  // g2 = 4.5 + 10
  router.route(logits.data(), bias.data(), 1, e, w);
  CHECK(e[0] == 5);  // biased 10
  CHECK(e[1] == 4);
  CHECK(w[0] == -10.0f);  // pre-bias score
  // Without groups: plain top-2.
  Router flat(routing(8, 2, ScoreFunc::None, true));
  flat.route(logits.data(), nullptr, 1, e, w);
  CHECK(e[0] == 0);
  CHECK(e[1] == 4);
}

TEST_CASE("routing parameters from a config: groups only with DeepSeek-V3 routing") {
  ModelConfig c;
  c.decoder_block = "deepseek";
  c.num_experts = 16;
  c.num_experts_per_tok = 3;
  c.routed_score_func = "sigmoid";
  c.routed_scaling_factor = 2.5;
  c.n_routing_groups = 4;
  c.topk_routing_group = 2;
  c.routing_weights_pre_bias = true;  // deepseek3* name
  RoutingParams p = RoutingParams::from_config(c);
  CHECK(p.n_groups == 4);
  CHECK(p.topk_groups == 2);
  CHECK(p.score_func == ScoreFunc::Sigmoid);
  CHECK(p.weights_pre_bias);
  c.routing_weights_pre_bias = false;  // e.g. kimi-k2: MaxText ignores the group fields
  p = RoutingParams::from_config(c);
  CHECK(p.n_groups == -1);
  c.routed_score_func = "softmax";
  CHECK(RoutingParams::from_config(c).score_func == ScoreFunc::Softmax);
  c.routed_score_func = "";
  CHECK(RoutingParams::from_config(c).score_func == ScoreFunc::None);
  c.routed_score_func = "sqrtsoftplus";
  CHECK_THROWS_AS(RoutingParams::from_config(c), Error);
}

TEST_CASE("routing validates its parameters") {
  CHECK_THROWS_AS(Router(routing(4, 0, ScoreFunc::None, false)), Error);
  CHECK_THROWS_AS(Router(routing(4, 5, ScoreFunc::None, false)), Error);
  CHECK_THROWS_AS(Router(routing(0, 1, ScoreFunc::None, false)), Error);
  RoutingParams p = routing(8, 2, ScoreFunc::None, true);
  p.n_groups = 3;  // does not divide 8
  p.topk_groups = 1;
  CHECK_THROWS_AS(Router{p}, Error);
  p.n_groups = 8;  // groups of one expert
  CHECK_THROWS_AS(Router{p}, Error);
  p.n_groups = 4;
  p.topk_groups = 5;
  CHECK_THROWS_AS(Router{p}, Error);
  p = routing(8, 5, ScoreFunc::None, true);
  p.n_groups = 4;
  p.topk_groups = 2;  // 4 experts kept, 5 wanted
  CHECK_THROWS_AS(Router{p}, Error);
}

TEST_CASE("ExpertBatches groups (token, slot) pairs by expert, in token order") {
  ExpertBatches b(4, 2, 8);
  const std::vector<int32_t> experts = {2, 0, 0, 1, 2, 1};  // 3 tokens × 2 slots
  b.build(experts.data(), 3);
  CHECK(std::vector<int32_t>(b.active().begin(), b.active().end()) ==
        std::vector<int32_t>{0, 1, 2});
  auto v = [](std::span<const int32_t> s) { return std::vector<int32_t>(s.begin(), s.end()); };
  CHECK(v(b.pairs(0)) == std::vector<int32_t>{1, 2});
  CHECK(v(b.pairs(1)) == std::vector<int32_t>{3, 5});
  CHECK(v(b.pairs(2)) == std::vector<int32_t>{0, 4});
  CHECK(b.pairs(3).empty());
  // Rebuilding for a smaller batch forgets the previous one.
  const std::vector<int32_t> one = {3, 1};
  b.build(one.data(), 1);
  CHECK(v(b.active()) == std::vector<int32_t>{1, 3});
  CHECK(v(b.pairs(3)) == std::vector<int32_t>{0});
  CHECK(b.pairs(0).empty());
  const std::vector<int32_t> bad = {0, 4};
  CHECK_THROWS_AS(b.build(bad.data(), 1), Error);
  std::vector<int32_t> many(20, 0);
  CHECK_THROWS_AS(b.build(many.data(), 9), Error);
}

TEST_CASE("routing, grouping and the MLA kernels do not allocate") {
  RoutingParams p = routing(16, 3, ScoreFunc::Sigmoid, true, 2.5);
  p.n_groups = 4;
  p.topk_groups = 2;
  Router router(p);
  ExpertBatches batches(16, 3, 4);
  std::mt19937 rng(2);
  const auto logits = random_bf16(rng, 64, -3.0f, 3.0f);
  const auto bias = bits_of(random_bf16(rng, 16, -0.1f, 0.1f));
  std::vector<int32_t> e(12);
  std::vector<float> w(12);
  const auto wkv = bits_of(random_bf16(rng, 64 * 64, -1.0f, 1.0f));
  const auto x = random_bf16(rng, 4 * 64, -1.0f, 1.0f);
  std::vector<float> y(4 * 64);
  const Rope rope(deepseek_v3_yarn(), 64, 100);
  std::vector<float> q = random_bf16(rng, 4 * 80, -1.0f, 1.0f);
  const auto run = [&] {
    router.route(logits.data(), bias.data(), 4, e.data(), w.data());
    batches.build(e.data(), 4);
    matmul_xwt(x.data(), 64, 4, wkv.data(), 64, 64, 64, y.data(), 64);
    matmul_xw(x.data(), 64, 4, wkv.data(), 64, 64, 64, y.data(), 64);
    add_weighted_bf16(y.data(), x.data(), 0.5f, 256);
    rope.apply(q.data(), 4, 99, 80);
  };
  run();
  kiln::test::start_counting_allocations();
  run();
  CHECK(kiln::test::stop_counting_allocations() == 0);
}

// ------------------------------------------------------------------------------------------------
// The DeepSeek forward pass on a tiny exported model

namespace {

struct TinyDeepSeek {
  fs::path dir;
  fs::path artifact;
  int64_t L = 3, Rkv = 16, Dr = 8, H = 8, Dn = 16,
          Dv = 16;  // H >= 8: decode runs heads in parallel
};

// Unrolled MaxText Linen keys (docs/maxtext.md §1.7): one dense layer, two MoE layers with a router
// bias and a shared expert, q_lora_rank > 0, DeepSeek-V3 routing.
TinyDeepSeek make_tiny_deepseek() {
  TinyDeepSeek m;
  m.dir = fs::temp_directory_path() / "kiln_deepseek_test";
  fs::remove_all(m.dir);
  fs::create_directories(m.dir);
  m.artifact = m.dir / "model.kiln";
  const int64_t E = 64, H = m.H, Rq = 24, Rkv = m.Rkv, Dn = m.Dn, Dr = m.Dr, Dv = m.Dv, F = 96,
                Fm = 32, X = 8, S = 1, V = 256;

  const std::string p = "params.params.";
  std::vector<test::SeededTensorSpec> ts = {{p + "token_embedder.embedding", {V, E}, 1.0f},
                                            {p + "decoder.decoder_norm.scale", {E}, 0},
                                            {p + "decoder.logits_dense.kernel", {E, V}, 0.3f}};
  for (int64_t l = 0; l < m.L; ++l) {
    const bool dense = l == 0;
    const std::string b =
        p + "decoder." + (dense ? "dense_layers_0." : "moe_layers_" + std::to_string(l - 1) + ".");
    const std::string a = b + "self_attention.";
    ts.push_back({b + "pre_self_attention_layer_norm.scale", {E}, 0});
    ts.push_back({b + "post_self_attention_layer_norm.scale", {E}, 0});
    ts.push_back({a + "wq_a.kernel", {E, Rq}, 0.25f});
    ts.push_back({a + "q_norm.scale", {Rq}, 0});
    ts.push_back({a + "wq_b.kernel", {Rq, H, Dn + Dr}, 0.6f});
    ts.push_back({a + "wkv_a.kernel", {E, Rkv + Dr}, 0.25f});
    ts.push_back({a + "kv_norm.scale", {Rkv}, 0});
    ts.push_back({a + "wkv_b.kernel", {Rkv, H, Dn + Dv}, 0.6f});
    ts.push_back({a + "out.kernel", {H, Dv, E}, 0.15f});
    if (dense) {
      ts.push_back({b + "mlp.wi_0.kernel", {E, F}, 0.2f});
      ts.push_back({b + "mlp.wi_1.kernel", {E, F}, 0.2f});
      ts.push_back({b + "mlp.wo.kernel", {F, E}, 0.2f});
    } else {
      const std::string r = b + "DeepSeekMoeBlock_0.MoeBlock_0.";
      const std::string s = b + "DeepSeekMoeBlock_0.shared_experts.";
      ts.push_back({r + "gate.kernel", {E, X}, 0.4f});
      ts.push_back({r + "gate.bias", {X}, 0.1f});
      ts.push_back({r + "wi_0", {X, E, Fm}, 0.2f});
      ts.push_back({r + "wi_1", {X, E, Fm}, 0.2f});
      ts.push_back({r + "wo", {X, Fm, E}, 0.25f});
      ts.push_back({s + "wi_0.kernel", {E, S * Fm}, 0.2f});
      ts.push_back({s + "wi_1.kernel", {E, S * Fm}, 0.2f});
      ts.push_back({s + "wo.kernel", {S * Fm, E}, 0.25f});
    }
  }
  write_safetensors_f32((m.dir / "model.safetensors").string(),
                        test::seeded_tensors(ts, 424242, 0.1f));

  const nlohmann::json cfg = {{"decoder_block", "deepseek"},
                              {"model_name", "deepseek3-test"},
                              {"attention_type", "mla"},
                              {"emb_dim", E},
                              {"num_query_heads", H},
                              {"num_kv_heads", H},
                              {"num_decoder_layers", m.L},
                              {"first_num_dense_layers", 1},
                              {"mlp_dim", F},
                              {"moe_mlp_dim", Fm},
                              {"num_experts", X},
                              {"num_experts_per_tok", 2},
                              {"shared_experts", S},
                              {"routed_scaling_factor", 2.5},
                              {"routed_score_func", "sigmoid"},
                              {"routed_bias", true},
                              {"q_lora_rank", Rq},
                              {"kv_lora_rank", Rkv},
                              {"qk_nope_head_dim", Dn},
                              {"qk_rope_head_dim", Dr},
                              {"v_head_dim", Dv},
                              {"rope_type", "yarn"},
                              {"original_max_position_embeddings", 64},
                              {"max_position_embeddings", 4096},
                              {"vocab_size", V},
                              {"scan_layers", false},
                              {"max_target_length", 96}};
  std::ofstream(m.dir / "config.json") << cfg.dump();

  test::export_fixture(m.dir, m.artifact);
  return m;
}

const TinyDeepSeek& tiny() {
  static TinyDeepSeek m = make_tiny_deepseek();
  return m;
}

EngineOptions options(bool relayout, int64_t max_chunk = 512) {
  EngineOptions o;
  o.model.threads = 2;
  o.model.relayout = relayout;
  o.model.max_chunk = max_chunk;
  return o;
}

double max_abs(const float* a, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, double(std::fabs(a[i])));
  return m;
}

}  // namespace

TEST_CASE("DeepSeek: the cache holds the latent and the rope key only") {
  auto engine = Engine::open(tiny().artifact.string(), options(true));
  const TinyDeepSeek& m = tiny();
  Model& model = engine->model();
  CHECK(model.kv_bytes_per_token() == m.L * (m.Rkv + m.Dr) * 2);
  const KvCache cache = model.new_cache(10);
  REQUIRE(cache.k.size() == size_t(m.L));
  CHECK(cache.k[0].size() == size_t(10 * (m.Rkv + m.Dr)));
  CHECK(cache.v.empty());
  // The expanded cache MaxText's naive decode keeps: H · (Dn + Dr) keys + H · Dv values.
  const int64_t expanded = m.L * m.H * (m.Dn + m.Dr + m.Dv) * 2;
  MESSAGE("KV bytes per token: latent " << model.kv_bytes_per_token() << ", expanded " << expanded);
  CHECK(model.kv_bytes_per_token() < expanded);
}

TEST_CASE("DeepSeek: decoding through the latent cache gives the logits of a full prefill") {
  for (bool relayout : {true, false}) {
    CAPTURE(relayout);
    auto engine = Engine::open(tiny().artifact.string(), options(relayout));
    const int64_t V = engine->config().vocab_size;
    std::vector<int32_t> seq = {7, 1, 200, 33, 5, 99, 14};
    std::vector<std::vector<float>> steps;
    // Token by token through the model's cache, keeping every step's logits.
    Model& model = engine->model();
    KvCache cache = model.new_cache(engine->max_seq_len());
    std::vector<float> logits(static_cast<size_t>(V));
    model.forward(seq, cache, logits.data(), /*all_logits=*/false);
    int32_t tok = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
    std::vector<int32_t> decoded = {tok};
    for (int i = 0; i < 20; ++i) {
      seq.push_back(tok);
      model.forward(std::span<const int32_t>(&tok, 1), cache, logits.data(), false);
      tok = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
      decoded.push_back(tok);
      steps.push_back(logits);
    }
    std::vector<float> all(seq.size() * size_t(V));
    engine->prefill_logits(seq, all.data());
    double max_diff = 0;
    const double scale = max_abs(all.data(), all.size());
    for (size_t i = 0; i < steps.size(); ++i) {
      const float* row = all.data() + (seq.size() - steps.size() + i) * size_t(V);
      for (int64_t v = 0; v < V; ++v)
        max_diff = std::max(max_diff, double(std::fabs(row[v] - steps[i][size_t(v)])));
      // The prefill's greedy choice at that position is the token decode produced next.
      CHECK(std::max_element(row, row + V) - row == decoded[i + 1]);
    }
    MESSAGE("decode vs prefill (relayout " << relayout << "): max |dlogit| = " << max_diff
                                           << " of max |logit| " << scale);
    CHECK(max_diff <= 0.02 * scale);
  }
}

TEST_CASE("DeepSeek: a prefill split into chunks gives the logits of one pass") {
  const std::vector<int32_t> seq = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4};
  auto one = Engine::open(tiny().artifact.string(), options(true));
  auto chunked = Engine::open(tiny().artifact.string(), options(true, 3));
  const int64_t V = one->config().vocab_size;
  std::vector<float> a(seq.size() * size_t(V)), b(a.size());
  one->prefill_logits(seq, a.data());
  chunked->prefill_logits(seq, b.data());
  double max_diff = 0;
  for (size_t i = 0; i < a.size(); ++i)
    max_diff = std::max(max_diff, double(std::fabs(a[i] - b[i])));
  MESSAGE("chunks of 3 vs one pass: max |dlogit| = " << max_diff);
  CHECK(max_diff <= 0.02 * max_abs(a.data(), a.size()));
}

TEST_CASE("DeepSeek: generate() performs no heap allocation") {
  for (bool relayout : {true, false}) {
    CAPTURE(relayout);
    auto engine = Engine::open(tiny().artifact.string(), options(relayout));
    std::vector<int32_t> prompt = {3, 14, 15, 92, 65, 35};
    SamplingParams sp;
    sp.algorithm = SamplingAlgorithm::TopK;
    sp.temperature = 0.8f;
    sp.top_k = 40;
    sp.seed = 7;
    engine->insert(engine->prefill(prompt, sp), 0);
    engine->generate();
    kiln::test::start_counting_allocations();
    for (int i = 0; i < 32; ++i) engine->generate();
    CHECK(kiln::test::stop_counting_allocations() == 0);
  }
}

TEST_CASE("DeepSeek: bad requests are errors") {
  auto engine = Engine::open(tiny().artifact.string(), options(false));
  std::vector<int32_t> bad = {1, 256};
  CHECK_THROWS_WITH_AS(engine->prefill(bad, {}), doctest::Contains("outside the vocabulary"),
                       Error);
  std::vector<int32_t> too_long(97, 1);
  CHECK_THROWS_AS(engine->prefill(too_long, {}), Error);
  // A cache in another family's layout is refused, not misread.
  KvCache wrong;
  wrong.capacity = 4;
  wrong.k.assign(3, kiln::ZeroedVector<uint16_t>(4));
  float logits[256];
  const int32_t tok = 1;
  CHECK_THROWS_WITH_AS(
      engine->model().forward(std::span<const int32_t>(&tok, 1), wrong, logits, false),
      doctest::Contains("new_cache"), Error);
}
