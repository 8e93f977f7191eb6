/* kiln's C API: the serving API of engine/engine.h (kiln::Engine) for C99 and other languages'
 * foreign-function interfaces. Installed as <kiln/kiln.h> with libkiln.so (pkg-config kiln); the
 * library exports these kiln_* functions and nothing else.
 *
 * Usage: kiln_open an artifact with some decode slots; kiln_prefill a prompt into a kiln_prefix
 * (its attention cache, the logits at its last position and its first sampled token);
 * kiln_insert the prefix into a free slot; kiln_generate advances every active slot by one token
 * in one batched forward pass; kiln_release frees a slot once its request is finished (or to
 * abandon it). kiln_run does all of that for a list of requests (continuous batching), as
 * tools/examples/kiln_example.c shows.
 *
 * Conventions:
 *   - Every function returning kiln_status returns KILN_OK on success. On failure it returns
 *     another code, leaves its output arguments unchanged unless documented otherwise, and sets
 *     the calling thread's error message (kiln_last_error). No C++ exception crosses the API.
 *   - A NULL pointer where an object is required gives KILN_ERROR_INVALID_ARGUMENT (documented
 *     exceptions: a NULL adapter name means the base weights; kiln_close and kiln_prefix_free
 *     accept NULL).
 *   - Token ids are int32_t in [0, kiln_vocab_size); slots are int64_t in [0, kiln_slots).
 *   - Threads: different engines may be used concurrently, each from its own thread, and give
 *     exactly the results each gives alone. One engine serves one thread at a time: a call made
 *     while another thread is inside a call on the same engine fails with KILN_ERROR_STATE
 *     ("in use by another thread") and changes nothing. A prefix must be inserted into (or freed
 *     before closing) the engine that made it.
 *   - Option structs (kiln_engine_options, kiln_sampling) begin with struct_size, the size of
 *     the struct the caller was compiled with. Fill them with kiln_engine_options_default and
 *     kiln_sampling_default (macros that pass sizeof), which set struct_size and every default,
 *     then change what you need. Later minor versions only add fields at the end: a library
 *     given a smaller struct uses the defaults for the fields it lacks; given a larger one, it
 *     refuses (INVALID_ARGUMENT) unless the fields it does not know are zero. An array of
 *     kiln_sampling is read with its first element's struct_size as the stride.
 *   - Versions: the header's KILN_API_VERSION_MAJOR/MINOR; the library's kiln_api_version().
 *     A program runs with a library of the same major version and at least its minor version.
 *   - Threads of the OpenMP runtime: a waiting worker thread spins for a while before it
 *     sleeps (libgomp's default); README "Use from C" shows what OMP_WAIT_POLICY changes.
 */
#ifndef KILN_H
#define KILN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- versions -------------------------------------------------------------------------------- */

#define KILN_API_VERSION_MAJOR 1
#define KILN_API_VERSION_MINOR 1

/* The release of the library, e.g. "0.2.0". */
const char* kiln_version(void);

/* The C API version the library implements: major * 1000 + minor. A program compiled with this
 * header can check at start-up that kiln_api_version() / 1000 == KILN_API_VERSION_MAJOR and
 * kiln_api_version() % 1000 >= KILN_API_VERSION_MINOR. */
int kiln_api_version(void);

/* ---- errors ---------------------------------------------------------------------------------- */

typedef enum kiln_status {
  KILN_OK = 0,
  /* A NULL pointer, an out-of-range value (slot, token id, count), bad sampling parameters, an
   * empty or too long prompt, engine options the artifact cannot honour. */
  KILN_ERROR_INVALID_ARGUMENT = 1,
  /* The artifact or an adapter cannot be opened, read or verified (missing or corrupt files, a
   * checksum that does not match, an adapter name the artifact does not have), or a forward pass
   * produced a non-finite logit (NaN or inf: damaged weights, only possible when the engine was
   * opened with verify_checksums = 0, or values that overflow; the message names the position and
   * the slot or prompt, and no slot advanced). */
  KILN_ERROR_IO = 2,
  /* The call does not fit the engine's state: a busy slot for insert, a free slot for release,
   * an adapter that is not loaded (or still in use when unloading). */
  KILN_ERROR_STATE = 3,
  /* Out of memory or an unexpected failure inside the engine. */
  KILN_ERROR_INTERNAL = 4
} kiln_status;

