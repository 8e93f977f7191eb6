// The request runner (engine/runner.h) on a tiny exported model: every request gets what it gets
// served alone, in request order, whatever the slots and the prefill packing; samples; its
// timings; a decode step allocates nothing; busy slots are refused and an error frees the slots;
// the scorer of `kiln eval`.
#include "engine/runner.h"

#include <doctest/doctest.h>

#include <cmath>
#include <stdexcept>

#include "common/error.h"
#include "tests/unit/alloc_counter.h"
#include "tests/unit/tiny_model.h"

using namespace kiln;

namespace {

EngineOptions with_slots(int64_t slots) {
  EngineOptions o;
  o.model.threads = 2;
  o.slots = slots;
  return o;
}

// One request alone on one slot, through the engine's calls.
GenerationOutput alone(Engine& e, const std::vector<int32_t>& prompt, const SamplingParams& sp) {
  GenerationOutput o;
  SlotToken t = e.insert(e.prefill(prompt, sp), 0);
  for (;;) {
    o.tokens.push_back(t.token);
    o.logprobs.push_back(t.logp);
    if (t.finish != FinishReason::None) break;
    t = e.generate()[0];
  }
  o.finish = t.finish;
  e.release(0);
  return o;
}

void check_same(const GenerationOutput& got, const GenerationOutput& want) {
  CHECK(got.tokens == want.tokens);
  CHECK(got.finish == want.finish);
  REQUIRE(got.logprobs.size() == want.logprobs.size());
  for (size_t k = 0; k < want.logprobs.size(); ++k)
    CHECK(std::fabs(got.logprobs[k] - want.logprobs[k]) <= 1e-4);
}

const std::vector<GenerationRequest> kRequests = {{{5, 9, 200, 31, 7}, ""},
                                                  {{100, 3, 3, 64}, ""},
                                                  {{1}, ""},
                                                  {{17, 18, 19, 20, 21, 22}, ""},
                                                  {{250, 4, 8}, ""}};

}  // namespace

TEST_CASE("the runner serves every request as alone, in request order, and times it") {
  const std::string art = test::tiny_untied().artifact.string();
  SamplingParams sp;
  sp.max_new_tokens = 7;
  std::vector<GenerationOutput> want;
  {
    auto e = Engine::open(art, with_slots(1));
    for (const auto& r : kRequests) want.push_back(alone(*e, r.prompt, sp));
    sp.stop_tokens = {want[1].tokens[2]};  // request 1 stops early, so a slot frees mid-run
    want.clear();
    for (const auto& r : kRequests) want.push_back(alone(*e, r.prompt, sp));
  }
  CHECK(want[1].finish == FinishReason::Stop);
  for (auto [slots, packed] :
       {std::pair<int64_t, bool>{1, false}, {2, false}, {2, true}, {8, true}}) {
    CAPTURE(slots);
    CAPTURE(packed);
    auto e = Engine::open(art, with_slots(slots));
    Runner runner(*e);
    RunOptions ro;
    ro.packed_prefill = packed;
    int64_t seen = 0;
    ro.on_token = [&](const SlotToken&) { ++seen; };
    const auto out = runner.run(kRequests, sp, ro);
    REQUIRE(out.size() == kRequests.size());
    int64_t generated = 0, prompt_tokens = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      CAPTURE(i);
      check_same(out[i], want[i]);
      generated += int64_t(out[i].tokens.size());
      prompt_tokens += int64_t(kRequests[i].prompt.size());
    }
    const RunnerStats& st = runner.stats();
    CHECK(seen == generated);
    CHECK(st.generated == generated);
    CHECK(st.prompt_tokens == prompt_tokens);
    CHECK(st.decoded == generated - int64_t(kRequests.size()));  // each prefill made one
    CHECK(st.prefill_seconds > 0);
    CHECK(st.decode_seconds > 0);
    CHECK(st.prefill_tokens_per_s() == double(prompt_tokens) / st.prefill_seconds);
    for (int64_t s = 0; s < slots; ++s) CHECK_FALSE(e->slot_busy(s));
  }
}

