// Attention over the bf16 KV cache (Highway), and the logit maxima of QK-Clip calibration.
// Highway kernels with dynamic dispatch; targets, helpers and numerics: engine/ops/simd-inl.h.
#include "engine/ops/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "common/bf16.h"
#include "common/error.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/ops/attention.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
// foreach_target.h re-includes this file once per target; the includes below must follow it.
#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include "engine/ops/simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace kiln::ops {
namespace HWY_NAMESPACE {

// Attention over the bf16 KV cache.
//
// The G query heads that share a kv head are processed together, up to kRows at a time, so each
// K/V row is loaded (and widened to f32) once per group rather than once per head.
//
// q·k runs with the head dimension across lanes. bf16 pairs are widened without shuffles: a u32
// lane holding elements (2j, 2j+1) gives element 2j by a left shift and element 2j+1 by masking
// the low half, so a K row becomes an "even" and an "odd" f32 vector; the query is
// de-interleaved once per call to match, and the dot product does not care about the order.
// Instead of one horizontal reduction per (head, position), the accumulators of four positions
// are reduced together (SumLanes4) and stored as one vector; the bf16 rounding of the logits
// happens later, 16 at a time, in the softmax's max pass.
//
// Σ w·v runs with the head dimension across lanes and the weight broadcast, on the same
// even/odd split, re-interleaved once at the end.
//
// Head dims are covered as [0, Dp) in pairs of vectors, [Dp, Dv) in single widened vectors (at
// most one unless D > kMaxPairDim), [Dv, D) in scalar code (only for head_dims that are not a
// multiple of the vector width; real models have 64 or 128).

constexpr int64_t kRows = 4;  // query heads per pass: 4 rows × 4 positions = 16 accumulators
constexpr int64_t kPos = 4;   // positions per q·k block
constexpr int64_t kMaxPairDim = 1024;  // de-interleaved query buffer (on the stack) per row
constexpr int64_t kKeyBlock = 32;  // positions per block of attend_shared_kv: 36 KiB of MLA keys

struct AttnRow {
  const float* q;  // [D]
  float* w;        // [n] logits, then the bf16 exponentials
  float* out;      // [D]
  float sum;       // Σ w
};

// Widens the 2N bf16 values at p into their even and odd elements as f32.
HWY_INLINE void LoadBf16Pairs(DF d, const uint16_t* HWY_RESTRICT p, VF& even, VF& odd) {
#if HWY_TARGET == HWY_SCALAR  // one lane: the "pair" is p[0], p[1]
  even = LoadBf16(d, p);
  odd = LoadBf16(d, p + 1);
#else
  const hn::RebindToUnsigned<DF> du;
  const hn::Repartition<uint16_t, DF> d16;
  const auto u = hn::BitCast(du, hn::LoadU(d16, p));
  even = hn::BitCast(d, hn::ShiftLeft<16>(u));
  odd = hn::BitCast(d, hn::And(u, hn::Set(du, 0xFFFF0000u)));
#endif
}

#if HWY_TARGET != HWY_SCALAR
using D4 = hn::Full128<float>;

// Adds the halves of v until one 128-bit block is left.
template <class D>
HWY_INLINE hn::Vec<D4> SumBlocks(D d, hn::Vec<D> v) {
  if constexpr (hn::MaxLanes(D()) > 4) {
    const hn::Half<D> dh;
    return SumBlocks(dh, hn::Add(hn::LowerHalf(dh, v), hn::UpperHalf(dh, v)));
  } else {
    (void)d;
    return v;
  }
}

// Lane j of the result = sum of the lanes of the j-th argument.
HWY_INLINE hn::Vec<D4> SumLanes4(DF d, VF a, VF b, VF c, VF e) {
  // Per 128-bit block: transpose-and-add the four vectors so lane j holds vector j's block sum.
  const hn::Repartition<uint64_t, DF> d64;
  const VF ab = hn::Add(hn::InterleaveLower(d, a, b), hn::InterleaveUpper(d, a, b));
  const VF ce = hn::Add(hn::InterleaveLower(d, c, e), hn::InterleaveUpper(d, c, e));
  const auto ab64 = hn::BitCast(d64, ab), ce64 = hn::BitCast(d64, ce);
  const VF lo = hn::BitCast(d, hn::InterleaveLower(d64, ab64, ce64));
  const VF hi = hn::BitCast(d, hn::InterleaveUpper(d64, ab64, ce64));
  return SumBlocks(d, hn::Add(lo, hi));
}
#endif

// q·k of M query rows against the kPos keys at kp[], accumulated over the head dimension and
// added to rows[r].w[s + j] (which holds the scalar tail of the dot product when kTail) — or
// stored there when !kTail. Only the first `valid` positions are written (kFull: all kPos).
// qde: the rows' de-interleaved queries, row r at qde + r · qstride.
// The logits are left unrounded; SoftmaxWeights rounds them to bf16 in its first pass, 16 at a
// time instead of 4.
template <int64_t M, bool kTail, bool kFull>
HWY_INLINE void QkBlock(AttnRow* rows, const float* HWY_RESTRICT qde, int64_t qstride,
                        const uint16_t* const* kp, int64_t Dp, int64_t Dv, int64_t s,
                        int64_t valid) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  VF acc[M][kPos];
  HWY_UNROLL(4)
  for (int64_t r = 0; r < M; ++r) {
    HWY_UNROLL(4)
    for (int64_t j = 0; j < kPos; ++j) acc[r][j] = hn::Zero(d);
  }
  HWY_UNROLL(4)
  for (int64_t c = 0; c < Dp; c += 2 * N) {
    VF ke[kPos], ko[kPos];
    HWY_UNROLL(4)
    for (int64_t j = 0; j < kPos; ++j) LoadBf16Pairs(d, kp[j] + c, ke[j], ko[j]);
    HWY_UNROLL(4)
    for (int64_t r = 0; r < M; ++r) {
      const VF qe = hn::LoadU(d, qde + r * qstride + c);
      const VF qo = hn::LoadU(d, qde + r * qstride + c + N);
      HWY_UNROLL(4)
      for (int64_t j = 0; j < kPos; ++j) {
        acc[r][j] = hn::MulAdd(qe, ke[j], acc[r][j]);
        acc[r][j] = hn::MulAdd(qo, ko[j], acc[r][j]);
      }
    }
  }
  for (int64_t c = Dp; c < Dv; c += N) {  // single widened vectors
    VF kv[kPos];
    HWY_UNROLL(4)
    for (int64_t j = 0; j < kPos; ++j) kv[j] = LoadBf16(d, kp[j] + c);
    HWY_UNROLL(4)
    for (int64_t r = 0; r < M; ++r) {
      const VF qv = hn::LoadU(d, rows[r].q + c);
      HWY_UNROLL(4)
      for (int64_t j = 0; j < kPos; ++j) acc[r][j] = hn::MulAdd(qv, kv[j], acc[r][j]);
    }
  }
  HWY_UNROLL(4)
  for (int64_t r = 0; r < M; ++r) {
    float* w = rows[r].w + s;
#if HWY_TARGET == HWY_SCALAR
    (void)valid;
    for (int64_t j = 0; j < (kFull ? kPos : valid); ++j) {
      w[j] = (kTail ? w[j] : 0.0f) + hn::GetLane(acc[r][j]);
    }
#else
    const D4 d4;
    auto v4 = SumLanes4(d, acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    if constexpr (kFull) {
      if constexpr (kTail) v4 = hn::Add(v4, hn::LoadU(d4, w));
      hn::StoreU(v4, d4, w);
    } else {
      HWY_ALIGN float buf[kPos] = {};
      hn::Store(v4, d4, buf);
      for (int64_t j = 0; j < valid; ++j) w[j] = (kTail ? w[j] : 0.0f) + buf[j];
    }
#endif
  }
}

// How a head dimension D is covered: [0, Dp) in pairs of vectors, [Dp, Dv) in single widened
// vectors (at most one unless D > kMaxPairDim), [Dv, D) in scalar code.
struct HeadSplit {
  int64_t Dp, Dv;
};
HWY_INLINE HeadSplit SplitHead(int64_t D) {
  const int64_t N = int64_t(hn::Lanes(DF()));
#if HWY_TARGET == HWY_SCALAR
  const int64_t Dp = 0;  // one-lane vectors: no pairs
#else
  const int64_t Dp = D <= kMaxPairDim ? D - D % (2 * N) : 0;
#endif
  return {Dp, D - D % N};
}

// Logits (unrounded) of M query rows against the cached keys at positions [s0, s1), into
// rows[r].w[s0, s1). Any split of [0, n) into ranges gives the same values as one call.
template <int64_t M, bool kTail>
HWY_INLINE void QkLogitsImpl(AttnRow* rows, const float* HWY_RESTRICT qde, int64_t qstride,
                             const uint16_t* k, int64_t s0, int64_t s1, int64_t D, int64_t Dp,
                             int64_t Dv, int64_t stride) {
  if constexpr (kTail) {  // head_dim not a multiple of the vector width: scalar part first
    for (int64_t r = 0; r < M; ++r) {
      for (int64_t s = s0; s < s1; ++s) {
        float dot = 0.0f;
        for (int64_t c = Dv; c < D; ++c) dot += rows[r].q[c] * bf16_to_f32(k[s * stride + c]);
        rows[r].w[s] = dot;
      }
    }
  } else {
    (void)D;
  }
  const uint16_t* kp[kPos];
  int64_t s = s0;
  for (; s + kPos <= s1; s += kPos) {
    HWY_UNROLL(4)
    for (int64_t j = 0; j < kPos; ++j) kp[j] = k + (s + j) * stride;
    QkBlock<M, kTail, true>(rows, qde, qstride, kp, Dp, Dv, s, kPos);
  }
  if (s < s1) {  // a short last block repeats the last position; extra results are dropped
    for (int64_t j = 0; j < kPos; ++j) kp[j] = k + std::min(s + j, s1 - 1) * stride;
    QkBlock<M, kTail, false>(rows, qde, qstride, kp, Dp, Dv, s, s1 - s);
  }
}

template <int64_t M>
HWY_INLINE void QkLogits(AttnRow* rows, const float* HWY_RESTRICT qde, int64_t qstride,
                         const uint16_t* k, int64_t s0, int64_t s1, int64_t D, int64_t stride) {
  const HeadSplit sp = SplitHead(D);
  if (D > sp.Dv) {
    QkLogitsImpl<M, true>(rows, qde, qstride, k, s0, s1, D, sp.Dp, sp.Dv, stride);
  } else {
    QkLogitsImpl<M, false>(rows, qde, qstride, k, s0, s1, D, sp.Dp, sp.Dv, stride);
  }
}

// Writes row r's query, de-interleaved per 2N-chunk of [0, Dp) (evens then odds), to qde.
HWY_INLINE void DeinterleaveQuery(const float* HWY_RESTRICT q, int64_t Dp,
                                  float* HWY_RESTRICT qde) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  for (int64_t c = 0; c < Dp; c += 2 * N) {
    VF qe, qo;
    hn::LoadInterleaved2(d, q + c, qe, qo);
    hn::StoreU(qe, d, qde + c);
    hn::StoreU(qo, d, qde + c + N);
  }
}

