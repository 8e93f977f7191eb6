// The C API (include/kiln/kiln.h) over kiln::Engine. Every entry point catches every exception: a
// kiln::StateError becomes KILN_ERROR_STATE, a kiln::NonFiniteError (damaged weights)
// KILN_ERROR_IO, another kiln::Error the status its call's context implies (an invalid argument;
// I/O for opening and loading), a std::filesystem error (it names its path) KILN_ERROR_IO,
// std::bad_alloc and anything else KILN_ERROR_INTERNAL.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/error.h"
#include "engine/engine.h"
#include "engine/runner.h"
#include "include/kiln/kiln.h"
#include "schema/manifest.h"

struct kiln_engine {
  std::unique_ptr<kiln::Engine> engine;
};

struct kiln_prefix {
  kiln::Prefix prefix;
};

namespace {

thread_local std::string g_last_error;

// A failure with its status; thrown inside the entry points only (never crosses the API).
struct Failure {
  kiln_status status;
  std::string message;
};

[[noreturn]] void fail(kiln_status status, std::string message) {
  throw Failure{status, std::move(message)};
}

void require(const void* p, const char* fn, const char* arg) {
  if (!p) fail(KILN_ERROR_INVALID_ARGUMENT, std::string(fn) + ": " + arg + " is NULL");
}

// Runs `body`; a kiln::Error it throws gets the status `error_status`.
template <class F>
kiln_status guarded(const char* fn, kiln_status error_status, F&& body) noexcept {
  try {
    try {
      body();
      return KILN_OK;
    } catch (const Failure& f) {
      g_last_error = f.message;
      return f.status;
    } catch (const kiln::StateError& e) {
      g_last_error = std::string(fn) + ": " + e.what();
      return KILN_ERROR_STATE;
    } catch (const kiln::NonFiniteError& e) {
      g_last_error = std::string(fn) + ": " + e.what();
      return KILN_ERROR_IO;
    } catch (const kiln::Error& e) {
      g_last_error = std::string(fn) + ": " + e.what();
      return error_status;
    } catch (const std::filesystem::filesystem_error& e) {  // names the path; the system's fault
      g_last_error = std::string(fn) + ": " + e.what();
      return KILN_ERROR_IO;
    } catch (const std::bad_alloc&) {
      g_last_error = std::string(fn) + ": out of memory";
      return KILN_ERROR_INTERNAL;
    } catch (const std::exception& e) {
      g_last_error = std::string(fn) + ": internal error: " + e.what();
      return KILN_ERROR_INTERNAL;
    } catch (...) {
      g_last_error = std::string(fn) + ": internal error (unknown exception)";
      return KILN_ERROR_INTERNAL;
    }
  } catch (...) {  // assigning the message itself failed
    return KILN_ERROR_INTERNAL;
  }
}

// `vocab` bounds n_stop_tokens: stop tokens are vocabulary ids, so a longer list can only be a
// wrong count, and it is refused before the caller's array is read.
kiln::SamplingParams sampling_params(const kiln_sampling& s, const std::string& what,
                                     int64_t vocab) {
  kiln::SamplingParams p;
  // Read as an integer: a C caller may pass any int, which C++ may not load as the enum.
  std::underlying_type_t<kiln_sampling_algorithm> raw;
  static_assert(sizeof raw == sizeof s.algorithm);
  std::memcpy(&raw, &s.algorithm, sizeof raw);
  const int64_t a = int64_t(raw);
  if (a < KILN_SAMPLING_GREEDY || a > KILN_SAMPLING_COMPOSITE)
    fail(KILN_ERROR_INVALID_ARGUMENT,
         what + ": unknown sampling algorithm " + std::to_string(a) + " (valid: 0..4)");
  if (s.n_stop_tokens > 0 && !s.stop_tokens)
    fail(KILN_ERROR_INVALID_ARGUMENT,
         what + ": stop_tokens is NULL but n_stop_tokens is " + std::to_string(s.n_stop_tokens));
  if (s.n_stop_tokens > uint64_t(vocab))
    fail(KILN_ERROR_INVALID_ARGUMENT, what + ": n_stop_tokens " + std::to_string(s.n_stop_tokens) +
                                          " exceeds the vocabulary size " + std::to_string(vocab));
  p.algorithm = kiln::SamplingAlgorithm(a);
  p.temperature = s.temperature;
  p.top_k = s.top_k;
  p.top_p = s.top_p;
  p.seed = s.seed;
  if (s.n_stop_tokens > 0) p.stop_tokens.assign(s.stop_tokens, s.stop_tokens + s.n_stop_tokens);
  p.max_new_tokens = s.max_new_tokens;
  return p;
}

std::string adapter_name(const char* adapter) {
  return adapter ? std::string(adapter) : "";
}

// A request's bad input, refused before anything runs, named by `what` (for prefill_concat:
// which prompt).
void check_request(const kiln::Engine& e, std::span<const int32_t> prompt,
                   const kiln::SamplingParams& sp, const std::string& what) {
  try {
    e.check_request(prompt, sp);
  } catch (const kiln::Error& err) {
    fail(KILN_ERROR_INVALID_ARGUMENT, what + ": " + err.what());
  }
}

kiln_slot_token to_c(const kiln::SlotToken& t) {
  kiln_slot_token c;
  c.slot = t.slot;
  c.token = t.token;
  c.logp = t.logp;
  c.finish = int(t.finish);  // FinishReason's order is KILN_FINISH_*'s
  return c;
}

static_assert(KILN_MAX_THREADS == kiln::kMaxThreads);
#if defined(KILN_API_MAJOR_BUILT) && defined(KILN_API_MINOR_BUILT)
// The soname meson.build gives libkiln.so is the header's major version.
static_assert(KILN_API_VERSION_MAJOR == KILN_API_MAJOR_BUILT &&
                  KILN_API_VERSION_MINOR == KILN_API_MINOR_BUILT,
              "meson.build's kiln_api_major/minor differ from include/kiln/kiln.h");
#endif
static_assert(int(kiln::FinishReason::None) == KILN_FINISH_NONE &&
              int(kiln::FinishReason::Stop) == KILN_FINISH_STOP &&
              int(kiln::FinishReason::Length) == KILN_FINISH_LENGTH &&
              int(kiln::FinishReason::Context) == KILN_FINISH_CONTEXT);
static_assert(int(kiln::SamplingAlgorithm::Greedy) == KILN_SAMPLING_GREEDY &&
              int(kiln::SamplingAlgorithm::Weighted) == KILN_SAMPLING_WEIGHTED &&
              int(kiln::SamplingAlgorithm::TopK) == KILN_SAMPLING_TOPK &&
              int(kiln::SamplingAlgorithm::Nucleus) == KILN_SAMPLING_NUCLEUS &&
              int(kiln::SamplingAlgorithm::Composite) == KILN_SAMPLING_COMPOSITE);

// ---- option structs that grow (kiln.h: struct_size) ------------------------------------------

kiln_sampling default_sampling() {
  kiln_sampling s{};
  s.struct_size = sizeof s;
  s.algorithm = KILN_SAMPLING_GREEDY;
  s.temperature = 1.0f;
  s.top_k = 0;
  s.top_p = 1.0f;
  s.seed = 0;
  s.stop_tokens = nullptr;
  s.n_stop_tokens = 0;
  s.max_new_tokens = 0;
  return s;
}

kiln_engine_options default_engine_options() {
  kiln_engine_options o{};
  o.struct_size = sizeof o;
  o.threads = 0;
  o.slots = 1;
  o.max_seq_len = 0;
  o.relayout = 1;
  o.verify_checksums = 1;
  o.adapt_threads = 1;
  return o;
}

// The defaults into the caller's struct of `size` bytes: the fields it has, and zeros in what
// this library does not know (a newer header's fields, whose zero is their default).
template <class T>
void write_sized(T* out, size_t size, T defaults) {
  if (!out || size < sizeof(size_t)) return;
  defaults.struct_size = size;
  std::memcpy(out, &defaults, std::min(size, sizeof(T)));
  if (size > sizeof(T)) std::memset(reinterpret_cast<char*>(out) + sizeof(T), 0, size - sizeof(T));
}

// The caller's struct as this library's T: its own struct_size bytes, the defaults for fields
// an older caller lacks; fields of a newer caller that this library does not know must be zero.
template <class T>
T read_sized(const T* in, T defaults, const char* fn, const char* what) {
  const size_t size = in->struct_size;
  if (size < sizeof(size_t))
    fail(KILN_ERROR_INVALID_ARGUMENT, std::string(fn) + ": " + what + "->struct_size is " +
                                          std::to_string(size) + "; fill it with " + what +
                                          "_default() first");
  const char* bytes = reinterpret_cast<const char*>(in);
  for (size_t i = sizeof(T); i < size; ++i)
    if (bytes[i] != 0)
      fail(KILN_ERROR_INVALID_ARGUMENT,
           std::string(fn) + ": " + what + " has fields this kiln " + KILN_VERSION +
               " does not know (struct_size " + std::to_string(size) + " > " +
               std::to_string(sizeof(T)) + ", byte " + std::to_string(i) + " set)");
  std::memcpy(&defaults, in, std::min(size, sizeof(T)));
  defaults.struct_size = sizeof(T);
  return defaults;
}

// Element i of a caller's array of kiln_sampling, read with the first element's struct_size as
// the stride.
kiln_sampling sampling_at(const kiln_sampling* array, size_t i, const char* fn) {
  const size_t stride = array[0].struct_size;
  if (stride < sizeof(size_t))
    return read_sized(array, default_sampling(), fn, "kiln_sampling");  // refused as such
  const auto* element =
      reinterpret_cast<const kiln_sampling*>(reinterpret_cast<const char*>(array) + i * stride);
  return read_sized(element, default_sampling(), fn, "kiln_sampling");
}

// The model's max_target_length from the manifest, or -1 when it cannot be read (Engine::open then
// reports the problem).
int64_t manifest_context(const std::string& dir, bool verify_checksum) {
  try {
    return kiln::read_manifest_in(dir, verify_checksum).config.max_target_length;
  } catch (...) {
    return -1;
  }
}

}  // namespace

