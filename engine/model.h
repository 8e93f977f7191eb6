// A model ready to compute: the verified artifact plus weights prepared for the matmul kernels.
// One subclass per model family, each with its forward pass in one readable file
// (engine/llama.cpp for Llama 2/3/3.1, Mistral, Qwen3; engine/deepseek.cpp for DeepSeek V2/V3 and
// Kimi K2).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/zeroed_vector.h"
#include "engine/artifact.h"
#include "engine/lora.h"
#include "engine/ops/matmul.h"
#include "engine/thread_governor.h"

namespace kiln {

struct ModelOptions {
  int threads = 0;  // 0 → every core
  // Check the manifest's checksum and every tensor's CRC-32C before any of it is computed with
  // (each tensor in the pass that first reads it: its re-layout, or the check itself when used in
  // place). false: only the structure is checked and damaged weights go unnoticed.
  bool verify_checksums = true;
  // Copy weights once into the matmul kernels' preferred layout (anonymous, huge-page memory).
  // Ignored — weights used in place from the mapping — when the artifact exceeds 70 % of the
  // machine's physical memory.
  bool relayout = true;
  int64_t max_chunk = 512;  // prefill processes at most this many tokens per pass
  // The most rows a decode step runs (the engine's slots; 0: max_chunk). Matrix-product
  // primitives up to this many rows are created at open, the larger ones by the first prefill
  // that needs them: decode never creates one, and a short first prompt waits for none.
  int64_t decode_rows = 0;
  // Let each decode step (a pass of at most decode_rows rows) run on fewer than `threads` threads
  // when measured steps show fewer are faster: cores shared with other work, or a model too small
  // for a second thread to pay (engine/thread_governor.h). false: always `threads`.
  bool adapt_threads = true;
};

// A forward pass produced a NaN or ±inf logit: damaged weights (an artifact opened without
// verification), or values that overflow bf16. `sequence` is the step of forward_batch (0 for
// forward; Engine re-throws it as the slot of generate() or the index of the prompt), `position`
// the position in that sequence whose logits are not finite (the first computed); the message
// names the position after `sequence_name` ("slot 2", "prompt 3"; may be empty). The pass that
// produced it advanced no cache (the earlier chunks of a prompt longer than max_chunk stay).
class NonFiniteError : public Error {
 public:
  NonFiniteError(const std::string& sequence_name, int64_t sequence, int64_t position)
      : Error((sequence_name.empty() ? std::string() : sequence_name + ", ") + "position " +
              std::to_string(position) + ": non-finite logit (NaN or inf; damaged weights?)"),
        sequence_(sequence),
        position_(position) {}
  int64_t sequence() const { return sequence_; }
  int64_t position() const { return position_; }

 private:
  int64_t sequence_, position_;
};

// The attention cache of one sequence, bf16, one buffer per layer, each [heads, capacity, row]:
// head-major, so that attention streams one contiguous run per kv head. The layout belongs to the
// model family that made it (Model::new_cache):
//   Llama:    k and v, each [kv_heads, capacity, head_dim].
//   DeepSeek: k only, [1, capacity, kv_lora_rank + qk_rope_head_dim] rows of the normalised latent
//             and the roped shared key (MLA's compressed cache); v is empty.
struct KvCache {
  int64_t capacity = 0;
  int64_t heads = 1;
  int64_t length = 0;  // positions filled
  // Zero pages until written (common/zeroed_vector.h): a cache costs what its positions use.
  std::vector<ZeroedVector<uint16_t>> k, v;
};

// Copies the first src.length positions of `src` into `dst` (same model, dst.capacity ≥
// src.length) and sets dst.length; Engine::insert moves a prefilled prompt into its slot with it.
void copy_cache(const KvCache& src, KvCache& dst);

// One sequence's share of a batched forward pass (Model::forward_batch).
struct SequenceStep {
  std::span<const int32_t> tokens;
  KvCache* cache = nullptr;
  const LoraAdapter* adapter = nullptr;  // nullptr: the base weights alone
};

// Where Model::open spent its time in its named phases (kiln bench's start-up). They are
// disjoint; the rest of the open (the families' own preparation, buffers) is what they leave of
// the caller's measured total.
struct StartupTimes {
  double open_seconds = 0;       // manifest, mappings, structure checks (Artifact::open)
  double verify_seconds = 0;     // checksums of every tensor
  double relayout_seconds = 0;   // weights copied into oneDNN's blocked layout
  double primitive_seconds = 0;  // oneDNN primitives (or cache hits) and their scratchpad
};

class Model {
 public:
  static std::unique_ptr<Model> open(const std::string& dir, const ModelOptions& opt = {});
  virtual ~Model() = default;