// w ← bf16(exp(bf16(w) − max)), the logits rounded to bf16 first (MaxText's logits dtype);
// returns Σ w (f32).
HWY_INLINE float SoftmaxWeights(float* HWY_RESTRICT w, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  VF vmax = hn::Set(d, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const VF l = RoundBf16(d, hn::LoadU(d, w + i));
    hn::StoreU(l, d, w + i);
    vmax = hn::Max(vmax, l);
  }
  float m = hn::GetLane(hn::MaxOfLanes(d, vmax));
  for (int64_t t = i; t < n; ++t) {
    w[t] = round_to_bf16(w[t]);
    m = std::max(m, w[t]);
  }
  const VF vm = hn::Set(d, m);
  VF vsum = hn::Zero(d);
  i = 0;
  for (; i + N <= n; i += N) {
    const VF e = RoundBf16(d, hn::Exp(d, hn::Sub(hn::LoadU(d, w + i), vm)));
    hn::StoreU(e, d, w + i);
    vsum = hn::Add(vsum, e);
  }
  float sum = hn::GetLane(hn::SumOfLanes(d, vsum));
  if (i < n) {
    // Padding far below the max gives exp = 0, so it adds nothing to the sum.
    HWY_ALIGN float buf[kMaxLanes];
    for (size_t t = 0; t < kMaxLanes; ++t) buf[t] = m - 1000.0f;
    const size_t rem = size_t(n - i);
    std::memcpy(buf, w + i, rem * sizeof(float));
    const VF e = RoundBf16(d, hn::Exp(d, hn::Sub(hn::Load(d, buf), vm)));
    hn::Store(e, d, buf);
    std::memcpy(w + i, buf, rem * sizeof(float));
    sum += hn::GetLane(hn::SumOfLanes(d, e));
  }
  return sum;
}

