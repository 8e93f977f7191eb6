/* Contract checks of the C API (include/kiln/kiln.h) on an exported artifact, run by
 * tests/e2e/test_c_api.py: status codes and messages for bad arguments and states, prefix
 * ownership, accessors, multisampling, packed prefill, kiln_run and adapters.
 *
 * Usage: kiln_c_api_check ARTIFACT [ADAPTER]   (ADAPTER: a run-time adapter of the artifact)
 *        kiln_c_api_check --damaged ARTIFACT NEEDLE [RUN_NEEDLE]
 *            (a damaged artifact: refused by default with KILN_ERROR_IO naming NEEDLE; with
 *            verify_checksums = 0 it opens and the prompt 1,2,3 runs -- or, given RUN_NEEDLE
 *            (a NaN weight), fails with KILN_ERROR_IO naming it)
 * Prints one line per failed check and "N checks, M failed"; exits 1 if any failed. */
#include <kiln/kiln.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int n_checks = 0, n_failed = 0;

static void check(int ok, const char* what, int line) {
  ++n_checks;
  if (!ok) {
    ++n_failed;
    printf("FAILED (line %d): %s; last error: %s\n", line, what, kiln_last_error());
  }
}
#define CHECK(cond) check((cond) != 0, #cond, __LINE__)
/* `call` returns `status` and the message contains `needle`. */
#define EXPECT(call, status, needle)                                                     \
  do {                                                                                   \
    kiln_status st_ = (call);                                                            \
    check(st_ == (status), #call " -> " #status, __LINE__);                              \
    check(strstr(kiln_last_error(), (needle)) != NULL, #call ": message names " #needle, \
          __LINE__);                                                                     \
  } while (0)

static double log_softmax_at(const float* logits, int64_t vocab, int32_t id) {
  double m = logits[0], sum = 0;
  int64_t i;
  for (i = 1; i < vocab; ++i)
    if (logits[i] > m) m = logits[i];
  for (i = 0; i < vocab; ++i) sum += exp((double)logits[i] - m);
  return (double)logits[id] - m - log(sum);
}

static int report(void) {
  printf("%d checks, %d failed\n", n_checks, n_failed);
  return n_failed ? 1 : 0;
}

/* A damaged artifact: refused by default (KILN_ERROR_IO naming `needle`); opened with
 * verify_checksums = 0, the prompt 1,2,3 runs, or fails with KILN_ERROR_IO naming `run_needle`
 * when given (a NaN weight). */
static int check_damaged(const char* art, const char* needle, const char* run_needle) {
  kiln_engine_options opt;
  kiln_engine* e = NULL;
  kiln_prefix* p = NULL;
  kiln_sampling greedy;
  int32_t prompt[3] = {1, 2, 3};
  kiln_engine_options_default(&opt);
  kiln_sampling_default(&greedy);
  CHECK(opt.verify_checksums == 1);
  EXPECT(kiln_open(art, &opt, &e), KILN_ERROR_IO, needle);
  CHECK(e == NULL);
  opt.verify_checksums = 0; /* the caller accepts the risk */
  if (kiln_open(art, &opt, &e) != KILN_OK) {
    printf("FAILED: kiln_open(%s) with verify_checksums = 0: %s\n", art, kiln_last_error());
    return 1;
  }
  if (run_needle) {
    EXPECT(kiln_prefill(e, prompt, 3, &greedy, NULL, &p), KILN_ERROR_IO, run_needle);
    CHECK(p == NULL);
  } else {
    CHECK(kiln_prefill(e, prompt, 3, &greedy, NULL, &p) == KILN_OK);
    CHECK(p != NULL && isfinite(kiln_prefix_token_logp(p, 0)));
  }
  kiln_prefix_free(p);
  kiln_close(e);
  return report();
}

int main(int argc, char** argv) {
  const char* art;
  char missing[4096];
  kiln_engine_options opt;
  kiln_sampling greedy, weighted, bad;
  kiln_engine* e = NULL;
  kiln_prefix *p = NULL, *q = NULL, *multi = NULL, *single = NULL;
  kiln_prefix* concat[3];
  kiln_slot_token first, firsts[2], step[4];
  int32_t prompt[6] = {3, 1, 4, 1, 5, 9}, prompt2[3] = {2, 7, 1}, oov[2] = {1, 0};
  const int32_t* tokens[3];
  size_t lengths[3], n_out = 99;
  int64_t vocab, slots2[2];
  int i;

  if ((argc == 4 || argc == 5) && strcmp(argv[1], "--damaged") == 0)
    return check_damaged(argv[2], argv[3], argc == 5 ? argv[4] : NULL);
  if (argc != 2 && argc != 3) {
    fprintf(stderr,
            "usage: kiln_c_api_check ARTIFACT [ADAPTER] | --damaged ARTIFACT NEEDLE "
            "[RUN_NEEDLE]\n");
    return 2;
  }
  art = argv[1];
  snprintf(missing, sizeof missing, "%s/does-not-exist", art);
  kiln_engine_options_default(&opt);
  kiln_sampling_default(&greedy);
  CHECK(opt.slots == 1 && opt.threads == 0 && opt.max_seq_len == 0 && opt.relayout == 1 &&
        opt.verify_checksums == 1);
  CHECK(greedy.algorithm == KILN_SAMPLING_GREEDY && greedy.temperature == 1.0f &&
        greedy.top_p == 1.0f && greedy.top_k == 0 && greedy.max_new_tokens == 0 &&
        greedy.stop_tokens == NULL && greedy.n_stop_tokens == 0);
  CHECK(strcmp(kiln_status_name(KILN_ERROR_STATE), "invalid state") == 0);
  CHECK(strcmp(kiln_last_error(), "") == 0);

  /* --- versions and option structs that grow ------------------------------------------------ */
  CHECK(kiln_api_version() / 1000 == KILN_API_VERSION_MAJOR &&
        kiln_api_version() % 1000 >= KILN_API_VERSION_MINOR);
  CHECK(kiln_version() != NULL && kiln_version()[0] != '\0');
  CHECK(opt.struct_size == sizeof opt && greedy.struct_size == sizeof greedy);
  {
    kiln_engine_options older, unset;
    struct {
      kiln_engine_options o;
      int64_t future; /* a field of a later minor version */
    } newer;
    /* An older caller's struct ends before verify_checksums: the library uses its default. */
    kiln_engine_options_init(&older, offsetof(kiln_engine_options, verify_checksums));
    CHECK(older.struct_size == offsetof(kiln_engine_options, verify_checksums));
    CHECK(kiln_open(art, &older, &e) == KILN_OK);
    kiln_close(e);
    e = NULL;
    /* A newer caller's struct: fields this library does not know must be zero. */
    kiln_engine_options_init(&newer.o, sizeof newer);
    CHECK(newer.o.struct_size == sizeof newer && newer.future == 0);
    CHECK(kiln_open(art, &newer.o, &e) == KILN_OK);
    kiln_close(e);
    e = NULL;
    newer.future = 7;
    EXPECT(kiln_open(art, &newer.o, &e), KILN_ERROR_INVALID_ARGUMENT, "does not know");
    CHECK(e == NULL);
    /* Filled by hand without struct_size. */
    memset(&unset, 0, sizeof unset);
    unset.slots = 1;
    EXPECT(kiln_open(art, &unset, &e), KILN_ERROR_INVALID_ARGUMENT, "struct_size");
    CHECK(e == NULL);
  }

  /* --- open ---------------------------------------------------------------------------------- */
  EXPECT(kiln_open(NULL, &opt, &e), KILN_ERROR_INVALID_ARGUMENT, "dir is NULL");
  EXPECT(kiln_open(art, NULL, &e), KILN_ERROR_INVALID_ARGUMENT, "options is NULL");
  EXPECT(kiln_open(art, &opt, NULL), KILN_ERROR_INVALID_ARGUMENT, "out is NULL");
  EXPECT(kiln_open(missing, &opt, &e), KILN_ERROR_IO, missing);
  opt.slots = 0;
  EXPECT(kiln_open(art, &opt, &e), KILN_ERROR_INVALID_ARGUMENT, "slots");
  opt.slots = 2;
  opt.max_seq_len = 1 << 30;
  EXPECT(kiln_open(art, &opt, &e), KILN_ERROR_INVALID_ARGUMENT, "max_target_length");
  opt.max_seq_len = 0;
  /* Threads are capped before the OpenMP runtime sees them (100000 crashed inside it). */
  opt.threads = 100000;
  EXPECT(kiln_open(art, &opt, &e), KILN_ERROR_INVALID_ARGUMENT, "threads must be in [0, 1024]");
  opt.threads = KILN_MAX_THREADS + 1;
  EXPECT(kiln_open(art, &opt, &e), KILN_ERROR_INVALID_ARGUMENT, "threads");
  opt.threads = -1;
  EXPECT(kiln_open(art, &opt, &e), KILN_ERROR_INVALID_ARGUMENT, "threads");
  opt.threads = 0;
  CHECK(e == NULL);
  if (kiln_open(art, &opt, &e) != KILN_OK) {
    printf("FAILED: kiln_open(%s): %s\n", art, kiln_last_error());
    return 1;
  }
  vocab = kiln_vocab_size(e);
  CHECK(vocab > 10 && kiln_slots(e) == 2 && kiln_max_seq_len(e) > 8);
  CHECK(kiln_vocab_size(NULL) == 0 && kiln_slots(NULL) == 0);
  oov[1] = (int32_t)vocab;

  /* --- prefill: bad arguments ---------------------------------------------------------------- */
  EXPECT(kiln_prefill(NULL, prompt, 6, &greedy, NULL, &p), KILN_ERROR_INVALID_ARGUMENT,
         "engine is NULL");
  EXPECT(kiln_prefill(e, NULL, 6, &greedy, NULL, &p), KILN_ERROR_INVALID_ARGUMENT,
         "tokens is NULL");
  EXPECT(kiln_prefill(e, prompt, 6, NULL, NULL, &p), KILN_ERROR_INVALID_ARGUMENT,
         "sampling is NULL");
  EXPECT(kiln_prefill(e, prompt, 0, &greedy, NULL, &p), KILN_ERROR_INVALID_ARGUMENT, "empty");
  EXPECT(kiln_prefill(e, oov, 2, &greedy, NULL, &p), KILN_ERROR_INVALID_ARGUMENT,
         "outside the vocabulary");
  bad = greedy;
  bad.algorithm = KILN_SAMPLING_TOPK;
  EXPECT(kiln_prefill(e, prompt, 6, &bad, NULL, &p), KILN_ERROR_INVALID_ARGUMENT, "top_k");
  bad.algorithm = (kiln_sampling_algorithm)17;
  EXPECT(kiln_prefill(e, prompt, 6, &bad, NULL, &p), KILN_ERROR_INVALID_ARGUMENT, "algorithm");
  bad = greedy;
  bad.n_stop_tokens = 2;
  EXPECT(kiln_prefill(e, prompt, 6, &bad, NULL, &p), KILN_ERROR_INVALID_ARGUMENT,
         "stop_tokens is NULL");
  bad.stop_tokens = oov;
  EXPECT(kiln_prefill(e, prompt, 6, &bad, NULL, &p), KILN_ERROR_INVALID_ARGUMENT, "stop token");
  bad.n_stop_tokens = SIZE_MAX; /* a wrong count, refused before the array is read */
  EXPECT(kiln_prefill(e, prompt, 6, &bad, NULL, &p), KILN_ERROR_INVALID_ARGUMENT,
         "exceeds the vocabulary size");
  EXPECT(kiln_prefill(e, prompt, 6, &greedy, "no-such-adapter", &p), KILN_ERROR_STATE,
         "no-such-adapter");
  EXPECT(kiln_prefill_multisampling(e, prompt, 6, 0, &greedy, NULL, &p),
         KILN_ERROR_INVALID_ARGUMENT, "n_samples");
  /* Sizes from the caller are checked before anything is read or run: a length of 2^63 is not a
   * negative number (the array holds 6 tokens), 10^12 samples would run for minutes, and each
   * sample needs a slot of its own. */
  EXPECT(kiln_prefill(e, prompt, (size_t)1 << 63, &greedy, NULL, &p), KILN_ERROR_INVALID_ARGUMENT,
         "prompt has 9223372036854775808 tokens, longer than the context");
  EXPECT(kiln_prefill(e, prompt, SIZE_MAX, &greedy, NULL, &p), KILN_ERROR_INVALID_ARGUMENT,
         "longer than the context");
  EXPECT(kiln_prefill_multisampling(e, prompt, 6, 1000000000000LL, &greedy, NULL, &p),
         KILN_ERROR_INVALID_ARGUMENT, "n_samples must be in [1, 2]");
  EXPECT(kiln_prefill_multisampling(e, prompt, 6, 3, &greedy, NULL, &p),
         KILN_ERROR_INVALID_ARGUMENT, "n_samples");
  CHECK(p == NULL);

  /* --- prefill, accessors, insert ------------------------------------------------------------ */
  CHECK(kiln_prefill(e, prompt, 6, &greedy, "", &p) == KILN_OK);
  CHECK(kiln_prefix_samples(p) == 1 && kiln_prefix_next_pos(p) == 6);
  CHECK(kiln_prefix_token(p, 0) >= 0 && kiln_prefix_token(p, 0) < vocab);
  CHECK(kiln_prefix_token(p, 1) == -1 && isnan(kiln_prefix_token_logp(p, 1)));
  CHECK(kiln_prefix_logits(p) != NULL && kiln_prefix_logits(NULL) == NULL);
  CHECK(fabs(log_softmax_at(kiln_prefix_logits(p), vocab, kiln_prefix_token(p, 0)) -
             kiln_prefix_token_logp(p, 0)) < 1e-4);
  {
    const float* l = kiln_prefix_logits(p);
    int32_t best = 0;
    int64_t k;
    for (k = 1; k < vocab; ++k)
      if (l[k] > l[best]) best = (int32_t)k;
    CHECK(kiln_prefix_token(p, 0) == best); /* greedy */
  }
  EXPECT(kiln_insert(e, p, 2, &first), KILN_ERROR_INVALID_ARGUMENT, "slot 2");
  EXPECT(kiln_insert(e, p, -1, &first), KILN_ERROR_INVALID_ARGUMENT, "slot -1");
  EXPECT(kiln_insert(e, NULL, 0, &first), KILN_ERROR_INVALID_ARGUMENT, "prefix is NULL");
  CHECK(kiln_prefix_samples(p) == 1); /* still owned after a failed insert */
  CHECK(kiln_insert(e, p, 0, &first) == KILN_OK);
  p = NULL; /* consumed */
  CHECK(first.slot == 0 && first.finish == KILN_FINISH_NONE);
  CHECK(kiln_prefill(e, prompt2, 3, &greedy, NULL, &q) == KILN_OK);
  EXPECT(kiln_insert(e, q, 0, &first), KILN_ERROR_STATE, "busy");
  EXPECT(kiln_release(e, 1), KILN_ERROR_STATE, "not in use");
  EXPECT(kiln_release(e, 5), KILN_ERROR_INVALID_ARGUMENT, "slot 5");
  EXPECT(kiln_release(NULL, 0), KILN_ERROR_INVALID_ARGUMENT, "engine is NULL");

  /* --- generate ------------------------------------------------------------------------------ */
  EXPECT(kiln_generate(e, step, 0, &n_out), KILN_ERROR_INVALID_ARGUMENT, "capacity");
  EXPECT(kiln_generate(e, step, 4, NULL), KILN_ERROR_INVALID_ARGUMENT, "n_out is NULL");
  CHECK(kiln_generate(e, step, 4, &n_out) == KILN_OK);
  CHECK(n_out == 1 && step[0].slot == 0 && step[0].token >= 0 && step[0].logp <= 0);
  CHECK(kiln_insert(e, q, 1, &first) == KILN_OK);
  q = NULL;
  CHECK(kiln_generate(e, step, 2, &n_out) == KILN_OK);
  CHECK(n_out == 2 && step[0].slot == 0 && step[1].slot == 1); /* slot order */
  CHECK(kiln_release(e, 0) == KILN_OK && kiln_release(e, 1) == KILN_OK);
  CHECK(kiln_generate(e, NULL, 0, &n_out) == KILN_OK && n_out == 0);

  /* --- stop tokens and max_new_tokens -------------------------------------------------------- */
  {
    kiln_sampling s = greedy;
    int32_t stop_id;
    CHECK(kiln_prefill(e, prompt, 6, &greedy, NULL, &p) == KILN_OK);
    stop_id = kiln_prefix_token(p, 0);
    kiln_prefix_free(p);
    p = NULL;
    s.stop_tokens = &stop_id;
    s.n_stop_tokens = 1;
    CHECK(kiln_prefill(e, prompt, 6, &s, NULL, &p) == KILN_OK);
    CHECK(kiln_insert(e, p, 1, &first) == KILN_OK);
    p = NULL;
    CHECK(first.finish == KILN_FINISH_STOP && first.token == stop_id);
    CHECK(kiln_generate(e, step, 2, &n_out) == KILN_OK && n_out == 0); /* finished: not advanced */
    CHECK(kiln_release(e, 1) == KILN_OK);
    s = greedy;
    s.max_new_tokens = 2;
    CHECK(kiln_prefill(e, prompt, 6, &s, NULL, &p) == KILN_OK);
    CHECK(kiln_insert(e, p, 0, &first) == KILN_OK && first.finish == KILN_FINISH_NONE);
    p = NULL;
    CHECK(kiln_generate(e, step, 2, &n_out) == KILN_OK && n_out == 1 &&
          step[0].finish == KILN_FINISH_LENGTH);
    CHECK(kiln_release(e, 0) == KILN_OK);
  }

  /* --- multisampling and bulk insert --------------------------------------------------------- */
  kiln_sampling_default(&weighted);
  weighted.algorithm = KILN_SAMPLING_WEIGHTED;
  weighted.temperature = 2.0f;
  weighted.seed = 1234;
  CHECK(kiln_prefill_multisampling(e, prompt, 6, 2, &weighted, NULL, &multi) == KILN_OK);
  CHECK(kiln_prefill(e, prompt, 6, &weighted, NULL, &single) == KILN_OK);
  CHECK(kiln_prefix_samples(multi) == 2);
  CHECK(kiln_prefix_token(multi, 0) == kiln_prefix_token(single, 0)); /* sample 0 = the seed */
  EXPECT(kiln_insert(e, multi, 0, &first), KILN_ERROR_INVALID_ARGUMENT, "kiln_bulk_insert");
  slots2[0] = 1;
  slots2[1] = 1;
  EXPECT(kiln_bulk_insert(e, multi, slots2, 1, firsts), KILN_ERROR_INVALID_ARGUMENT, "samples");
  EXPECT(kiln_bulk_insert(e, multi, slots2, 2, firsts), KILN_ERROR_INVALID_ARGUMENT, "twice");
  CHECK(kiln_insert(e, single, 0, &first) == KILN_OK);
  single = NULL;
  slots2[0] = 0;
  EXPECT(kiln_bulk_insert(e, multi, slots2, 2, firsts), KILN_ERROR_STATE, "busy");
  CHECK(kiln_release(e, 0) == KILN_OK);
  slots2[0] = 1;
  slots2[1] = 0;
  CHECK(kiln_bulk_insert(e, multi, slots2, 2, firsts) == KILN_OK);
  multi = NULL;
  CHECK(firsts[0].slot == 1 && firsts[1].slot == 0);
  CHECK(kiln_generate(e, step, 2, &n_out) == KILN_OK && n_out == 2);
  CHECK(kiln_release(e, 0) == KILN_OK && kiln_release(e, 1) == KILN_OK);

  /* --- packed prefill ------------------------------------------------------------------------ */
  {
    kiln_sampling ss[3];
    const char* ads[3] = {NULL, "", NULL};
    ss[0] = greedy;
    ss[1] = greedy;
    ss[2] = greedy;
    tokens[0] = prompt;
    lengths[0] = 6;
    tokens[1] = prompt2;
    lengths[1] = 3;
    tokens[2] = oov;
    lengths[2] = 2;
    EXPECT(kiln_prefill_concat(e, 3, tokens, lengths, ss, NULL, concat),
           KILN_ERROR_INVALID_ARGUMENT, "prompt 2");
    CHECK(concat[0] == NULL && concat[1] == NULL && concat[2] == NULL);
    EXPECT(kiln_prefill_concat(e, 0, tokens, lengths, ss, NULL, concat),
           KILN_ERROR_INVALID_ARGUMENT, "no prompts");
    lengths[1] = (size_t)1 << 63;
    EXPECT(kiln_prefill_concat(e, 2, tokens, lengths, ss, NULL, concat),
           KILN_ERROR_INVALID_ARGUMENT, "prompt 1: prompt has 9223372036854775808 tokens");
    CHECK(concat[0] == NULL && concat[1] == NULL);
    lengths[1] = 3;
    CHECK(kiln_prefill_concat(e, 2, tokens, lengths, ss, ads, concat) == KILN_OK);
    CHECK(kiln_prefill(e, prompt2, 3, &greedy, NULL, &p) == KILN_OK);
    CHECK(kiln_prefix_next_pos(concat[0]) == 6 && kiln_prefix_next_pos(concat[1]) == 3);
    CHECK(kiln_prefix_token(concat[1], 0) == kiln_prefix_token(p, 0));
    {
      const float *a = kiln_prefix_logits(concat[1]), *b = kiln_prefix_logits(p);
      double worst = 0;
      int64_t k;
      for (k = 0; k < vocab; ++k)
        if (fabs((double)a[k] - b[k]) > worst) worst = fabs((double)a[k] - b[k]);
      CHECK(worst < 1e-3);
    }
    for (i = 0; i < 2; ++i) kiln_prefix_free(concat[i]);
    kiln_prefix_free(p);
    p = NULL;
  }

  /* --- kiln_run: a list of requests, continuous batching -------------------------------------- */
  {
    kiln_request reqs[3];
    kiln_output outs[3];
    kiln_run_stats stats;
    kiln_sampling s = greedy;
    s.max_new_tokens = 4;
    reqs[0].tokens = prompt;
    reqs[0].n_tokens = 6;
    reqs[0].adapter = NULL;
    reqs[1].tokens = prompt2;
    reqs[1].n_tokens = 3;
    reqs[1].adapter = "";
    reqs[2].tokens = oov;
    reqs[2].n_tokens = 2;
    reqs[2].adapter = NULL;
    EXPECT(kiln_run(e, reqs, 3, &s, outs, NULL), KILN_ERROR_INVALID_ARGUMENT, "request 2");
    CHECK(outs[0].tokens == NULL && outs[2].n_tokens == 0); /* zeroed on failure */
    EXPECT(kiln_run(e, reqs, 0, &s, outs, NULL), KILN_ERROR_INVALID_ARGUMENT, "no requests");
    EXPECT(kiln_run(e, NULL, 2, &s, outs, NULL), KILN_ERROR_INVALID_ARGUMENT, "requests is NULL");
    EXPECT(kiln_run(e, reqs, 2, &s, NULL, NULL), KILN_ERROR_INVALID_ARGUMENT, "out is NULL");
    CHECK(kiln_prefill(e, prompt2, 3, &greedy, NULL, &p) == KILN_OK);
    CHECK(kiln_insert(e, p, 1, &first) == KILN_OK);
    p = NULL;
    EXPECT(kiln_run(e, reqs, 2, &s, outs, NULL), KILN_ERROR_STATE, "busy");
    CHECK(kiln_release(e, 1) == KILN_OK);
    CHECK(kiln_run(e, reqs, 2, &s, outs, &stats) == KILN_OK);
    CHECK(outs[0].n_tokens == 4 && outs[1].n_tokens == 4);
    CHECK(outs[0].finish == KILN_FINISH_LENGTH && outs[1].finish == KILN_FINISH_LENGTH);
    CHECK(stats.prompt_tokens == 9 && stats.generated_tokens == 8 && stats.decoded_tokens == 6);
    /* request 1 is what it is alone: its prefill's greedy token first */
    CHECK(kiln_prefill(e, prompt2, 3, &greedy, NULL, &p) == KILN_OK);
    CHECK(outs[1].tokens[0] == kiln_prefix_token(p, 0));
    CHECK(fabs(outs[1].logprobs[0] - kiln_prefix_token_logp(p, 0)) < 1e-4);
    kiln_prefix_free(p);
    p = NULL;
    kiln_output_free(&outs[0]);
    kiln_output_free(&outs[1]);
    CHECK(outs[0].tokens == NULL && outs[0].logprobs == NULL && outs[0].n_tokens == 0);
    kiln_output_free(NULL);
  }

  /* --- adapters ------------------------------------------------------------------------------ */
  EXPECT(kiln_load_adapter(e, NULL), KILN_ERROR_INVALID_ARGUMENT, "name is NULL");
  EXPECT(kiln_load_adapter(e, "no-such-adapter"), KILN_ERROR_IO, "no-such-adapter");
  EXPECT(kiln_unload_adapter(e, "no-such-adapter"), KILN_ERROR_STATE, "not loaded");
  if (argc == 3) {
    const char* name = argv[2];
    CHECK(kiln_load_adapter(e, name) == KILN_OK);
    CHECK(kiln_load_adapter(e, name) == KILN_OK); /* again: no-op */
    CHECK(kiln_prefill(e, prompt, 6, &greedy, name, &p) == KILN_OK);
    CHECK(kiln_insert(e, p, 0, &first) == KILN_OK);
    p = NULL;
    EXPECT(kiln_unload_adapter(e, name), KILN_ERROR_STATE, "in use");
    CHECK(kiln_release(e, 0) == KILN_OK);
    CHECK(kiln_unload_adapter(e, name) == KILN_OK);
    EXPECT(kiln_prefill(e, prompt, 6, &greedy, name, &p), KILN_ERROR_STATE, "not loaded");
  }

  kiln_prefix_free(NULL);
  kiln_close(e);
  kiln_close(NULL);
  return report();
}