  const Artifact& artifact() const { return *artifact_; }
  const ModelConfig& config() const { return artifact_->config(); }
  const StartupTimes& startup_times() const { return startup_; }
  // The threads decode steps run on now (≤ the engine's threads; see ModelOptions::adapt_threads).
  int decode_threads() const { return governor_.current(); }

  // An empty cache for `capacity` positions in this model's layout (see KvCache).
  virtual KvCache new_cache(int64_t capacity) const;
  // Bytes the cache holds per position, summed over the layers.
  virtual int64_t kv_bytes_per_token() const;

  // Runs tokens at positions [cache.length, cache.length + n) of one sequence, appending their
  // keys/values to `cache`. Writes f32 logits for every position ([n, vocab]) if `all_logits`,
  // else only for the last one ([vocab]). Allocates nothing.
  // Throws kiln::Error for token ids outside the vocabulary, a sequence longer than the cache or
  // max_target_length, or a cache from another model's new_cache(); NonFiniteError when a logit
  // it computes is NaN or ±inf.
  // With `adapter`, every projection it adapts computes x·W + s·(x·A)·B.
  void forward(std::span<const int32_t> tokens, KvCache& cache, float* logits, bool all_logits,
               const LoraAdapter* adapter = nullptr);

  // Several sequences in one pass (continuous batching): each step's tokens go to positions
  // [cache.length, + n) of its own cache and attend only to that cache; the projections of all
  // rows run as one batched matmul, each row with its own adapter (or none). Writes the logits of
  // each step's last token to logits[i · vocab]. At most max_chunk() tokens in all, distinct
  // caches. Allocates nothing. Throws like forward().
  void forward_batch(std::span<const SequenceStep> steps, float* logits);
  int64_t max_chunk() const { return chunk_; }

  // Sizes the LoRA scratch for adapters up to `rank` (call before running such an adapter;
  // Engine does it when it loads one). Not on the per-token path.
  virtual void reserve_lora(int64_t rank);

  // Calibration for QK-Clip: while set, forward() raises max[layer · H + head] to every
  // pre-softmax attention logit it computes (after the softmax scale, unmasked positions only).
  // nullptr (the default) turns it off.
  void record_max_logits(float* max) { max_logits_ = max; }

 protected:
  Model(std::unique_ptr<Artifact> a, int64_t max_chunk);

  // The rows of one pass (≤ chunk_), already validated: row t is token[t] at position pos[t] of
  // sequence cache[t], run with adapter[t] (nullptr: none). Logits are written for the rows
  // logit_row[0 .. n_logits), in that order.
  struct Rows {
    int64_t n = 0;
    const int32_t* token = nullptr;
    const int64_t* pos = nullptr;
    KvCache* const* cache = nullptr;
    const LoraAdapter* const* adapter = nullptr;
    bool any_adapter = false;
    const int64_t* logit_row = nullptr;
    int64_t n_logits = 0;
  };
  // One family's forward pass over `rows`; appends each row's key/value at its position of its
  // cache (the caller advances the caches' lengths).
  virtual void forward_rows(const Rows& rows, float* logits) = 0;