// Σ w·v is accumulated in f32 in each row's `out`, position by position in increasing order
// whatever the blocking, so a split of [0, n) into ranges gives the same bits as one pass. While
// accumulating, each 2N-chunk of [0, Dp) holds its even elements, then its odd ones; FinishRow
// re-interleaves them.

// acc[c0, c0 + NP·2N) of M rows += Σ_{s ∈ [s0, s1)} w[s] · v[s], on even/odd pairs.
template <int64_t M, int64_t NP>
HWY_INLINE void PvPairs(AttnRow* rows, const uint16_t* HWY_RESTRICT v, int64_t s0, int64_t s1,
                        int64_t stride, int64_t c0) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  VF ae[M][NP], ao[M][NP];
  HWY_UNROLL(4)
  for (int64_t r = 0; r < M; ++r) {
    HWY_UNROLL(4)
    for (int64_t j = 0; j < NP; ++j) {
      ae[r][j] = hn::LoadU(d, rows[r].out + c0 + j * 2 * N);
      ao[r][j] = hn::LoadU(d, rows[r].out + c0 + j * 2 * N + N);
    }
  }
  const uint16_t* vp = v + s0 * stride + c0;
  for (int64_t s = s0; s < s1; ++s, vp += stride) {
    VF ve[NP], vo[NP];
    HWY_UNROLL(4)
    for (int64_t j = 0; j < NP; ++j) LoadBf16Pairs(d, vp + j * 2 * N, ve[j], vo[j]);
    HWY_UNROLL(4)
    for (int64_t r = 0; r < M; ++r) {
      const VF w = hn::Set(d, rows[r].w[s]);
      HWY_UNROLL(4)
      for (int64_t j = 0; j < NP; ++j) {
        ae[r][j] = hn::MulAdd(w, ve[j], ae[r][j]);
        ao[r][j] = hn::MulAdd(w, vo[j], ao[r][j]);
      }
    }
  }
  HWY_UNROLL(4)
  for (int64_t r = 0; r < M; ++r) {
    HWY_UNROLL(4)
    for (int64_t j = 0; j < NP; ++j) {
      hn::StoreU(ae[r][j], d, rows[r].out + c0 + j * 2 * N);
      hn::StoreU(ao[r][j], d, rows[r].out + c0 + j * 2 * N + N);
    }
  }
}

