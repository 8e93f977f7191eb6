// Attention against straightforward scalar references written from the MaxText formulas
// (docs/maxtext.md §2.2, §11). Every check runs once per Highway target this CPU supports, so the
// SSSE3/SSE4/AVX2 code paths are exercised too, not only the AVX-512 one the machine dispatches to.
//
// The benchmark at the end is skipped by default: ops_tests --no-skip -tc='bench*'
#include "engine/ops/attention.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "common/bf16.h"
#include "common/error.h"
#include "tests/unit/ops_test_support.h"

namespace kiln::ops {
namespace {

using namespace kiln::ops::test;

// Element (s, kv, d) of the cache at kv · head_stride + s · stride + d.
struct AttnCase {
  int64_t n, H, K, D, stride, head_stride;
};

// Straight from MaxText's apply_attention_dot / compute_local_attention with default flags:
// bf16 logits, e = bf16(exp(l − max)), bf16 sum, out = bf16(bf16(Σ e·v) / sum).
std::vector<float> ref_attend(const std::vector<float>& q, const std::vector<uint16_t>& k,
                              const std::vector<uint16_t>& v, const AttnCase& c) {
  std::vector<float> out(size_t(c.H * c.D));
  std::vector<float> w(size_t(c.n));
  const int64_t G = c.H / c.K;
  for (int64_t h = 0; h < c.H; ++h) {
    const int64_t kv = h / G;
    for (int64_t s = 0; s < c.n; ++s) {
      float dot = 0.0f;
      for (int64_t d = 0; d < c.D; ++d) {
        dot +=
            q[size_t(h * c.D + d)] * bf16_to_f32(k[size_t(kv * c.head_stride + s * c.stride + d)]);
      }
      w[size_t(s)] = round_to_bf16(dot);
    }
    const float m = *std::max_element(w.begin(), w.end());
    float sum = 0.0f;
    for (auto& e : w) {
      e = round_to_bf16(std::exp(e - m));
      sum += e;
    }
    for (int64_t d = 0; d < c.D; ++d) {
      float acc = 0.0f;
      for (int64_t s = 0; s < c.n; ++s) {
        acc += w[size_t(s)] * bf16_to_f32(v[size_t(kv * c.head_stride + s * c.stride + d)]);
      }
      out[size_t(h * c.D + d)] = round_to_bf16(round_to_bf16(acc) / round_to_bf16(sum));
    }
  }
  return out;
}

// Values on a coarse grid (multiples of 1/8, q within ±1/4·…) keep every partial sum of q·k exact
// in f32, so kernel and reference see identical bf16 logits whatever the summation order; the
// remaining difference is exp (≤ 1 f32 ulp, rarely one bf16 step of one weight) and f32 sums.
struct AttnData {
  std::vector<float> q;
  std::vector<uint16_t> k, v;
};

AttnData make_attn_data(std::mt19937& rng, const AttnCase& c) {
  std::uniform_int_distribution<int> qd(-2, 2), kd(-8, 8), vd(-64, 64);
  AttnData a;
  a.q.resize(size_t(c.H * c.D));
  for (auto& x : a.q) x = float(qd(rng)) / 8.0f;
  const size_t cache = size_t((c.K - 1) * c.head_stride + (c.n - 1) * c.stride + c.D);
  a.k.assign(cache, f32_to_bf16(std::numeric_limits<float>::quiet_NaN()));
  a.v = a.k;  // padding between rows stays NaN: reading it would poison the output
  for (int64_t s = 0; s < c.n; ++s) {
    for (int64_t kv = 0; kv < c.K; ++kv) {
      for (int64_t d = 0; d < c.D; ++d) {
        const size_t at = size_t(kv * c.head_stride + s * c.stride + d);
        a.k[at] = f32_to_bf16(float(kd(rng)) / 8.0f);
        // Each kv head's values are offset by 16·kv so a wrong GQA mapping cannot hide.
        a.v[at] = f32_to_bf16(float(vd(rng)) / 16.0f + 16.0f * float(kv));
      }
    }
  }
  return a;
}

void check_attend(std::mt19937& rng, const AttnCase& c) {
  CAPTURE(c.n);
  CAPTURE(c.H);
  CAPTURE(c.K);
  CAPTURE(c.D);
  CAPTURE(c.stride);
  CAPTURE(c.head_stride);
  const AttnData a = make_attn_data(rng, c);
  std::vector<float> scratch(size_t(attend_scratch_floats(c.n, c.H)) + 1, 12345.0f);
  std::vector<float> out(size_t(c.H * c.D) + 1, 12345.0f);
  attend(a.q.data(), a.k.data(), a.v.data(), c.n, c.H, c.K, c.D, c.stride, c.head_stride,
         scratch.data(), out.data());
  CHECK(scratch.back() == 12345.0f);
  CHECK(out.back() == 12345.0f);
  const auto want = ref_attend(a.q, a.k, a.v, c);
  for (int64_t i = 0; i < c.H * c.D; ++i) {
    const float kv = float(i / c.D / (c.H / c.K));
    CHECK(std::isfinite(out[size_t(i)]));
    // Values are 16·kv ± 4: a wrong kv head is off by ≥ 8; a weight one bf16 step off (exp
    // differing by an f32 ulp at a rounding boundary) moves the output by < 0.016, plus one bf16
    // step of the rounded output.
    CHECK(std::fabs(out[size_t(i)] - want[size_t(i)]) <= 0.016f + std::fabs(want[size_t(i)]) / 128);
    CHECK(std::fabs(out[size_t(i)] - 16.0f * kv) <= 4.0f);
  }
  // The weights left in scratch are bf16 values in (0, 1] with the max at exactly 1.
  for (int64_t h = 0; h < c.H; ++h) {
    const float* w = &scratch[size_t(h * c.n)];
    CHECK(*std::max_element(w, w + c.n) == 1.0f);
    for (int64_t s = 0; s < c.n; ++s) CHECK(is_bf16(w[s]));
  }
}

TEST_CASE("attend matches the reference (GQA, odd sizes, strided cache)") {
  std::mt19937 rng(9);
  for_each_target([&] {
    for (const AttnCase& c :
         {// position-major rows (head_stride = D, padded rows)
          AttnCase{1, 4, 1, 16, 16, 16}, AttnCase{2, 1, 1, 3, 3, 3}, AttnCase{3, 2, 2, 20, 40, 20},
          AttnCase{5, 6, 2, 40, 88, 40}, AttnCase{17, 12, 2, 64, 128, 64},
          AttnCase{33, 16, 2, 72, 144, 72}, AttnCase{100, 32, 8, 64, 512, 64},
          AttnCase{64, 8, 8, 128, 1024, 128}, AttnCase{257, 8, 1, 64, 80, 64},
          AttnCase{513, 32, 8, 64, 520, 64}, AttnCase{9, 4, 2, 96, 192, 96},
          AttnCase{7, 2, 1, 600, 600, 600},
          // head-major (the Llama cache: [K, capacity, D]), capacity beyond n_ctx
          AttnCase{100, 32, 8, 64, 64, 128 * 64}, AttnCase{3, 6, 2, 40, 40, 5 * 40},
          AttnCase{513, 32, 8, 64, 64, 513 * 64}, AttnCase{17, 4, 4, 20, 24, 17 * 24},
          AttnCase{1, 4, 1, 64, 64, 64}, AttnCase{3, 8, 2, 128, 128, 5 * 128},
          AttnCase{31, 8, 8, 64, 64, 40 * 64}, AttnCase{257, 24, 8, 64, 64, 300 * 64}}) {
      check_attend(rng, c);
    }
  });
}

TEST_CASE("attend with one position returns v exactly") {
  std::mt19937 rng(10);
  for_each_target([&] {
    const AttnCase c{1, 32, 8, 64, 512, 64};
    const AttnData a = make_attn_data(rng, c);
    std::vector<float> scratch(size_t(attend_scratch_floats(c.n, c.H)));
    std::vector<float> out(size_t(c.H * c.D));
    attend(a.q.data(), a.k.data(), a.v.data(), c.n, c.H, c.K, c.D, c.stride, c.head_stride,
           scratch.data(), out.data());
    for (int64_t h = 0; h < c.H; ++h) {
      for (int64_t d = 0; d < c.D; ++d) {
        CHECK(out[size_t(h * c.D + d)] == bf16_to_f32(a.v[size_t((h / 4) * c.D + d)]));
      }
    }
  });
}

TEST_CASE("attend rounds logits and weights to bf16") {
  // Position 0 has logit 0, position 1 has q·k = −2.01171875, which bf16 rounds to −2.015625;
  // its weight is bf16(exp(−2.015625)). Values 0 and 1, so out = bf16(e / bf16(1 + e)).
  const int64_t D = 2;
  const float q[D] = {1.0f, 1.0f};
  const uint16_t k[2 * D] = {0, 0, f32_to_bf16(-2.0f), f32_to_bf16(-0.01171875f)};
  const uint16_t v[2 * D] = {f32_to_bf16(0.0f), f32_to_bf16(0.0f), f32_to_bf16(1.0f),
                             f32_to_bf16(1.0f)};
  const float e = round_to_bf16(std::exp(round_to_bf16(-2.01171875f)));
  REQUIRE(round_to_bf16(-2.01171875f) == -2.015625f);
  // Skipping either rounding would give a different weight:
  REQUIRE(e != round_to_bf16(std::exp(-2.01171875f)));
  REQUIRE(e != std::exp(-2.015625f));
  for_each_target([&] {
    float scratch[2], out[D];
    attend(q, k, v, 2, 1, 1, D, D, D, scratch, out);
    CHECK(scratch[0] == 1.0f);
    CHECK(scratch[1] == e);
    const float want = round_to_bf16(e / round_to_bf16(1.0f + e));
    CHECK(out[0] == want);
    CHECK(out[1] == want);
  });
}

TEST_CASE("attend validates shapes") {
  float q[4] = {}, scratch[4] = {}, out[4] = {};
  uint16_t kv[4] = {};
  CHECK_THROWS_AS(attend(q, kv, kv, 0, 1, 1, 4, 4, 4, scratch, out), Error);
  CHECK_THROWS_AS(attend(q, kv, kv, 1, 3, 2, 1, 2, 1, scratch, out), Error);  // H % K
  CHECK_THROWS_AS(attend(q, kv, kv, 1, 1, 0, 4, 4, 4, scratch, out), Error);
  CHECK_THROWS_AS(attend(q, kv, kv, 1, 1, 1, 0, 4, 4, scratch, out), Error);
  CHECK_THROWS_AS(attend(q, kv, kv, 1, 1, 1, 4, 3, 4, scratch, out), Error);  // pos_stride < D
  CHECK_THROWS_AS(attend(q, kv, kv, 1, 2, 2, 2, 2, 1, scratch, out), Error);  // head_stride < D
}

TEST_CASE("attend does not allocate") {
  std::mt19937 rng(12);
  const AttnCase c{300, 32, 8, 64, 64, 300 * 64};
  const AttnData a = make_attn_data(rng, c);
  std::vector<float> scratch(size_t(attend_scratch_floats(c.n, c.H)));
  std::vector<float> out(size_t(c.H * c.D));
  const auto run = [&] {
    attend(a.q.data(), a.k.data(), a.v.data(), c.n, c.H, c.K, c.D, c.stride, c.head_stride,
           scratch.data(), out.data());
  };
  CHECK(allocations_of(run) == 0);
}

// rows × heads queries over one cache of `n` positions, row t at position pos[t]; the data use
// the same grid as make_attn_data (K = 1), and outputs are laid out with padding between heads
// and rows so that a write past Dv shows.
struct SharedCase {
  int64_t rows, heads, D, Dv, stride;
  std::vector<int64_t> pos;
};

void check_shared_kv(std::mt19937& rng, const SharedCase& c) {
  CAPTURE(c.rows);
  CAPTURE(c.heads);
  CAPTURE(c.D);
  CAPTURE(c.Dv);
  const int64_t n = *std::max_element(c.pos.begin(), c.pos.end()) + 1;
  const AttnCase cache_case{n, c.rows * c.heads, 1, c.D, c.stride, 0};
  const AttnData a = make_attn_data(rng, cache_case);  // q: [rows · heads, D]
  const int64_t out_head = c.Dv + 3, out_row = c.heads * out_head + 5;
  std::vector<float> out(size_t(c.rows * out_row), 12345.0f);
  std::vector<float> scratch(size_t(attend_shared_kv_scratch_floats(c.rows, c.heads, n, c.D)) + 1,
                             12345.0f);
  const SharedKvQueries q{a.q.data(), c.heads * c.D, c.pos.data(), c.rows,
                          c.heads,    out.data(),    out_row,      out_head};
  attend_shared_kv(q, a.k.data(), a.v.data(), c.D, c.Dv, c.stride, scratch.data());
  CHECK(scratch.back() == 12345.0f);
  std::vector<float> one(size_t(c.D));
  std::vector<float> one_scratch(static_cast<size_t>(n));
  for (int64_t t = 0; t < c.rows; ++t) {
    for (int64_t h = 0; h < c.heads; ++h) {
      CAPTURE(t);
      CAPTURE(h);
      // The same query alone through attend: the same bits.
      attend(a.q.data() + (t * c.heads + h) * c.D, a.k.data(), a.v.data(), c.pos[size_t(t)] + 1, 1,
             1, c.D, c.stride, c.D, one_scratch.data(), one.data());
      const float* got = out.data() + t * out_row + h * out_head;
      int64_t differ = 0;
      for (int64_t d = 0; d < c.Dv; ++d) differ += got[d] != one[size_t(d)];
      CHECK(differ == 0);
      for (int64_t d = c.Dv; d < out_head; ++d) CHECK(got[d] == 12345.0f);
    }
    for (int64_t i = c.heads * out_head; i < out_row; ++i)
      CHECK(out[size_t(t * out_row + i)] == 12345.0f);
  }
}

TEST_CASE("attend_shared_kv equals attend per query, bit for bit") {
  std::mt19937 rng(21);
  for_each_target([&] {
    for (const SharedCase& c : {
             // MLA's shape (a 512 + 64 latent row, the first 512 values), causal rows of a chunk
             SharedCase{3, 16, 576, 512, 576, {40, 41, 42}},
             SharedCase{2, 5, 576, 512, 600, {0, 77}},  // row 0: one position
             // odd sizes: single vectors and scalar tails on the key and value sides
             SharedCase{4, 3, 37, 21, 40, {5, 33, 34, 100}}, SharedCase{1, 1, 8, 8, 8, {3}},
             SharedCase{2, 9, 64, 64, 64, {200, 12}},   // rows in any order
             SharedCase{1, 7, 1088, 1000, 1088, {70}},  // past the pair limit
         }) {
      check_shared_kv(rng, c);
    }
  });
}

TEST_CASE("attend_shared_kv validates shapes and does not allocate") {
  std::mt19937 rng(22);
  const SharedCase c{2, 16, 576, 512, 576, {300, 301}};
  const AttnData a = make_attn_data(rng, AttnCase{302, 32, 1, 576, 576, 0});
  std::vector<float> out(size_t(2 * 16 * 512));
  std::vector<float> scratch(size_t(attend_shared_kv_scratch_floats(2, 16, 302, 576)));
  SharedKvQueries q{a.q.data(), 16 * 576, c.pos.data(), 2, 16, out.data(), 16 * 512, 512};
  const auto run = [&] {
    attend_shared_kv(q, a.k.data(), a.v.data(), 576, 512, 576, scratch.data());
  };
  CHECK(allocations_of(run) == 0);
  CHECK_THROWS_AS(attend_shared_kv(q, a.k.data(), a.v.data(), 576, 577, 576, scratch.data()),
                  Error);  // Dv > D
  CHECK_THROWS_AS(attend_shared_kv(q, a.k.data(), a.v.data(), 576, 512, 500, scratch.data()),
                  Error);  // pos_stride < D
  q.out_head_stride = 100;
  CHECK_THROWS_AS(attend_shared_kv(q, a.k.data(), a.v.data(), 576, 512, 576, scratch.data()),
                  Error);  // heads would overlap
  q.out_head_stride = 512;
  const int64_t bad_pos[] = {3, -1};
  q.pos = bad_pos;
  CHECK_THROWS_AS(attend_shared_kv(q, a.k.data(), a.v.data(), 576, 512, 576, scratch.data()),
                  Error);
}

TEST_CASE("bench: attend" * doctest::skip()) {
  std::mt19937 rng(1);
  std::printf("target %s\n", kernels_target_name());
  for (int64_t n : {1, 64, 256, 512, 2048}) {
    const AttnCase c{n, 32, 8, 64, 64, n * 64};  // head-major, as the Llama cache
    const AttnData a = make_attn_data(rng, c);
    std::vector<float> scratch(size_t(attend_scratch_floats(c.n, c.H)));
    std::vector<float> out(size_t(c.H * c.D));
    const double us = median_us(
        [&] {
          attend(a.q.data(), a.k.data(), a.v.data(), c.n, c.H, c.K, c.D, c.stride, c.head_stride,
                 scratch.data(), out.data());
        },
        15, std::max<int>(4, int(20000 / n)));
    const double flop = 4.0 * double(c.H * c.D * n);
    std::printf("attend n_ctx=%-5lld H=32 K=8 D=64: %8.2f us  (%.1f GFLOP/s)\n", (long long)n, us,
                flop / us * 1e-3);
  }
}

TEST_CASE("bench: attend_shared_kv (MLA prefill shape)" * doctest::skip()) {
  std::mt19937 rng(2);
  std::printf("target %s\n", kernels_target_name());
  for (int64_t n : {512, 4096, 16384}) {
    const int64_t rows = 2, H = 16, D = 576, Dv = 512;
    const AttnData a = make_attn_data(rng, AttnCase{n, rows * H, 1, D, D, 0});
    std::vector<int64_t> pos = {n - 2, n - 1};
    std::vector<float> out(size_t(rows * H * Dv));
    std::vector<float> scratch(size_t(attend_shared_kv_scratch_floats(rows, H, n, D)));
    const SharedKvQueries q{a.q.data(), H * D, pos.data(), rows, H, out.data(), H * Dv, Dv};
    const double us = median_us(
        [&] { attend_shared_kv(q, a.k.data(), a.v.data(), D, Dv, D, scratch.data()); }, 9, 4);
    std::vector<float> one(size_t(H * D));
    std::vector<float> one_scratch(size_t(H * n));
    const double us_rows = median_us(
        [&] {
          for (int64_t t = 0; t < rows; ++t)
            attend(a.q.data() + t * H * D, a.k.data(), a.v.data(), n, H, 1, D, D, D,
                   one_scratch.data(), one.data());
        },
        9, 4);
    const double flop = 2.0 * double(rows * H * n * (D + Dv));
    std::printf(
        "n_ctx=%-5lld 2 rows x 16 heads, D=576 Dv=512: shared %8.1f us (%.1f GFLOP/s), "
        "row by row %8.1f us\n",
        (long long)n, us, flop / us * 1e-3, us_rows);
  }
}

}  // namespace
}  // namespace kiln::ops