  // y[t] += s·(x[t]·A)·B for every row t whose adapter adapts (layer, slot); x [n, in] bf16,
  // y [n, out] f32 (row strides in, out). Rows without an adapter are untouched.
  void apply_lora(const Rows& rows, int64_t layer, LoraSlot slot, const uint16_t* x,
                  float* y) const;

  // Throws if `cache` was not made by this model's new_cache().
  virtual void check_cache(const KvCache& cache) const;

  // A Linear over tensor `name` of `blob` (of `shape`, viewed as [K, N]), the tensor's checksum
  // computed by the Linear's re-layout pass when it has one, else checked here: either way before
  // anything is computed with it, and its bytes read from memory once.
  ops::Linear checked_linear(const BlobView& blob, const std::string& name,
                             const std::vector<int64_t>& shape, int64_t K, int64_t N,
                             ops::LinearOptions lo) const;
  // The same for `batch` matrices [K, N] stacked in one tensor (a MoE layer's experts), one
  // Linear each: the tensor's checksum is its slices' CRCs joined in order when every re-layout
  // computed one, else the tensor is checked on its own. checked_linear is the case batch = 1.
  std::vector<ops::Linear> checked_stacked_linears(const BlobView& blob, const std::string& name,
                                                   const std::vector<int64_t>& shape, int64_t K,
                                                   int64_t N, int64_t batch,
                                                   ops::LinearOptions lo) const;

  // MaxText's output head: bf16 logits, divided by sqrt(emb_dim) for a normalised tied head, then
  // the optional soft cap, then f32 (docs/maxtext.md §2.1). `n` logits, whole rows of the
  // vocabulary; the first one that is not finite is recorded for forward()/forward_batch() to
  // report.
  void finish_logits(float* logits, int64_t n);

  std::unique_ptr<Artifact> artifact_;
  int64_t chunk_;  // prefill processes at most this many tokens per pass
  float* max_logits_ = nullptr;
  // The worker threads of every pass, set on the calling thread at the start of each forward
  // (OpenMP's thread count is per calling thread, so engines on different threads keep theirs).
  int threads_ = 1;
  int64_t decode_rows_ = 0;  // passes of at most this many rows are governed decode steps
  ThreadGovernor governor_{1, false};
  // Where this model's matrix products run (its oneDNN stream and scratchpad): the families build
  // their Linears with it, so two models run their passes at the same time on two threads.
  ops::MatmulContext matmul_context_;

 private:
  StartupTimes startup_;
  void validate(std::span<const int32_t> tokens, const KvCache& cache) const;
  // Throws NonFiniteError if the last forward_rows recorded a non-finite logit.
  void check_finite(const Rows& rows, bool batch) const;
  // forward_rows on the threads the governor picks for a decode step, on threads_ otherwise.
  void run_pass(const Rows& rows, float* logits);
  int64_t lora_dim() const;  // the widest input or output of any adaptable projection

  // Per-row descriptors of one pass, sized chunk_ at construction.
  std::vector<int32_t> row_token_;
  std::vector<int64_t> row_pos_, logit_rows_;
  std::vector<KvCache*> row_cache_;
  std::vector<const LoraAdapter*> row_adapter_;
  // LoRA scratch (reserve_lora): f32 inputs, x·A, and (x·A)·B of a pass.
  mutable std::vector<float> lora_x_, lora_u_, lora_y_;
  int64_t lora_rank_ = 0;
  int64_t first_nonfinite_ = -1;  // index into the logits of the last pass, -1 when all finite
};

std::unique_ptr<Model> make_llama_model(std::unique_ptr<Artifact> artifact,
                                        const ModelOptions& opt);
std::unique_ptr<Model> make_deepseek_model(std::unique_ptr<Artifact> artifact,
                                           const ModelOptions& opt);

}  // namespace kiln