// acc[c0, c0 + N) of M rows, one widened vector.
template <int64_t M>
HWY_INLINE void PvSingle(AttnRow* rows, const uint16_t* HWY_RESTRICT v, int64_t s0, int64_t s1,
                         int64_t stride, int64_t c0) {
  const DF d;
  VF acc[M];
  HWY_UNROLL(4)
  for (int64_t r = 0; r < M; ++r) acc[r] = hn::LoadU(d, rows[r].out + c0);
  const uint16_t* vp = v + s0 * stride + c0;
  for (int64_t s = s0; s < s1; ++s, vp += stride) {
    const VF vv = LoadBf16(d, vp);
    HWY_UNROLL(4)
    for (int64_t r = 0; r < M; ++r) acc[r] = hn::MulAdd(hn::Set(d, rows[r].w[s]), vv, acc[r]);
  }
  HWY_UNROLL(4)
  for (int64_t r = 0; r < M; ++r) hn::StoreU(acc[r], d, rows[r].out + c0);
}

// acc[0, Dv) of M rows += Σ_{s ∈ [s0, s1)} w[s] · v[s]: the first Dv ≤ D values of each row.
template <int64_t M>
HWY_INLINE void PvAccumulate(AttnRow* rows, const uint16_t* HWY_RESTRICT v, int64_t s0, int64_t s1,
                             int64_t stride, int64_t Dv) {
  const int64_t N = int64_t(hn::Lanes(DF()));
  const HeadSplit sp = SplitHead(Dv);
  // Two pairs (4 vectors) of the head dimension per pass keep M × 4 accumulators in registers.
  int64_t c0 = 0;
  for (; c0 + 4 * N <= sp.Dp; c0 += 4 * N) PvPairs<M, 2>(rows, v, s0, s1, stride, c0);
  if (c0 < sp.Dp) PvPairs<M, 1>(rows, v, s0, s1, stride, c0);
  for (c0 = sp.Dp; c0 < sp.Dv; c0 += N) PvSingle<M>(rows, v, s0, s1, stride, c0);
  for (int64_t c = sp.Dv; c < Dv; ++c) {  // head_dim not a multiple of the vector width
    for (int64_t r = 0; r < M; ++r) {
      float acc = rows[r].out[c];
      for (int64_t s = s0; s < s1; ++s) acc += rows[r].w[s] * bf16_to_f32(v[s * stride + c]);
      rows[r].out[c] = acc;
    }
  }
}