// The definitions take their C linkage from the declarations in kiln.h.

const char* kiln_status_name(kiln_status status) {
  switch (status) {
    case KILN_OK:
      return "ok";
    case KILN_ERROR_INVALID_ARGUMENT:
      return "invalid argument";
    case KILN_ERROR_IO:
      return "i/o error";
    case KILN_ERROR_STATE:
      return "invalid state";
    case KILN_ERROR_INTERNAL:
      return "internal error";
  }
  return "unknown status";
}

const char* kiln_version(void) {
  return KILN_VERSION;
}

int kiln_api_version(void) {
  return KILN_API_VERSION_MAJOR * 1000 + KILN_API_VERSION_MINOR;
}

const char* kiln_last_error(void) {
  return g_last_error.c_str();
}

void kiln_sampling_init(kiln_sampling* s, size_t struct_size) {
  write_sized(s, struct_size, default_sampling());
}

void kiln_engine_options_init(kiln_engine_options* o, size_t struct_size) {
  write_sized(o, struct_size, default_engine_options());
}

kiln_status kiln_open(const char* dir, const kiln_engine_options* options, kiln_engine** out) {
  static constexpr const char* fn = "kiln_open";
  return guarded(fn, KILN_ERROR_IO, [&] {
    require(dir, fn, "dir");
    require(options, fn, "options");
    const kiln_engine_options opts =
        read_sized(options, default_engine_options(), fn, "kiln_engine_options");
    const kiln_engine_options* const o = &opts;
    require(out, fn, "out");
    kiln::EngineOptions eo;
    if (o->threads < 0 || o->threads > KILN_MAX_THREADS)
      fail(KILN_ERROR_INVALID_ARGUMENT, std::string(fn) + ": threads must be in [0, " +
                                            std::to_string(KILN_MAX_THREADS) + "], got " +
                                            std::to_string(o->threads));
    if (o->slots < 1 || o->slots > eo.model.max_chunk)
      fail(KILN_ERROR_INVALID_ARGUMENT, std::string(fn) + ": slots must be in [1, " +
                                            std::to_string(eo.model.max_chunk) + "], got " +
                                            std::to_string(o->slots));
    if (o->max_seq_len < 0)
      fail(KILN_ERROR_INVALID_ARGUMENT,
           std::string(fn) + ": max_seq_len must be >= 0, got " + std::to_string(o->max_seq_len));
    if (o->max_seq_len > 0) {
      const int64_t ctx = manifest_context(dir, o->verify_checksums != 0);
      if (ctx >= 0 && o->max_seq_len > ctx)
        fail(KILN_ERROR_INVALID_ARGUMENT,
             std::string(fn) + ": " + dir + ": max_seq_len " + std::to_string(o->max_seq_len) +
                 " exceeds the model's max_target_length " + std::to_string(ctx));
    }
    eo.model.threads = o->threads;
    eo.model.relayout = o->relayout != 0;
    eo.model.verify_checksums = o->verify_checksums != 0;
    eo.model.adapt_threads = o->adapt_threads != 0;
    eo.max_seq_len = o->max_seq_len;
    eo.slots = o->slots;
    auto e = std::make_unique<kiln_engine>();
    e->engine = kiln::Engine::open(dir, eo);
    *out = e.release();
  });
}