/* A static name of a status: "ok", "invalid argument", "i/o error", "invalid state",
 * "internal error" ("unknown status" for other values). */
const char* kiln_status_name(kiln_status status);

/* The message of the last call that failed on the calling thread: one line, naming the input
 * (path, slot, token, parameter) at fault. "" if no call has failed on this thread. Successful
 * calls do not clear it. The pointer stays valid until the next failing call on this thread. */
const char* kiln_last_error(void);

/* ---- sampling -------------------------------------------------------------------------------- */

/* MaxText's decode_sampling_strategy values (engine/sampling.h has the exact semantics):
 *   GREEDY     argmax (lowest id on ties); temperature, top_k, top_p ignored
 *   WEIGHTED   categorical(logits / T); T > 0
 *   TOPK       categorical over the top_k largest logits / T; top_k > 0, T > 0
 *   NUCLEUS    the smallest set with probability >= top_p, / T; top_p >= 0, T > 0
 *   COMPOSITE  top_k, then top_p inside it, / max(T, 1e-6); top_k > 0, 0 < top_p <= 1 */
typedef enum kiln_sampling_algorithm {
  KILN_SAMPLING_GREEDY = 0,
  KILN_SAMPLING_WEIGHTED = 1,
  KILN_SAMPLING_TOPK = 2,
  KILN_SAMPLING_NUCLEUS = 3,
  KILN_SAMPLING_COMPOSITE = 4
} kiln_sampling_algorithm;

/* One request's sampling and limits. The stop_tokens array is copied by the call it is passed
 * to; the caller keeps ownership. */
typedef struct kiln_sampling {
  /* sizeof(kiln_sampling) as the caller compiled it (kiln_sampling_default) */
  size_t struct_size;
  kiln_sampling_algorithm algorithm;
  float temperature;
  int32_t top_k;
  float top_p;
  uint64_t seed; /* the request's random stream starts from it (same seed, same tokens) */
  const int32_t* stop_tokens; /* a request ends after producing one (returned, finish = STOP) */
  size_t n_stop_tokens;       /* at most kiln_vocab_size; stop_tokens may be NULL when 0 */
  /* Tokens per request, the prefill's first token included; 0: until the context is full. */
  int64_t max_new_tokens;
} kiln_sampling;

/* Fills the struct_size bytes at s with the defaults: greedy, temperature 1, top_k 0, top_p 1,
 * seed 0, no stop tokens, max_new_tokens 0, and struct_size. Does nothing for NULL or a
 * struct_size too small to hold struct_size. Call it through kiln_sampling_default. */
void kiln_sampling_init(kiln_sampling* s, size_t struct_size);
#define kiln_sampling_default(s) kiln_sampling_init((s), sizeof *(s))

/* ---- engine ---------------------------------------------------------------------------------- */

typedef struct kiln_engine kiln_engine; /* an opened artifact with its decode slots */
typedef struct kiln_prefix kiln_prefix; /* a prefilled prompt, ready to insert into a slot */

/* The most worker threads an engine runs (kiln_engine_options.threads): far more than any
 * machine's cores, few enough that the OpenMP runtime can always start them. */
#define KILN_MAX_THREADS 1024

