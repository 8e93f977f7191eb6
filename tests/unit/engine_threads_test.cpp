// Engines side by side in one process: two engines, each driven from its own thread at the same
// time, give bit for bit the tokens and log-probs each gives alone (their matrix products run in
// per-engine oneDNN contexts, their thread counts are per calling thread); one engine entered from
// a second thread while a call runs is refused with a StateError, never corrupted. tools/test
// --tsan runs this file under ThreadSanitizer.
#include <doctest/doctest.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "engine/engine.h"
#include "engine/runner.h"
#include "tests/unit/tiny_model.h"

using namespace kiln;

namespace {

struct Served {
  std::vector<std::vector<int32_t>> tokens;
  std::vector<std::vector<float>> logps;
  int64_t decode_steps = 0;
};

// Four requests of 20-token prompts (prefill through oneDNN's primitives, M > 16) and 60 tokens
// each (decode through the GEMVs): 236 generate steps on one slot.
Served serve(const std::string& artifact, uint64_t seed, int threads) {
  EngineOptions eo;
  eo.model.threads = threads;
  auto engine = Engine::open(artifact, eo);
  std::vector<GenerationRequest> requests;
  for (int r = 0; r < 4; ++r) {
    std::vector<int32_t> prompt;
    for (int t = 0; t < 20; ++t)
      prompt.push_back(int32_t((seed * 31 + uint64_t(r * 20 + t) * 7) % 256));
    requests.push_back({prompt, ""});
  }
  SamplingParams sp;
  sp.algorithm = SamplingAlgorithm::Composite;
  sp.temperature = 0.9f;
  sp.top_k = 50;
  sp.top_p = 0.95f;
  sp.seed = seed;
  sp.max_new_tokens = 60;
  Runner runner(*engine);
  const std::vector<GenerationOutput> out = runner.run(requests, sp);
  Served s;
  for (const GenerationOutput& o : out) {
    s.tokens.push_back(o.tokens);
    s.logps.push_back(o.logprobs);
  }
  s.decode_steps = runner.stats().decoded;
  return s;
}

void check_bit_identical(const Served& a, const Served& b) {
  REQUIRE(a.tokens.size() == b.tokens.size());
  for (size_t i = 0; i < a.tokens.size(); ++i) {
    CAPTURE(i);
    CHECK(a.tokens[i] == b.tokens[i]);
    REQUIRE(a.logps[i].size() == b.logps[i].size());
    CHECK(std::memcmp(a.logps[i].data(), b.logps[i].data(), a.logps[i].size() * sizeof(float)) ==
          0);
  }
}

}  // namespace

TEST_CASE("two engines on two threads give exactly what each gives alone") {
  const std::string untied = test::tiny_untied().artifact.string();
  const std::string tied = test::make_tiny_model("threads_tied", true).artifact.string();
  // Different thread counts too: one engine's count must not leak into the other's passes.
  const Served alone_a = serve(untied, 11, 2);
  const Served alone_b = serve(tied, 12, 1);
  CHECK(alone_a.decode_steps >= 200);
  CHECK(alone_b.decode_steps >= 200);
  for (int round = 0; round < 2; ++round) {
    CAPTURE(round);
    Served side_a, side_b;
    std::thread ta([&] { side_a = serve(untied, 11, 2); });
    std::thread tb([&] { side_b = serve(tied, 12, 1); });
    ta.join();
    tb.join();
    check_bit_identical(side_a, alone_a);
    check_bit_identical(side_b, alone_b);
  }
}

TEST_CASE("one engine entered from a second thread during a call is refused, not corrupted") {
  EngineOptions eo;
  eo.model.threads = 1;
  auto engine = Engine::open(test::tiny_untied().artifact.string(), eo);
  const std::vector<int32_t> prompt(90, 7);
  std::vector<float> logits(size_t(90) * size_t(engine->config().vocab_size));
  std::atomic<bool> done{false};
  // Both threads get refused now and then (whichever comes second); each retries.
  std::thread busy([&] {
    for (int i = 0; i < 40;) {
      try {
        engine->prefill_logits(prompt, logits.data());
        ++i;
      } catch (const StateError&) {
      }
    }
    done = true;
  });
  int refused = 0;
  std::string message;
  while (!done) {
    try {
      engine->generate();  // no active slot: returns at once when the engine is free
    } catch (const StateError& e) {
      ++refused;
      message = e.what();
    }
  }
  busy.join();
  CHECK(refused > 0);
  CHECK(message.find("in use by another thread") != std::string::npos);
  // The engine still works afterwards, from this thread.
  CHECK_NOTHROW(engine->prefill_logits(prompt, logits.data()));
}