void kiln_close(kiln_engine* engine) {
  try {
    delete engine;
  } catch (...) {  // destructors do not throw; nothing may cross the API regardless
  }
}

int64_t kiln_vocab_size(const kiln_engine* engine) {
  return engine ? engine->engine->config().vocab_size : 0;
}

int64_t kiln_max_seq_len(const kiln_engine* engine) {
  return engine ? engine->engine->max_seq_len() : 0;
}

int64_t kiln_slots(const kiln_engine* engine) {
  return engine ? engine->engine->slots() : 0;
}

// --- prefill ---------------------------------------------------------------------------------

namespace {

kiln_status prefill(const char* fn, kiln_engine* engine, const int32_t* tokens, size_t n,
                    int64_t n_samples, const kiln_sampling* sampling, const char* adapter,
                    kiln_prefix** out) {
  return guarded(fn, KILN_ERROR_INVALID_ARGUMENT, [&] {
    require(engine, fn, "engine");
    require(tokens, fn, "tokens");
    require(sampling, fn, "sampling");
    require(out, fn, "out");
    kiln::Engine& e = *engine->engine;
    if (n_samples < 1 || n_samples > e.slots())
      fail(KILN_ERROR_INVALID_ARGUMENT, std::string(fn) + ": n_samples must be in [1, " +
                                            std::to_string(e.slots()) + "] (the slots), got " +
                                            std::to_string(n_samples));
    const kiln::SamplingParams sp =
        sampling_params(sampling_at(sampling, 0, fn), fn, e.config().vocab_size);
    const std::string name = adapter_name(adapter);
    const std::span<const int32_t> prompt(tokens, n);
    check_request(e, prompt, sp, fn);
    auto p = std::make_unique<kiln_prefix>();
    p->prefix = e.prefill_multisampling(prompt, n_samples, sp, name);
    *out = p.release();
  });
}

}  // namespace