// MaxText: out = bf16(e @ V) / bf16(sum(e)), both bf16 because e is (docs/maxtext.md §2.2, §11):
// row.out[0, Dv) ← bf16(bf16(acc) / sum), re-interleaved.
HWY_INLINE void FinishRow(const AttnRow& row, int64_t Dv) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const HeadSplit sp = SplitHead(Dv);
  const VF sum = hn::Set(d, row.sum);
  for (int64_t c = 0; c < sp.Dp; c += 2 * N) {
    const VF e = hn::LoadU(d, row.out + c), o = hn::LoadU(d, row.out + c + N);
    hn::StoreInterleaved2(RoundBf16(d, hn::Div(RoundBf16(d, e), sum)),
                          RoundBf16(d, hn::Div(RoundBf16(d, o), sum)), d, row.out + c);
  }
  for (int64_t c = sp.Dp; c < sp.Dv; c += N)
    hn::StoreU(RoundBf16(d, hn::Div(RoundBf16(d, hn::LoadU(d, row.out + c)), sum)), d, row.out + c);
  for (int64_t c = sp.Dv; c < Dv; ++c)
    row.out[c] = round_to_bf16(round_to_bf16(row.out[c]) / row.sum);
}

// The M-row kernels for 1 ≤ m ≤ kRows rows.
HWY_NOINLINE void QkRows(int64_t m, AttnRow* rows, const float* qde, int64_t qstride,
                         const uint16_t* k, int64_t s0, int64_t s1, int64_t D, int64_t stride) {
  switch (m) {
    case 4:
      return QkLogits<4>(rows, qde, qstride, k, s0, s1, D, stride);
    case 3:
      return QkLogits<3>(rows, qde, qstride, k, s0, s1, D, stride);
    case 2:
      return QkLogits<2>(rows, qde, qstride, k, s0, s1, D, stride);
    default:
      return QkLogits<1>(rows, qde, qstride, k, s0, s1, D, stride);
  }
}

HWY_NOINLINE void PvRows(int64_t m, AttnRow* rows, const uint16_t* v, int64_t s0, int64_t s1,
                         int64_t stride, int64_t Dv) {
  switch (m) {
    case 4:
      return PvAccumulate<4>(rows, v, s0, s1, stride, Dv);
    case 3:
      return PvAccumulate<3>(rows, v, s0, s1, stride, Dv);
    case 2:
      return PvAccumulate<2>(rows, v, s0, s1, stride, Dv);
    default:
      return PvAccumulate<1>(rows, v, s0, s1, stride, Dv);
  }
}

