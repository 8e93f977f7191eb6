// Engine-level tests on a tiny exported model: the per-token path allocates nothing (which also
// rules out oneDNN primitive creation, which allocates), decoding through the KV cache gives the
// logits a full prefill gives, bad requests are errors, run-time adapters load into a running
// engine, mix per slot and unload, damaged weights are refused at open (or load) unless
// verification is off, and a NaN logit is an error naming its slot and position.
#include "engine/engine.h"

#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <tuple>

#include "common/bf16.h"
#include "common/error.h"
#include "common/mapped_file.h"
#include "export/adapter.h"
#include "export/exporter.h"
#include "export/safetensors.h"
#include "tests/unit/alloc_counter.h"
#include "tests/unit/tiny_model.h"

namespace fs = std::filesystem;
using namespace kiln;
using kiln::test::make_tiny_model;
using kiln::test::tiny_untied;
using kiln::test::TinyModel;

namespace {

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

SamplingParams composite(uint64_t seed) {
  SamplingParams sp;
  sp.algorithm = SamplingAlgorithm::Composite;
  sp.temperature = 0.8f;
  sp.top_k = 40;
  sp.top_p = 0.9f;
  sp.seed = seed;
  return sp;
}

int32_t argmax(const std::vector<float>& v) {
  return int32_t(std::max_element(v.begin(), v.end()) - v.begin());
}

TEST_CASE("generate() performs no heap allocation (and so creates no oneDNN primitive)") {
  for (bool relayout : {true, false}) {
    CAPTURE(relayout);
    EngineOptions o = options(relayout);
    o.slots = 2;
    auto engine = Engine::open(tiny_untied().artifact.string(), o);
    engine->insert(engine->prefill(std::vector<int32_t>{3, 14, 15, 92, 65, 35}, composite(7)), 0);
    engine->insert(engine->prefill(std::vector<int32_t>{1, 2}, SamplingParams{}), 1);
    engine->generate();  // first step: lazily initialised state, if any, is not per-token
    kiln::test::start_counting_allocations();
    // Enough steps for the thread governor to probe one thread and come back (its first probe
    // starts after 24 steps): changing the team size allocates nothing either.
    for (int i = 0; i < 80; ++i) engine->generate();
    CHECK(kiln::test::stop_counting_allocations() == 0);
  }
}

TEST_CASE("decoding through the KV cache gives the logits of a full prefill") {
  auto engine = Engine::open(tiny_untied().artifact.string(), options(true));
  const int64_t V = engine->config().vocab_size;
  std::vector<int32_t> seq = {7, 1, 200, 33, 5};
  Model& model = engine->model();
  KvCache cache = model.new_cache(engine->max_seq_len());
  std::vector<float> last(static_cast<size_t>(V));
  model.forward(seq, cache, last.data(), /*all_logits=*/false);
  for (int i = 0; i < 12; ++i) {
    const int32_t tok = argmax(last);
    seq.push_back(tok);
    model.forward(std::span<const int32_t>(&tok, 1), cache, last.data(), false);
  }
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

TEST_CASE("the engine's log-probabilities are the log-softmax of the raw logits") {
  auto engine = Engine::open(tiny_untied().artifact.string(), options(true));
  const int64_t V = engine->config().vocab_size;
  const std::vector<int32_t> prompt = {9, 8, 7, 6};
  SamplingParams sp = composite(3);
  sp.max_new_tokens = 6;
  std::vector<int32_t> seq = prompt;
  std::vector<float> logps;
  SlotToken t = engine->insert(engine->prefill(prompt, sp), 0);
  for (;;) {
    seq.push_back(t.token);
    logps.push_back(t.logp);
    if (t.finish != FinishReason::None) break;
    t = engine->generate()[0];
  }
  CHECK(t.finish == FinishReason::Length);
  CHECK(logps.size() == 6);
  std::vector<float> all(seq.size() * size_t(V));
  engine->prefill_logits(std::span<const int32_t>(seq).first(seq.size() - 1), all.data());
  for (size_t i = 0; i < logps.size(); ++i) {
    const float* row = all.data() + (prompt.size() - 1 + i) * size_t(V);
    CHECK(logps[i] ==
          doctest::Approx(Sampler::log_prob(row, V, seq[prompt.size() + i])).epsilon(0.02));
    CHECK(logps[i] <= 0.0f);
  }
}

// Runs every request through `slots` decode slots with continuous batching (a request enters as
// soon as a slot is free; with `packed` the entering requests are prefilled by prefill_concat)
// and returns each request's tokens and log-probs.
struct Produced {
  std::vector<int32_t> tokens;
  std::vector<float> logps;
};
std::vector<Produced> serve(const std::string& artifact,
                            const std::vector<std::vector<int32_t>>& prompts,
                            const std::vector<SamplingParams>& sampling, int64_t slots,
                            bool packed) {
  EngineOptions o = options(true);
  o.slots = slots;
  auto engine = Engine::open(artifact, o);
  std::vector<Produced> out(prompts.size());
  std::vector<int64_t> owner(static_cast<size_t>(slots), -1);
  size_t next = 0, done = 0;
  auto take = [&](const SlotToken& t) {
    Produced& p = out[size_t(owner[size_t(t.slot)])];
    p.tokens.push_back(t.token);
    p.logps.push_back(t.logp);
    if (t.finish != FinishReason::None) {
      engine->release(t.slot);
      owner[size_t(t.slot)] = -1;
      ++done;
    }
  };
  while (done < prompts.size()) {
    std::vector<int64_t> free_slots;
    for (int64_t s = 0; s < slots; ++s)
      if (owner[size_t(s)] < 0) free_slots.push_back(s);
    const size_t n = std::min(free_slots.size(), prompts.size() - next);
    std::vector<Prefix> prefixes;
    if (packed) {
      std::vector<PrefillRequest> reqs;
      for (size_t i = 0; i < n; ++i) reqs.push_back({prompts[next + i], sampling[next + i], ""});
      prefixes = engine->prefill_concat(reqs);
    } else {
      for (size_t i = 0; i < n; ++i)
        prefixes.push_back(engine->prefill(prompts[next + i], sampling[next + i]));
    }
    for (size_t i = 0; i < n; ++i) {
      owner[size_t(free_slots[i])] = int64_t(next++);
      take(engine->insert(std::move(prefixes[i]), free_slots[i]));
    }
    for (const SlotToken& t : engine->generate()) take(t);
  }
  return out;
}

TEST_CASE("a request's tokens and log-probs do not depend on its batch") {
  const std::vector<std::vector<int32_t>> prompts = {{5, 9, 200, 31, 7},
                                                     {100, 3, 3, 64},
                                                     {1},
                                                     {17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27},
                                                     {250, 4, 8},
                                                     {60, 61, 62, 63, 64, 65, 66},
                                                     {2, 2}};
  std::vector<SamplingParams> sampling(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    sampling[i] = i % 2 ? composite(100 + i) : SamplingParams{};
    sampling[i].max_new_tokens = int64_t(4 + 3 * i);  // finish at different steps
  }
  const std::string art = tiny_untied().artifact.string();
  const auto alone = serve(art, prompts, sampling, 1, false);
  for (auto [slots, packed] : {std::pair<int64_t, bool>{4, false}, {4, true}, {3, true}}) {
    CAPTURE(slots);
    CAPTURE(packed);
    const auto batched = serve(art, prompts, sampling, slots, packed);
    for (size_t i = 0; i < prompts.size(); ++i) {
      CAPTURE(i);
      CHECK(batched[i].tokens == alone[i].tokens);
      REQUIRE(batched[i].logps.size() == alone[i].logps.size());
      for (size_t k = 0; k < alone[i].logps.size(); ++k)
        CHECK(std::fabs(batched[i].logps[k] - alone[i].logps[k]) <= 1e-4);
    }
  }
}

TEST_CASE("stop tokens and max_new_tokens end a request; the slot waits for release") {
  auto engine = Engine::open(tiny_untied().artifact.string(), options(true));
  const std::vector<int32_t> prompt = {11, 12, 13};
  std::vector<int32_t> greedy;
  SamplingParams sp;
  sp.max_new_tokens = 5;
  SlotToken t = engine->insert(engine->prefill(prompt, sp), 0);
  greedy.push_back(t.token);
  while (t.finish == FinishReason::None) greedy.push_back((t = engine->generate()[0]).token);
  CHECK(t.finish == FinishReason::Length);
  CHECK(greedy.size() == 5);
  CHECK(engine->slot_busy(0));
  CHECK(engine->slot_finished(0));
  CHECK(engine->generate().empty());  // a finished slot is not advanced
  engine->release(0);

  sp.max_new_tokens = 0;
  sp.stop_tokens = {greedy[2]};
  std::vector<int32_t> stopped;
  t = engine->insert(engine->prefill(prompt, sp), 0);
  stopped.push_back(t.token);
  while (t.finish == FinishReason::None) stopped.push_back((t = engine->generate()[0]).token);
  CHECK(t.finish == FinishReason::Stop);
  // Ends at the first occurrence of the stop token, which it includes.
  const auto first = std::find(greedy.begin(), greedy.end(), greedy[2]);
  CHECK(stopped == std::vector<int32_t>(greedy.begin(), first + 1));
}

TEST_CASE(
    "prefill_multisampling: seeded, sample 0 is the plain prefill, draws follow the "
    "distribution") {
  static TinyModel small = make_tiny_model("vocab8", false, 8);
  EngineOptions o = options(true);
  o.slots = 4;
  auto engine = Engine::open(small.artifact.string(), o);
  const std::vector<int32_t> prompt = {1, 5, 2, 7};
  // weighted at T = 1.5 over all 8 ids, and topk (k = 4) at T = 0.7: the draws' chi-square
  // against softmax(kept logits / T)
  for (const auto& [algorithm, k, T] :
       {std::tuple{SamplingAlgorithm::Weighted, 8, 1.5f}, {SamplingAlgorithm::TopK, 4, 0.7f}}) {
    const std::string name = sampling_algorithm_name(algorithm);
    CAPTURE(name);
    SamplingParams sp;
    sp.algorithm = algorithm;
    sp.top_k = k;
    sp.temperature = T;
    sp.seed = 1234;
    // A prefix holds at most one sample per slot: 1500 seeded prefixes of 4 samples each.
    const int64_t n = 6000, per = engine->slots();
    Prefix a = engine->prefill_multisampling(prompt, per, sp);
    Prefix b = engine->prefill_multisampling(prompt, per, sp);
    CHECK(a.tokens == b.tokens);
    CHECK(engine->prefill(prompt, sp).tokens[0] == a.tokens[0]);
    for (int64_t drawn = per; drawn < n; drawn += per) {
      sp.seed += 1;
      const Prefix more = engine->prefill_multisampling(prompt, per, sp);
      a.tokens.insert(a.tokens.end(), more.tokens.begin(), more.tokens.end());
    }
    std::vector<int32_t> ids(8);
    for (int v = 0; v < 8; ++v) ids[size_t(v)] = v;
    std::sort(ids.begin(), ids.end(),
              [&](int32_t x, int32_t y) { return a.logits[size_t(x)] > a.logits[size_t(y)]; });
    std::vector<double> p(8, 0.0);
    double z = 0;
    for (int j = 0; j < k; ++j)
      z += p[size_t(ids[size_t(j)])] = std::exp(double(a.logits[size_t(ids[size_t(j)])]) / T);
    std::vector<int64_t> count(8);
    for (int32_t t : a.tokens) ++count[size_t(t)];
    double chi2 = 0;
    for (int v = 0; v < 8; ++v) {
      if (p[size_t(v)] == 0) {
        CHECK(count[size_t(v)] == 0);  // outside the top k: never drawn
        continue;
      }
      const double e = double(n) * p[size_t(v)] / z;
      REQUIRE(e > 5);
      chi2 += (double(count[size_t(v)]) - e) * (double(count[size_t(v)]) - e) / e;
    }
    MESSAGE(name << " multisampling chi-square (" << k - 1 << " dof): " << chi2);
    CHECK(chi2 < 30.0);  // p < 1e-4 for a correct sampler; a broken one is far above
  }
  // bulk_insert: sample i into slot i; each slot continues its own stream.
  SamplingParams sp;
  sp.algorithm = SamplingAlgorithm::Weighted;
  sp.seed = 9;
  sp.max_new_tokens = 8;
  auto run = [&]() {
    std::vector<std::vector<int32_t>> seqs(4);
    const std::vector<int64_t> slots = {0, 1, 2, 3};
    for (const SlotToken& t :
         engine->bulk_insert(engine->prefill_multisampling(prompt, 4, sp), slots))
      seqs[size_t(t.slot)].push_back(t.token);
    for (int step = 1; step < 8; ++step)
      for (const SlotToken& t : engine->generate()) seqs[size_t(t.slot)].push_back(t.token);
    for (int64_t s : slots) engine->release(s);
    return seqs;
  };
  const auto first = run();
  CHECK(run() == first);
  CHECK(first[0].size() == 8);
  CHECK_THROWS_WITH_AS(engine->insert(engine->prefill_multisampling(prompt, 2, sp), 0),
                       doctest::Contains("bulk_insert"), Error);
}

TEST_CASE("bad requests are errors, not undefined behaviour") {
  EngineOptions o = options(false);
  o.slots = 2;
  auto engine = Engine::open(tiny_untied().artifact.string(), o);
  CHECK(engine->generate().empty());  // nothing inserted: nothing to do
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
  SamplingParams nucleus;
  nucleus.algorithm = SamplingAlgorithm::Nucleus;
  nucleus.top_p = -0.5f;
  CHECK_THROWS_WITH_AS(engine->prefill(std::vector<int32_t>{1}, nucleus),
                       doctest::Contains("top_p"), Error);
  SamplingParams stop;
  stop.stop_tokens = {300};
  CHECK_THROWS_AS(engine->prefill(std::vector<int32_t>{1}, stop), Error);

  engine->insert(engine->prefill(std::vector<int32_t>{1, 2}, {}), 0);
  CHECK_THROWS_WITH_AS(engine->insert(engine->prefill(std::vector<int32_t>{3}, {}), 0),
                       doctest::Contains("busy"), Error);
  CHECK_THROWS_WITH_AS(engine->insert(engine->prefill(std::vector<int32_t>{3}, {}), 2),
                       doctest::Contains("does not exist"), Error);
  CHECK_THROWS_WITH_AS(engine->release(1), doctest::Contains("not in use"), Error);
  CHECK_THROWS_AS(engine->release(-1), Error);
  engine->release(0);

  // A request that fills the context ends with finish reason "context".
  std::vector<int32_t> fits(95, 1);
  SlotToken t = engine->insert(engine->prefill(fits, {}), 1);
  CHECK(t.finish == FinishReason::None);
  t = engine->generate()[0];  // position 95 is the last one
  CHECK(t.finish == FinishReason::Context);
  CHECK(engine->generate().empty());
}

TEST_CASE("sizes from the caller are bounded before anything is read or started") {
  EngineOptions o = options(false);
  o.slots = 2;
  o.model.threads = kMaxThreads + 1;
  CHECK_THROWS_WITH_AS(Engine::open(tiny_untied().artifact.string(), o),
                       doctest::Contains("1025 worker threads requested; between 0 (every core) "
                                         "and 1024 are supported"),
                       Error);
  o.model.threads = 0;
  auto engine = Engine::open(tiny_untied().artifact.string(), o);
  // A length of 2^63 or more is no negative number: it is refused before any token is read (the
  // array holds 3).
  const int32_t three[3] = {1, 2, 3};
  const std::span<const int32_t> lying(three, size_t(1) << 63);
  CHECK_THROWS_WITH_AS(engine->prefill(lying, {}),
                       "prompt has 9223372036854775808 tokens, longer than the context of 96",
                       Error);
  CHECK_THROWS_WITH_AS(engine->check_request(lying, {}),
                       doctest::Contains("longer than the context"), Error);
  // Each sample of a multisampling prefix needs a slot of its own.
  CHECK(engine->prefill_multisampling(three, 2, {}).tokens.size() == 2);
  CHECK_THROWS_WITH_AS(engine->prefill_multisampling(three, int64_t(1e12), {}),
                       "prefill_multisampling: 1000000000000 samples requested; between 1 and 2 "
                       "(one slot each) are supported",
                       Error);
  CHECK_THROWS_AS(engine->prefill_multisampling(three, 0, {}), Error);
}

TEST_CASE("a tied model runs and opening a missing artifact is a clear error") {
  TinyModel tied = make_tiny_model("tied", true);
  auto engine = Engine::open(tied.artifact.string(), options(true));
  int32_t t = engine->prefill(std::vector<int32_t>{1, 2, 3}, {}).tokens[0];
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
  SamplingParams sp;
  sp.max_new_tokens = n;
  SlotToken t = e.insert(e.prefill(prompt, sp, adapter), 0);
  std::vector<int32_t> out = {t.token};
  while (t.finish == FinishReason::None) out.push_back((t = e.generate()[0]).token);
  e.release(0);
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
  SamplingParams sp;
  sp.max_new_tokens = n;
  std::vector<int32_t> got_a = {engine->insert(engine->prefill(p1, sp, "a"), 0).token};
  std::vector<int32_t> got_base = {engine->insert(engine->prefill(p2, sp, ""), 2).token};
  auto step = engine->generate();  // warm-up step
  REQUIRE(step.size() == 2);
  got_a.push_back(step[0].token);
  got_base.push_back(step[1].token);
  CHECK(step[0].slot == 0);
  CHECK(step[1].slot == 2);
  uint64_t allocs = 0;
  while (int(got_a.size()) < n) {
    kiln::test::start_counting_allocations();
    step = engine->generate();
    allocs += kiln::test::stop_counting_allocations();  // not counting our own push_backs
    got_a.push_back(step[0].token);
    got_base.push_back(step[1].token);
  }
  CHECK(allocs == 0);
  CHECK(got_a == solo_a);
  CHECK(got_base == solo_base);

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

namespace {

// A copy of the tiny model's artifact under `name`, for tests that damage it.
fs::path copy_of_tiny(const std::string& name) {
  const fs::path art = tiny_untied().dir / name;
  fs::remove_all(art);
  fs::copy(tiny_untied().artifact, art, fs::copy_options::recursive);
  return art;
}

// Where tensor `name` of a blob starts in the file.
uint64_t tensor_offset(const fs::path& blob, const std::string& name) {
  MappedFile f(blob.string());
  BlobView v(f.data(), f.size(), blob.string());
  return v.find(name)->offset;
}

// Overwrites the bf16 value at byte offset `at` of a file.
void put_bf16(const fs::path& file, uint64_t at, uint16_t value) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(std::streamoff(at));
  f.write(reinterpret_cast<const char*>(&value), 2);
}

uint16_t get_bf16(const fs::path& file, uint64_t at) {
  std::ifstream f(file, std::ios::binary);
  f.seekg(std::streamoff(at));
  uint16_t v = 0;
  f.read(reinterpret_cast<char*>(&v), 2);
  return v;
}

}  // namespace

TEST_CASE("a flipped weight bit is refused at open, with or without re-layout, unless opted out") {
  const fs::path art = copy_of_tiny("flipped.kiln");
  const fs::path blob = art / "layer-001.kblob";
  const uint64_t at = tensor_offset(blob, "mlp.wi_0") + 200;
  put_bf16(blob, at, uint16_t(get_bf16(blob, at) ^ 0x0001));  // the lowest mantissa bit: finite
  for (bool relayout : {true, false}) {
    CAPTURE(relayout);
    EngineOptions o = options(relayout);
    CHECK_THROWS_WITH_AS(
        Engine::open(art.string(), o),
        doctest::Contains("layer-001.kblob: tensor 'mlp.wi_0' fails its CRC-32C check"), Error);
    o.model.verify_checksums = false;
    auto engine = Engine::open(art.string(), o);
    CHECK(engine->prefill(std::vector<int32_t>{1, 2, 3}, {}).tokens[0] >= 0);
  }
}

TEST_CASE("verify_on_first_use: bf16() checks what it hands out, verify_remaining() the rest") {
  const fs::path art = copy_of_tiny("first-use.kiln");
  const fs::path blob = art / "layer-000.kblob";
  const uint64_t at = tensor_offset(blob, "attn.q") + 10;
  put_bf16(blob, at, uint16_t(get_bf16(blob, at) ^ 0x0001));
  auto a = Artifact::open(art.string(), {.verify_checksums = true, .verify_on_first_use = true});
  const ModelConfig& c = a->config();
  CHECK(a->bf16(a->layer(0), "pre_attn_norm", {c.emb_dim}) != nullptr);
  CHECK_THROWS_WITH_AS(a->verify_remaining(),
                       doctest::Contains("layer-000.kblob: tensor 'attn.q' fails"), Error);
  CHECK_THROWS_WITH_AS(a->bf16(a->layer(0), "attn.q", {c.emb_dim, c.num_query_heads, c.head_dim}),
                       doctest::Contains("attn.q"), Error);
  // Checked at open without verify_on_first_use; not at all without verify_checksums.
  CHECK_THROWS_WITH_AS(Artifact::open(art.string()), doctest::Contains("'attn.q' fails"), Error);
  auto unchecked = Artifact::open(art.string(), {.verify_checksums = false});
  CHECK_NOTHROW(unchecked->verify_remaining());
}

TEST_CASE("a NaN weight makes a non-finite logit an error naming the position, never a token") {
  const fs::path art = copy_of_tiny("nan.kiln");
  const fs::path globals = art / "globals.kblob";
  const int64_t E = 64;
  const int32_t bad = 5;  // the token whose embedding row gets a NaN
  put_bf16(globals, tensor_offset(globals, "token_embedding") + uint64_t(bad * E + 3) * 2, 0x7FC0);
  CHECK_THROWS_WITH_AS(Engine::open(art.string(), options(true)),
                       doctest::Contains("globals.kblob: tensor 'token_embedding' fails"), Error);
  EngineOptions o = options(true);
  o.model.verify_checksums = false;
  o.slots = 2;
  auto engine = Engine::open(art.string(), o);
  const int64_t V = engine->config().vocab_size;

  // Prefill: the first position whose logits are NaN is the bad token's.
  const std::vector<int32_t> prompt = {1, 2, bad, 3};
  std::vector<float> logits(prompt.size() * size_t(V));
  CHECK_THROWS_WITH_AS(engine->prefill_logits(prompt, logits.data()),
                       doctest::Contains("position 2: non-finite logit"), NonFiniteError);
  CHECK_THROWS_AS(engine->prefill(prompt, {}), NonFiniteError);
  // Packed prompts compute the logits of their last position only.
  const std::vector<int32_t> healthy = {1, 2};
  const std::vector<PrefillRequest> reqs = {{healthy, {}, ""}, {prompt, {}, ""}};
  CHECK_THROWS_WITH_AS(engine->prefill_concat(reqs), doctest::Contains("prompt 1, position 3"),
                       NonFiniteError);

  // Decode: slot 1 is fed the bad token; the step fails naming it, and no slot advances.
  SamplingParams sp;
  engine->insert(engine->prefill(std::vector<int32_t>{7, 8, 9}, sp), 0);
  Prefix p = engine->prefill(std::vector<int32_t>{1, 2}, sp);
  p.tokens[0] = bad;
  engine->insert(std::move(p), 1);
  try {
    engine->generate();
    FAIL("generate() returned tokens from NaN logits");
  } catch (const NonFiniteError& e) {
    CHECK(std::string(e.what()) ==
          "slot 1, position 2: non-finite logit (NaN or inf; damaged "
          "weights?)");
    CHECK(e.sequence() == 1);
    CHECK(e.position() == 2);
  }
  CHECK(engine->slot_position(0) == 3);
  CHECK(engine->slot_position(1) == 2);
  // The healthy slot carries on once the damaged one is released.
  engine->release(1);
  CHECK(engine->generate().size() == 1);
}

TEST_CASE("run-time adapters are checksummed on load unless the engine was opened without") {
  const fs::path art = copy_of_tiny("lora-flipped.kiln");
  add_adapter({art.string(), write_tiny_adapter(tiny_untied().dir / "adapter-f", 0.3f).string(),
               "f", 1.0, false});
  const fs::path blob = art / "adapters" / "f" / "layer-000.kblob";
  REQUIRE(fs::exists(blob));
  const uint64_t at = tensor_offset(blob, "attn.q.lora_a") + 6;
  put_bf16(blob, at, uint16_t(get_bf16(blob, at) ^ 0x0001));
  auto engine = Engine::open(art.string(), options(true));
  CHECK_THROWS_WITH_AS(engine->load_adapter("f"),
                       doctest::Contains("layer-000.kblob: tensor 'attn.q.lora_a' fails"), Error);
  EngineOptions o = options(true);
  o.model.verify_checksums = false;
  CHECK_NOTHROW(Engine::open(art.string(), o)->load_adapter("f"));
}