kiln_status kiln_prefill(kiln_engine* engine, const int32_t* tokens, size_t n,
                         const kiln_sampling* sampling, const char* adapter, kiln_prefix** out) {
  return prefill("kiln_prefill", engine, tokens, n, 1, sampling, adapter, out);
}

kiln_status kiln_prefill_multisampling(kiln_engine* engine, const int32_t* tokens, size_t n,
                                       int64_t n_samples, const kiln_sampling* sampling,
                                       const char* adapter, kiln_prefix** out) {
  return prefill("kiln_prefill_multisampling", engine, tokens, n, n_samples, sampling, adapter,
                 out);
}

kiln_status kiln_prefill_concat(kiln_engine* engine, size_t n_prompts, const int32_t* const* tokens,
                                const size_t* lengths, const kiln_sampling* sampling,
                                const char* const* adapters, kiln_prefix** out) {
  static constexpr const char* fn = "kiln_prefill_concat";
  if (out)
    for (size_t i = 0; i < n_prompts; ++i) out[i] = nullptr;
  return guarded(fn, KILN_ERROR_INVALID_ARGUMENT, [&] {
    require(engine, fn, "engine");
    require(tokens, fn, "tokens");
    require(lengths, fn, "lengths");
    require(sampling, fn, "sampling");
    require(out, fn, "out");
    if (n_prompts == 0) fail(KILN_ERROR_INVALID_ARGUMENT, std::string(fn) + ": no prompts");
    kiln::Engine& e = *engine->engine;
    std::vector<kiln::PrefillRequest> reqs(n_prompts);
    for (size_t i = 0; i < n_prompts; ++i) {
      const std::string what = std::string(fn) + ": prompt " + std::to_string(i);
      if (!tokens[i]) fail(KILN_ERROR_INVALID_ARGUMENT, what + ": tokens is NULL");
      reqs[i].tokens = std::span<const int32_t>(tokens[i], lengths[i]);
      reqs[i].sampling = sampling_params(sampling_at(sampling, i, fn), what, e.config().vocab_size);
      reqs[i].adapter = adapter_name(adapters ? adapters[i] : nullptr);
      check_request(e, reqs[i].tokens, reqs[i].sampling, what);
    }
    std::vector<std::unique_ptr<kiln_prefix>> made(n_prompts);
    for (auto& m : made) m = std::make_unique<kiln_prefix>();
    std::vector<kiln::Prefix> prefixes = e.prefill_concat(reqs);
    for (size_t i = 0; i < n_prompts; ++i) made[i]->prefix = std::move(prefixes[i]);
    for (size_t i = 0; i < n_prompts; ++i) out[i] = made[i].release();
  });
}