TEST_CASE("samples: a request's sample 0 is its single run, and each sample takes a slot") {
  const std::string art = test::tiny_untied().artifact.string();
  SamplingParams sp;
  sp.algorithm = SamplingAlgorithm::Weighted;
  sp.temperature = 1.0f;
  sp.seed = 7;
  sp.max_new_tokens = 6;
  auto e = Engine::open(art, with_slots(4));
  Runner runner(*e);
  const auto single = runner.run(kRequests, sp);
  RunOptions ro;
  ro.samples = 3;
  const auto sampled = runner.run(kRequests, sp, ro);
  REQUIRE(sampled.size() == 3 * kRequests.size());
  for (size_t i = 0; i < kRequests.size(); ++i) {
    CAPTURE(i);
    check_same(sampled[3 * i], single[i]);
  }
  int64_t prompt_tokens = 0, generated = 0;
  for (const auto& r : kRequests) prompt_tokens += int64_t(r.prompt.size());
  for (const auto& o : sampled) generated += int64_t(o.tokens.size());
  CHECK(runner.stats().prompt_tokens == prompt_tokens);  // one prefill per request
  CHECK(runner.stats().generated == generated);
  ro.samples = 5;  // more than the slots
  CHECK_THROWS_AS(runner.run(kRequests, sp, ro), std::logic_error);
}

TEST_CASE("a decode step of the runner allocates nothing") {
  auto e = Engine::open(test::tiny_untied().artifact.string(), with_slots(2));
  Runner runner(*e);
  SamplingParams sp;
  sp.max_new_tokens = 24;
  int64_t tokens = 0;
  uint64_t allocations = 1;
  RunOptions ro;
  ro.on_token = [&](const SlotToken& st) {
    // From the second decode step on (the first may initialise state lazily) to the last token.
    if (++tokens == 3) kiln::test::start_counting_allocations();
    if (st.finish != FinishReason::None) allocations = kiln::test::stop_counting_allocations();
  };
  const auto out = runner.run({kRequests[0]}, sp, ro);
  CHECK(out[0].tokens.size() == 24);
  CHECK(allocations == 0);
}

TEST_CASE("a busy slot is refused, and a failing run frees the slots it took") {
  auto e = Engine::open(test::tiny_untied().artifact.string(), with_slots(2));
  Runner runner(*e);
  SamplingParams sp;
  sp.max_new_tokens = 8;
  e->insert(e->prefill(kRequests[0].prompt, sp), 1);
  CHECK_THROWS_AS(runner.run(kRequests, sp), StateError);
  e->release(1);
  std::vector<GenerationRequest> reqs = kRequests;
  reqs[3].adapter = "not-loaded";  // refused by its prefill, while requests 0..2 are in flight
  CHECK_THROWS_AS(runner.run(reqs, sp), StateError);
  CHECK_FALSE(e->slot_busy(0));
  CHECK_FALSE(e->slot_busy(1));
  CHECK(runner.run(kRequests, sp).size() == kRequests.size());
}

TEST_CASE("the scorer adds each next token's negative log-likelihood") {
  auto e = Engine::open(test::tiny_untied().artifact.string(), with_slots(1));
  const int64_t V = e->config().vocab_size;
  Scorer scorer(*e, "");
  double want = 0;
  int64_t predicted = 0, processed = 0;
  for (const auto& r : kRequests) {
    if (r.prompt.size() < 2) continue;
    scorer.add(r.prompt);
    std::vector<float> logits(r.prompt.size() * size_t(V));
    e->prefill_logits(r.prompt, logits.data());
    for (size_t t = 0; t + 1 < r.prompt.size(); ++t) {
      const float* row = logits.data() + t * size_t(V);
      double sum = 0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]));
      want += std::log(sum) - double(row[r.prompt[t + 1]]);
    }
    predicted += int64_t(r.prompt.size()) - 1;
    processed += int64_t(r.prompt.size());
  }
  CHECK(scorer.predicted() == predicted);
  CHECK(scorer.processed() == processed);
  CHECK(scorer.nll() == doctest::Approx(want).epsilon(1e-6));  // log_sum_exp: SIMD, f32 lanes
  CHECK(scorer.perplexity() == doctest::Approx(std::exp(want / double(predicted))));
  CHECK(scorer.seconds() > 0);
}