typedef struct kiln_engine_options {
  /* sizeof(kiln_engine_options) as the caller compiled it (kiln_engine_options_default) */
  size_t struct_size;
  int threads;   /* worker threads in [0, KILN_MAX_THREADS]; 0: every core */
  int64_t slots; /* decode slots (>= 1); their caches (slots x max_seq_len) are made at open */
  int64_t max_seq_len; /* context per slot; 0: the model's max_target_length */
  int relayout;        /* non-zero: copy the weights once into the kernels' preferred layout */
  /* Non-zero (the default): check the manifest's checksum and every tensor's checksum (base and
   * run-time adapters) before computing with it; the check shares the loading pass, so it costs
   * little. 0 opts out: damaged weights then go unnoticed (a NaN logit is still an error). */
  int verify_checksums;
  /* Non-zero (the default; since API 1.1): a decode step may run on fewer than `threads` threads
   * when measured steps show fewer are faster — cores shared with other busy work, or a model too
   * small for a second thread to pay. Results are the same bits either way. 0: always `threads`. */
  int adapt_threads;
} kiln_engine_options;

/* Fills the struct_size bytes at o with the defaults: threads 0, slots 1, max_seq_len 0,
 * relayout 1, verify_checksums 1, and struct_size. Does nothing for NULL or a struct_size too
 * small to hold struct_size. Call it through kiln_engine_options_default. */
void kiln_engine_options_init(kiln_engine_options* o, size_t struct_size);
#define kiln_engine_options_default(o) kiln_engine_options_init((o), sizeof *(o))

/* Opens the artifact directory `dir` (written by `kiln export`) and sets *out to a new engine,
 * which the caller closes with kiln_close.
 * Errors: INVALID_ARGUMENT for NULL arguments, a struct_size the library cannot read (see the
 * conventions) and options out of range (slots < 1 or above the
 * engine's batch limit, max_seq_len < 0 or above the model's max_target_length, threads < 0 or
 * above KILN_MAX_THREADS);
 * IO when the artifact is missing, incomplete or corrupt, or (verify_checksums) a checksum does
 * not match (the message names the path, and the tensor);
 * INTERNAL when memory runs out. */
kiln_status kiln_open(const char* dir, const kiln_engine_options* options, kiln_engine** out);

/* Closes an engine: unmaps the artifact and frees every slot. NULL is ignored. Prefixes made from
 * the engine and not yet inserted must be freed (kiln_prefix_free) before or after, but not
 * used with another engine. */
void kiln_close(kiln_engine* engine);

/* The model's vocabulary size, the context per slot, and the number of decode slots; 0 for a
 * NULL engine. */
int64_t kiln_vocab_size(const kiln_engine* engine);
int64_t kiln_max_seq_len(const kiln_engine* engine);
int64_t kiln_slots(const kiln_engine* engine);

/* ---- prefill --------------------------------------------------------------------------------- */

/* Runs the prompt tokens[0..n) and samples its first token; sets *out to a new prefix, owned by
 * the caller until kiln_insert consumes it (or kiln_prefix_free). `adapter` names a loaded
 * run-time LoRA adapter (kiln_load_adapter), or is NULL (or "") for the base weights. Uses no
 * slot.
 * Errors: INVALID_ARGUMENT for NULL arguments, an empty prompt, a prompt longer than
 * kiln_max_seq_len (n is checked before any token is read, so a wrong n never reads past the
 * caller's array), a token id outside the vocabulary, bad sampling parameters or stop tokens
 * outside the vocabulary; STATE for an adapter that is not loaded; IO for a non-finite logit
 * (the message names the position); INTERNAL for out of memory. */
kiln_status kiln_prefill(kiln_engine* engine, const int32_t* tokens, size_t n,
                         const kiln_sampling* sampling, const char* adapter, kiln_prefix** out);

/* As kiln_prefill, then n_samples independent first tokens from the same logits: sample i
 * draws from its own stream derived from (sampling->seed, i), sample 0 from the seed itself (so
 * one sample equals kiln_prefill). Insert it with kiln_bulk_insert, one slot per sample, so
 * n_samples is in [1, kiln_slots(engine)]. Errors as kiln_prefill, and INVALID_ARGUMENT for
 * n_samples outside that range. */
kiln_status kiln_prefill_multisampling(kiln_engine* engine, const int32_t* tokens, size_t n,
                                       int64_t n_samples, const kiln_sampling* sampling,
                                       const char* adapter, kiln_prefix** out);