// --- prefixes --------------------------------------------------------------------------------

int64_t kiln_prefix_samples(const kiln_prefix* prefix) {
  return prefix ? int64_t(prefix->prefix.tokens.size()) : 0;
}

int32_t kiln_prefix_token(const kiln_prefix* prefix, int64_t i) {
  if (!prefix || i < 0 || i >= int64_t(prefix->prefix.tokens.size())) return -1;
  return prefix->prefix.tokens[size_t(i)];
}

float kiln_prefix_token_logp(const kiln_prefix* prefix, int64_t i) {
  if (!prefix || i < 0 || i >= int64_t(prefix->prefix.token_logp.size())) return NAN;
  return prefix->prefix.token_logp[size_t(i)];
}

int64_t kiln_prefix_next_pos(const kiln_prefix* prefix) {
  return prefix ? prefix->prefix.next_pos : 0;
}

const float* kiln_prefix_logits(const kiln_prefix* prefix) {
  return prefix ? prefix->prefix.logits.data() : nullptr;
}

void kiln_prefix_free(kiln_prefix* prefix) {
  try {
    delete prefix;
  } catch (...) {
  }
}

// --- decode slots ----------------------------------------------------------------------------

kiln_status kiln_insert(kiln_engine* engine, kiln_prefix* prefix, int64_t slot,
                        kiln_slot_token* first) {
  static constexpr const char* fn = "kiln_insert";
  return guarded(fn, KILN_ERROR_INVALID_ARGUMENT, [&] {
    require(engine, fn, "engine");
    require(prefix, fn, "prefix");
    require(first, fn, "first");
    kiln::Engine& e = *engine->engine;
    if (prefix->prefix.samplers.size() != 1)
      fail(KILN_ERROR_INVALID_ARGUMENT, std::string(fn) + ": the prefix holds " +
                                            std::to_string(prefix->prefix.samplers.size()) +
                                            " samples; use kiln_bulk_insert");
    *first = to_c(e.insert(std::move(prefix->prefix), slot));
    delete prefix;
  });
}

kiln_status kiln_bulk_insert(kiln_engine* engine, kiln_prefix* prefix, const int64_t* slots,
                             size_t n, kiln_slot_token* firsts) {
  static constexpr const char* fn = "kiln_bulk_insert";
  return guarded(fn, KILN_ERROR_INVALID_ARGUMENT, [&] {
    require(engine, fn, "engine");
    require(prefix, fn, "prefix");
    require(slots, fn, "slots");
    require(firsts, fn, "firsts");
    kiln::Engine& e = *engine->engine;
    const std::vector<kiln::SlotToken> got =
        e.bulk_insert(std::move(prefix->prefix), std::span<const int64_t>(slots, n));
    for (size_t i = 0; i < n; ++i) firsts[i] = to_c(got[i]);
    delete prefix;
  });
}

kiln_status kiln_generate(kiln_engine* engine, kiln_slot_token* out, size_t capacity,
                          size_t* n_out) {
  static constexpr const char* fn = "kiln_generate";
  return guarded(fn, KILN_ERROR_INTERNAL, [&] {
    require(engine, fn, "engine");
    require(n_out, fn, "n_out");
    kiln::Engine& e = *engine->engine;
    size_t active = 0;
    for (int64_t s = 0; s < e.slots(); ++s)
      if (e.slot_busy(s) && !e.slot_finished(s)) ++active;
    if (active > capacity)
      fail(KILN_ERROR_INVALID_ARGUMENT, std::string(fn) + ": capacity " + std::to_string(capacity) +
                                            " is less than the " + std::to_string(active) +
                                            " active slots");
    if (active > 0) require(out, fn, "out");
    const std::span<const kiln::SlotToken> step = e.generate();
    for (size_t i = 0; i < step.size(); ++i) out[i] = to_c(step[i]);
    *n_out = step.size();
  });
}