// Up to kRows query rows over all n positions: logits, softmax, weighted sum.
void AttendRows(int64_t m, AttnRow* rows, const uint16_t* HWY_RESTRICT k,
                const uint16_t* HWY_RESTRICT v, int64_t n, int64_t D, int64_t stride) {
  const HeadSplit sp = SplitHead(D);
  HWY_ALIGN float qde[kRows * kMaxPairDim];
#if HWY_TARGET == HWY_SCALAR
  qde[0] = 0.0f;  // never read without pairs, but GCC cannot tell
#endif
  for (int64_t r = 0; r < m; ++r) {
    DeinterleaveQuery(rows[r].q, sp.Dp, qde + r * kMaxPairDim);
    std::fill(rows[r].out, rows[r].out + D, 0.0f);
  }
  QkRows(m, rows, qde, kMaxPairDim, k, 0, n, D, stride);
  for (int64_t r = 0; r < m; ++r) rows[r].sum = round_to_bf16(SoftmaxWeights(rows[r].w, n));
  PvRows(m, rows, v, 0, n, stride, D);
  for (int64_t r = 0; r < m; ++r) FinishRow(rows[r], D);
}

void Attend(const float* q, const uint16_t* k, const uint16_t* v, int64_t n_ctx, int64_t H,
            int64_t K, int64_t D, int64_t pos_stride, int64_t head_stride, float* scratch,
            float* out) {
  const int64_t G = H / K;
  for (int64_t kv = 0; kv < K; ++kv) {
    for (int64_t g0 = 0; g0 < G; g0 += kRows) {
      const int64_t m = std::min(kRows, G - g0);
      AttnRow rows[kRows];
      for (int64_t r = 0; r < m; ++r) {
        const int64_t h = kv * G + g0 + r;
        rows[r] = AttnRow{q + h * D, scratch + h * n_ctx, out + h * D, 0.0f};
      }
      AttendRows(m, rows, k + kv * head_stride, v + kv * head_stride, n_ctx, D, pos_stride);
    }
  }
}

