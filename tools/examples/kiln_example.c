/* An example of embedding kiln through its C API (include/kiln/kiln.h): runs every prompt of a file
 * with continuous batching over a number of decode slots (kiln_run: the runner of
 * `kiln run --prompts-file`; greedy sampling, optional stop tokens), and prints one line per
 * request in input order:
 *
 *     tokens: t1,t2,... | logprobs: l1,l2,... | finish: length
 *
 * Usage: kiln_example ARTIFACT PROMPTS_FILE SLOTS MAX_TOKENS [STOP_IDS]
 *   PROMPTS_FILE: one request per line, "[@ADAPTER ]id,id,..." (blank lines are skipped);
 *   MAX_TOKENS: tokens per request, the prefill's first one included;
 *   STOP_IDS: "id,id,...": a request ends after producing one of them (`kiln run --stop`).
 * Exit status: 0 on success, 1 on an error (one line on stderr), 2 for bad usage. */
#include <errno.h>
#include <kiln/kiln.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct request {
  int32_t* prompt;
  size_t n_prompt;
  char* adapter; /* NULL: the base weights */
} request;

static const char* finish_name(int finish) {
  switch (finish) {
    case KILN_FINISH_STOP:
      return "stop";
    case KILN_FINISH_LENGTH:
      return "length";
    case KILN_FINISH_CONTEXT:
      return "context";
    default:
      return "";
  }
}

static void* grow(void* p, size_t* cap, size_t need, size_t elem) {
  size_t c = *cap ? *cap : 16;
  void* q;
  while (c < need) c *= 2;
  if (c == *cap) return p;
  q = realloc(p, c * elem);
  if (!q) {
    fprintf(stderr, "kiln_example: error: out of memory\n");
    exit(1);
  }
  *cap = c;
  return q;
}

/* Reads one line of any length into *buf (without the newline); returns 0 at the end of the
 * file. */
static int read_line(FILE* f, char** buf, size_t* cap) {
  size_t n = 0;
  int c;
  while ((c = fgetc(f)) != EOF && c != '\n') {
    *buf = grow(*buf, cap, n + 2, 1);
    (*buf)[n++] = (char)c;
  }
  if (c == EOF && n == 0) return 0;
  *buf = grow(*buf, cap, n + 1, 1);
  (*buf)[n] = '\0';
  return 1;
}

/* Appends the ids of "id,id,..." to *ids (*n of them, capacity *cap); returns 0 (with a
 * message naming `where` on stderr) on a syntax error. */
static int parse_ids(const char* where, const char* p, int32_t** ids, size_t* n, size_t* cap) {
  for (;;) {
    char* end;
    long v;
    while (*p == ' ' || *p == '\t' || *p == '\r') ++p;
    errno = 0;
    v = strtol(p, &end, 10);
    if (end == p || errno != 0 || v < INT32_MIN || v > INT32_MAX) {
      fprintf(stderr, "kiln_example: error: %s: expected a token id at '%s'\n", where, p);
      return 0;
    }
    *ids = grow(*ids, cap, *n + 1, sizeof(int32_t));
    (*ids)[(*n)++] = (int32_t)v;
    p = end;
    while (*p == ' ' || *p == '\t' || *p == '\r') ++p;
    if (*p == '\0') return 1;
    if (*p != ',') {
      fprintf(stderr, "kiln_example: error: %s: expected ',' at '%s'\n", where, p);
      return 0;
    }
    ++p;
  }
}

/* Parses "[@ADAPTER ]id,id,..." into r; returns 0 (with a message on stderr) on a syntax error. */
static int parse_request(const char* path, long line_no, char* line, request* r) {
  char* p = line;
  char where[4096];
  size_t cap = 0;
  snprintf(where, sizeof where, "%s:%ld", path, line_no);
  if (*p == '@') {
    char* name = ++p;
    while (*p && *p != ' ' && *p != '\t') ++p;
    if (!*p || p == name) {
      fprintf(stderr, "kiln_example: error: %s: '@ADAPTER' must be followed by token ids\n", where);
      return 0;
    }
    *p++ = '\0';
    r->adapter = malloc(strlen(name) + 1);
    if (!r->adapter) return 0;
    strcpy(r->adapter, name);
  }
  return parse_ids(where, p, &r->prompt, &r->n_prompt, &cap);
}