kiln_status kiln_release(kiln_engine* engine, int64_t slot) {
  static constexpr const char* fn = "kiln_release";
  return guarded(fn, KILN_ERROR_INVALID_ARGUMENT, [&] {
    require(engine, fn, "engine");
    engine->engine->release(slot);
  });
}

// --- serving a list of requests -------------------------------------------------------------

void kiln_output_free(kiln_output* out) {
  if (!out) return;
  std::free(out->tokens);
  std::free(out->logprobs);
  *out = kiln_output{};
}

kiln_status kiln_run(kiln_engine* engine, const kiln_request* requests, size_t n_requests,
                     const kiln_sampling* sampling, kiln_output* out, kiln_run_stats* stats) {
  static constexpr const char* fn = "kiln_run";
  if (out)
    for (size_t i = 0; i < n_requests; ++i) out[i] = kiln_output{};
  return guarded(fn, KILN_ERROR_INVALID_ARGUMENT, [&] {
    require(engine, fn, "engine");
    require(requests, fn, "requests");
    require(sampling, fn, "sampling");
    require(out, fn, "out");
    if (n_requests == 0) fail(KILN_ERROR_INVALID_ARGUMENT, std::string(fn) + ": no requests");
    kiln::Engine& e = *engine->engine;
    const kiln::SamplingParams sp =
        sampling_params(sampling_at(sampling, 0, fn), fn, e.config().vocab_size);
    std::vector<kiln::GenerationRequest> reqs(n_requests);
    for (size_t i = 0; i < n_requests; ++i) {
      const std::string what = std::string(fn) + ": request " + std::to_string(i);
      if (!requests[i].tokens) fail(KILN_ERROR_INVALID_ARGUMENT, what + ": tokens is NULL");
      const std::span<const int32_t> prompt(requests[i].tokens, requests[i].n_tokens);
      check_request(e, prompt, sp, what);
      reqs[i] = {std::vector<int32_t>(prompt.begin(), prompt.end()),
                 adapter_name(requests[i].adapter)};
    }
    kiln::Runner runner(e);
    const std::vector<kiln::GenerationOutput> res = runner.run(reqs, sp);
    // The C arrays, all or none.
    std::vector<kiln_output> made(n_requests, kiln_output{});
    for (size_t i = 0; i < n_requests; ++i) {
      const size_t n = res[i].tokens.size();
      made[i].tokens = static_cast<int32_t*>(std::malloc(std::max<size_t>(n, 1) * sizeof(int32_t)));
      made[i].logprobs = static_cast<float*>(std::malloc(std::max<size_t>(n, 1) * sizeof(float)));
      if (!made[i].tokens || !made[i].logprobs) {
        for (kiln_output& m : made) kiln_output_free(&m);
        throw std::bad_alloc();
      }
      std::copy(res[i].tokens.begin(), res[i].tokens.end(), made[i].tokens);
      std::copy(res[i].logprobs.begin(), res[i].logprobs.end(), made[i].logprobs);
      made[i].n_tokens = n;
      made[i].finish = int(res[i].finish);
    }
    std::copy(made.begin(), made.end(), out);
    if (stats) {
      const kiln::RunnerStats& st = runner.stats();
      *stats = {st.prefill_seconds, st.decode_seconds, st.prompt_tokens, st.generated, st.decoded};
    }
  });
}

// --- run-time LoRA ---------------------------------------------------------------------------

kiln_status kiln_load_adapter(kiln_engine* engine, const char* name) {
  static constexpr const char* fn = "kiln_load_adapter";
  return guarded(fn, KILN_ERROR_IO, [&] {
    require(engine, fn, "engine");
    require(name, fn, "name");
    if (!*name) fail(KILN_ERROR_INVALID_ARGUMENT, std::string(fn) + ": the name is empty");
    engine->engine->load_adapter(name);
  });
}

kiln_status kiln_unload_adapter(kiln_engine* engine, const char* name) {
  static constexpr const char* fn = "kiln_unload_adapter";
  return guarded(fn, KILN_ERROR_INVALID_ARGUMENT, [&] {
    require(engine, fn, "engine");
    require(name, fn, "name");
    engine->engine->unload_adapter(name);
  });
}