/* Several prompts packed into one forward pass (each with its own positions and cache); prompt i
 * is tokens[i][0..lengths[i]) with sampling[i] and adapters[i] (adapters may be NULL: every
 * prompt on the base weights; an entry may be NULL or "" likewise). On success out[i] is prompt
 * i's new prefix, equal to its own kiln_prefill. On failure no prefix is made and every out[i] is
 * set to NULL. Errors as kiln_prefill (the message names the prompt's index where it can), and
 * INVALID_ARGUMENT for n_prompts == 0. */
kiln_status kiln_prefill_concat(kiln_engine* engine, size_t n_prompts, const int32_t* const* tokens,
                                const size_t* lengths, const kiln_sampling* sampling,
                                const char* const* adapters, kiln_prefix** out);

/* ---- prefixes -------------------------------------------------------------------------------- */

/* Prefix accessors; they never fail and do not set kiln_last_error.
 *   samples:     number of sampled first tokens (1, or n_samples of multisampling); 0 for NULL
 *   token:       sample i's first token; -1 for NULL or i out of range
 *   token_logp:  log-softmax of the raw logits at that token; NAN for NULL or i out of range
 *   next_pos:    the position the first generated token goes to (the prompt's length)
 *   logits:      the f32 logits at the prompt's last position, kiln_vocab_size of them, owned by
 *                the prefix (valid until it is inserted or freed); NULL for NULL */
int64_t kiln_prefix_samples(const kiln_prefix* prefix);
int32_t kiln_prefix_token(const kiln_prefix* prefix, int64_t i);
float kiln_prefix_token_logp(const kiln_prefix* prefix, int64_t i);
int64_t kiln_prefix_next_pos(const kiln_prefix* prefix);
const float* kiln_prefix_logits(const kiln_prefix* prefix);

/* Frees a prefix that was not inserted. NULL is ignored. */
void kiln_prefix_free(kiln_prefix* prefix);

/* ---- decode slots ---------------------------------------------------------------------------- */

/* Why a request ended; set on its last token (kiln_slot_token.finish). */
enum {
  KILN_FINISH_NONE = 0,   /* not finished */
  KILN_FINISH_STOP = 1,   /* a stop token was produced (it is this token) */
  KILN_FINISH_LENGTH = 2, /* max_new_tokens reached */
  KILN_FINISH_CONTEXT = 3 /* the slot's context is full */
};

/* One token of a slot. */
typedef struct kiln_slot_token {
  int64_t slot;
  int32_t token;
  float logp; /* log-softmax of the raw logits at `token` */
  int finish; /* KILN_FINISH_*; once set, the slot stays busy (not advanced) until released */
} kiln_slot_token;

/* Copies the prefix's cache into the free slot `slot` and sets *first to the prefill's token
 * (whose finish may already end the request). On success the prefix is consumed: it is freed and
 * the handle must not be used again. On failure the caller still owns it, unchanged.
 * Errors: INVALID_ARGUMENT for NULL arguments, a slot out of range, or a prefix with more than
 * one sample (use kiln_bulk_insert); STATE for a busy slot. */
kiln_status kiln_insert(kiln_engine* engine, kiln_prefix* prefix, int64_t slot,
                        kiln_slot_token* first);

/* Sample i of a (multisampling) prefix into slots[i], n == kiln_prefix_samples(prefix) distinct
 * free slots; firsts[i] receives sample i's token. Consumes the prefix on success, as
 * kiln_insert; on failure no slot is touched and the caller still owns the prefix.
 * Errors: INVALID_ARGUMENT for NULL arguments, n different from the number of samples, a slot
 * out of range or given twice; STATE for a busy slot. */
kiln_status kiln_bulk_insert(kiln_engine* engine, kiln_prefix* prefix, const int64_t* slots,
                             size_t n, kiln_slot_token* firsts);