// Every head of every row over one shared K/V sequence, in blocks of kKeyBlock positions: each
// block of keys (and later of values) is loaded into L1 once and used by all the queries, where a
// row-by-row attend would stream the whole cache again for every group of kRows heads.
void AttendSharedKv(const SharedKvQueries& a, const uint16_t* k, const uint16_t* v, int64_t D,
                    int64_t Dv, int64_t stride, float* scratch) {
  const int64_t H = a.heads, V = a.rows * H;
  const HeadSplit sp = SplitHead(D);
  int64_t n_max = 0;
  for (int64_t t = 0; t < a.rows; ++t) n_max = std::max(n_max, a.pos[t] + 1);
  float* qde = scratch;           // [V, Dp]
  float* sums = qde + V * sp.Dp;  // [V]
  float* logits = sums + V;       // [V, n_max]
  // The AttnRows of heads [h0, h0 + m) of row t.
  const auto group = [&](int64_t t, int64_t h0, int64_t m, AttnRow* rows) {
    for (int64_t r = 0; r < m; ++r) {
      const int64_t i = t * H + h0 + r;
      rows[r] = AttnRow{a.q + t * a.q_row_stride + (h0 + r) * D, logits + i * n_max,
                        a.out + t * a.out_row_stride + (h0 + r) * a.out_head_stride, sums[i]};
    }
  };
  for (int64_t t = 0; t < a.rows; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      DeinterleaveQuery(a.q + t * a.q_row_stride + h * D, sp.Dp, qde + (t * H + h) * sp.Dp);
      float* out = a.out + t * a.out_row_stride + h * a.out_head_stride;
      std::fill(out, out + Dv, 0.0f);
    }
  }
  // body(m, rows, t, h0, s0, s1) for every block of positions [s0, s1) (in increasing order, so
  // the weighted sums accumulate position by position) and every group of ≤ kRows heads of a row
  // that attends to it.
  AttnRow rows[kRows];
  const auto for_each_block = [&](const auto& body) {
    for (int64_t s0 = 0; s0 < n_max; s0 += kKeyBlock) {
      for (int64_t t = 0; t < a.rows; ++t) {
        const int64_t s1 = std::min(s0 + kKeyBlock, a.pos[t] + 1);
        for (int64_t h0 = 0; h0 < H && s0 < s1; h0 += kRows) {
          const int64_t m = std::min(kRows, H - h0);
          group(t, h0, m, rows);
          body(m, t, h0, s0, s1);
        }
      }
    }
  };
  for_each_block([&](int64_t m, int64_t t, int64_t h0, int64_t s0, int64_t s1) {
    QkRows(m, rows, qde + (t * H + h0) * sp.Dp, sp.Dp, k, s0, s1, D, stride);
  });
  for (int64_t t = 0; t < a.rows; ++t)
    for (int64_t h = 0; h < H; ++h)
      sums[t * H + h] = round_to_bf16(SoftmaxWeights(logits + (t * H + h) * n_max, a.pos[t] + 1));
  for_each_block([&](int64_t m, int64_t, int64_t, int64_t s0, int64_t s1) {
    PvRows(m, rows, v, s0, s1, stride, Dv);
  });
  for (int64_t t = 0; t < a.rows; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      group(t, h, 1, rows);
      FinishRow(rows[0], Dv);
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace kiln::ops
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kiln::ops {

HWY_EXPORT(Attend);
HWY_EXPORT(AttendSharedKv);

void attend(const float* q, const uint16_t* k, const uint16_t* v, int64_t n_ctx, int64_t H,
            int64_t K, int64_t D, int64_t pos_stride, int64_t head_stride, float* scratch,
            float* out) {
  if (n_ctx < 1 || K < 1 || H < K || H % K != 0 || D < 1 || pos_stride < D ||
      (K > 1 && head_stride < D)) {
    throw Error("attend: invalid shape n_ctx=" + std::to_string(n_ctx) + " H=" + std::to_string(H) +
                " K=" + std::to_string(K) + " D=" + std::to_string(D) + " pos_stride=" +
                std::to_string(pos_stride) + " head_stride=" + std::to_string(head_stride) +
                " (need n_ctx >= 1, H a multiple of K, strides >= D)");
  }
  HWY_DYNAMIC_DISPATCH(Attend)(q, k, v, n_ctx, H, K, D, pos_stride, head_stride, scratch, out);
}

void attend_shared_kv(const SharedKvQueries& q, const uint16_t* k, const uint16_t* v, int64_t D,
                      int64_t Dv, int64_t pos_stride, float* scratch) {
  bool ok = q.rows >= 1 && q.heads >= 1 && D >= 1 && Dv >= 1 && Dv <= D && pos_stride >= D &&
            q.q_row_stride >= q.heads * D && q.out_head_stride >= Dv &&
            q.out_row_stride >= (q.heads - 1) * q.out_head_stride + Dv;
  for (int64_t t = 0; ok && t < q.rows; ++t) ok = q.pos[t] >= 0;
  if (!ok) {
    throw Error("attend_shared_kv: invalid shape rows=" + std::to_string(q.rows) +
                " heads=" + std::to_string(q.heads) + " D=" + std::to_string(D) +
                " Dv=" + std::to_string(Dv) + " pos_stride=" + std::to_string(pos_stride) +
                " (need rows, heads >= 1, positions >= 0, 1 <= Dv <= D, strides that keep rows and "
                "heads apart)");
  }
  HWY_DYNAMIC_DISPATCH(AttendSharedKv)(q, k, v, D, Dv, pos_stride, scratch);
}

void max_logits(const float* q, const uint16_t* k, int64_t n_ctx, int64_t H, int64_t K, int64_t D,
                int64_t pos_stride, int64_t head_stride, float* max) {
  const int64_t G = H / K;
  for (int64_t h = 0; h < H; ++h) {
    const float* qh = q + h * D;
    const uint16_t* kh = k + (h / G) * head_stride;
    float m = max[h];
    for (int64_t s = 0; s < n_ctx; ++s) {
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += qh[d] * bf16_to_f32(kh[s * pos_stride + d]);
      m = std::max(m, round_to_bf16(dot));
    }
    max[h] = m;
  }
}

}  // namespace kiln::ops
#endif  // HWY_ONCE