/* Reads every request of the prompts file; returns the count, or 0 on an error (reported). */
static size_t read_requests(const char* path, request** out) {
  /* Opening a FIFO for reading waits for a writer: only regular files are read. */
  struct stat st;
  FILE* f = NULL;
  if (stat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
    fprintf(stderr, "kiln_example: error: %s: not a regular file\n", path);
    return 0;
  }
  f = fopen(path, "r");
  char* buf = NULL;
  size_t buf_cap = 0, n = 0, cap = 0;
  long line_no = 0;
  request* reqs = NULL;
  if (!f) {
    fprintf(stderr, "kiln_example: error: %s: cannot open prompts file (%s)\n", path,
            strerror(errno));
    return 0;
  }
  while (read_line(f, &buf, &buf_cap)) {
    char* p = buf;
    ++line_no;
    while (*p == ' ' || *p == '\t' || *p == '\r') ++p;
    if (!*p) continue;
    reqs = grow(reqs, &cap, n + 1, sizeof(request));
    memset(&reqs[n], 0, sizeof(request));
    if (!parse_request(path, line_no, p, &reqs[n])) {
      size_t k;
      for (k = 0; k <= n; ++k) {
        free(reqs[k].prompt);
        free(reqs[k].adapter);
      }
      free(reqs);
      free(buf);
      fclose(f);
      *out = NULL;
      return 0;
    }
    ++n;
  }
  if (n == 0) fprintf(stderr, "kiln_example: error: %s: no prompts\n", path);
  free(buf);
  fclose(f);
  *out = reqs;
  return n;
}

static long parse_positive(const char* s, const char* what) {
  char* end;
  long v;
  errno = 0;
  v = strtol(s, &end, 10);
  if (end == s || *end || errno != 0 || v < 1 || v > (1L << 24)) {
    fprintf(stderr, "kiln_example: %s must be a positive integer, got '%s'\n", what, s);
    exit(2);
  }
  return v;
}

#define CHECK(call)                                                    \
  do {                                                                 \
    if ((call) != KILN_OK) {                                           \
      fprintf(stderr, "kiln_example: error: %s\n", kiln_last_error()); \
      goto done;                                                       \
    }                                                                  \
  } while (0)

int main(int argc, char** argv) {
  kiln_engine_options opt;
  kiln_sampling sampling;
  kiln_engine* engine = NULL;
  kiln_request* runs = NULL;
  kiln_output* outs = NULL;
  request* reqs = NULL;
  size_t n_reqs = 0, i;
  int32_t* stop = NULL;
  size_t n_stop = 0, stop_cap = 0;
  int rc = 1;

  if (argc != 5 && argc != 6) {
    fprintf(stderr, "usage: kiln_example ARTIFACT PROMPTS_FILE SLOTS MAX_TOKENS [STOP_IDS]\n");
    return 2;
  }
  kiln_engine_options_default(&opt);
  opt.slots = parse_positive(argv[3], "SLOTS");
  kiln_sampling_default(&sampling);
  sampling.algorithm = KILN_SAMPLING_GREEDY;
  sampling.max_new_tokens = parse_positive(argv[4], "MAX_TOKENS");
  if (argc == 6) {
    if (!parse_ids("STOP_IDS", argv[5], &stop, &n_stop, &stop_cap)) return 2;
    sampling.stop_tokens = stop;
    sampling.n_stop_tokens = n_stop;
  }

  n_reqs = read_requests(argv[2], &reqs);
  if (n_reqs == 0) goto done;

  CHECK(kiln_open(argv[1], &opt, &engine));
  for (i = 0; i < n_reqs; ++i)
    if (reqs[i].adapter) CHECK(kiln_load_adapter(engine, reqs[i].adapter));

  runs = malloc(n_reqs * sizeof(kiln_request));
  outs = calloc(n_reqs, sizeof(kiln_output));
  if (!runs || !outs) {
    fprintf(stderr, "kiln_example: error: out of memory\n");
    goto done;
  }
  for (i = 0; i < n_reqs; ++i) {
    runs[i].tokens = reqs[i].prompt;
    runs[i].n_tokens = reqs[i].n_prompt;
    runs[i].adapter = reqs[i].adapter;
  }
  CHECK(kiln_run(engine, runs, n_reqs, &sampling, outs, NULL));

  for (i = 0; i < n_reqs; ++i) {
    size_t k;
    printf("tokens: ");
    for (k = 0; k < outs[i].n_tokens; ++k) printf("%s%d", k ? "," : "", (int)outs[i].tokens[k]);
    printf(" | logprobs: ");
    for (k = 0; k < outs[i].n_tokens; ++k)
      printf("%s%.6f", k ? "," : "", (double)outs[i].logprobs[k]);
    printf(" | finish: %s\n", finish_name(outs[i].finish));
  }
  rc = 0;

done:
  kiln_close(engine);
  for (i = 0; reqs && i < n_reqs; ++i) {
    free(reqs[i].prompt);
    free(reqs[i].adapter);
    if (outs) kiln_output_free(&outs[i]);
  }
  free(reqs);
  free(runs);
  free(outs);
  free(stop);
  return rc;
}