/* Advances every active slot (inserted and not finished) by one token in one batched pass and
 * writes their tokens to out[0..*n_out), one per active slot in slot order (*n_out = 0 when no
 * slot is active). `capacity` must be at least the number of active slots (kiln_slots always
 * suffices); `out` may be NULL only when capacity is 0 and no slot is active.
 * Errors: INVALID_ARGUMENT for a NULL engine or n_out, or too small a capacity (checked before
 * any slot advances); IO for a non-finite logit (the message names the slot and position; no
 * slot advances); INTERNAL for another failure inside the forward pass. */
kiln_status kiln_generate(kiln_engine* engine, kiln_slot_token* out, size_t capacity,
                          size_t* n_out);

/* Frees a busy slot (finished or not); it can then take a new prefix.
 * Errors: INVALID_ARGUMENT for a NULL engine or a slot out of range; STATE for a free slot. */
kiln_status kiln_release(kiln_engine* engine, int64_t slot);

/* ---- serving a list of requests -------------------------------------------------------------- */

/* One request of kiln_run: the prompt tokens[0..n_tokens) on `adapter`, a loaded run-time adapter
 * (NULL or "": the base weights). */
typedef struct kiln_request {
  const int32_t* tokens;
  size_t n_tokens;
  const char* adapter;
} kiln_request;

/* What one request produced: n_tokens tokens (the prefill's first one included) and the
 * log-softmax of the raw logits at each, in arrays the library allocates (kiln_output_free), and
 * why it ended (KILN_FINISH_*, never NONE). */
typedef struct kiln_output {
  int32_t* tokens;
  float* logprobs;
  size_t n_tokens;
  int finish;
} kiln_output;

/* The timings of one kiln_run. */
typedef struct kiln_run_stats {
  double prefill_seconds; /* in prefills */
  double decode_seconds;  /* in batched decode steps */
  int64_t prompt_tokens;
  int64_t generated_tokens; /* every output token, the prefills' first ones included */
  int64_t decoded_tokens;   /* the tokens of the decode steps */
} kiln_run_stats;

/* Serves requests[0..n_requests) with `sampling` by continuous batching over the engine's slots,
 * with the runner of `kiln run --prompts-file`: whenever slots are free the next requests are
 * prefilled (one by one) and inserted, every step advances all active slots in one batched pass,
 * and a finished request frees its slot. Every slot must be free when it is called, and is free
 * again when it returns. On success out[i] is request i's output (free each with
 * kiln_output_free) and *stats, unless stats is NULL, the timings. On failure every out[i] is
 * zeroed (nothing to free).
 * Errors: INVALID_ARGUMENT for NULL arguments (stats excepted), n_requests == 0, or a request
 * kiln_prefill would refuse (checked for every request before any runs; the message names the
 * request's index); STATE for a busy slot or an adapter that is not loaded; IO for a non-finite
 * logit (the message names the request and the position); INTERNAL for out of memory. */
kiln_status kiln_run(kiln_engine* engine, const kiln_request* requests, size_t n_requests,
                     const kiln_sampling* sampling, kiln_output* out, kiln_run_stats* stats);

/* Frees the arrays of an output of kiln_run and zeroes it. NULL is ignored. */
void kiln_output_free(kiln_output* out);

/* ---- run-time LoRA adapters ------------------------------------------------------------------ */

/* Maps the artifact's run-time adapter `name` (added by `kiln export --lora-name` or
 * `kiln adapter add`; the manifest is re-read, so adapters added after open are found) and
 * verifies it (with the engine's verify_checksums, every checksum); prefills may then name it.
 * Loading a loaded adapter again does nothing. Errors: INVALID_ARGUMENT for NULL arguments or an
 * empty name; IO when the artifact has no such adapter or its files are missing or corrupt;
 * INTERNAL for out of memory. */
kiln_status kiln_load_adapter(kiln_engine* engine, const char* name);

/* Unmaps a loaded adapter. Prefixes made with it keep it alive until inserted or freed.
 * Errors: INVALID_ARGUMENT for NULL arguments; STATE when it is not loaded or a busy slot uses
 * it (release the slot first). */
kiln_status kiln_unload_adapter(kiln_engine* engine, const char* name);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KILN_H */
