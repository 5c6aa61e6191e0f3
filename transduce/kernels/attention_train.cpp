// Training attention for CPU: a forward pass that keeps the softmax probabilities, and its
// backward pass, one task per (row, head).
//
// Sequences of characters or phonemes are short (5-30 positions): PyTorch's flash kernel for CPU
// sets up blocks of 32+ queries and keys per (row, head) and spends most of its time on that, and
// the math path runs a dozen batched ops of tiny matrices. Here each task computes every query's
// scores, softmax and weighted values in one pass; the backward pass reads the saved probabilities
// back. In bf16 on a CPU with AVX512-BF16 (dh 32, 48 or 64) a query's scores are bf16 dot
// products with each key's row, 16 keys' sums in registers, added across lanes by one transposing
// tree; otherwise each task holds its row's keys transposed (dh x T, padded to whole vectors) in
// scratch. The gradients are each summed in registers and stored once: dq over the keys, dk and dv
// over the queries. (On an AMD EPYC, Zen 4, 2 threads, (256 rows, 4 heads, 9 positions, dh 64),
// bf16: forward 653 -> 438 us, backward 873 -> 519 us; 40 positions: 2x.)
//
//   attention_train(q, k, v, mask, causal, scale) -> (out, probs)
//     q (B, H, Tq, dh), k, v (B, H, Tk, dh): all float32 or all bfloat16 (out and the gradients
//     in the same dtype; the arithmetic and probs in float32), any strides, innermost contiguous
//     (the heads of a fused projection, unsplit); mask bool, true = attend: (B, Tk) for padded keys, (B, Tq, Tk)
//     for a mask per query (a prefix LM's), any strides, or empty; causal: query i sees
//     keys [0, Tk - Tq + i]. out (B, Tq, H * dh) contiguous (heads merged); probs (B, H, Tq, Tk).
//     A query that sees no key gets zeros (as PyTorch's SDPA), and zero gradients.
//   attention_train_backward(grad, q, k, v, probs, scale) -> (dq, dk, dv)
//     grad (B, H, Tq, dh) of q's dtype, any strides, innermost contiguous; dq (B, Tq, H, dh), dk and dv
//     (B, Tk, H, dh), contiguous: as (B, H, T, dh) views they are the split heads' gradients.
//   attention_train_backward_into(grad, q, k, v, probs, scale, dq, dk, dv)
//     the same, written into dq (B, Tq, H, dh) and dk, dv (B, Tk, H, dh) of q's dtype whose heads
//     are contiguous (H * dh elements) and rows and positions any strides, dk's and dv's the same:
//     the column blocks of one fused projection's gradient (models/layers.py's `split_heads`), so
//     that no concatenation follows.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "rows.h"

namespace {

using namespace transduce_kernels;

struct Shape {
  int64_t b, h, tq, tk, dh;
};

// One element type E for q, k, v, out and the gradients: float, or bfloat16 as uint16_t (rows.h's
// load and store), where a bf16-autocast model's projections hand over bf16 and take bf16 back.
// The arithmetic is float either way: a task reads its row's bf16 q and v (and g, k) into float
// scratch first, and the probabilities are kept in float.
template <typename E>
const E* elements(const at::Tensor& t) {
  return static_cast<const E*>(t.const_data_ptr());
}
template <typename E>
E* elements_mut(const at::Tensor& t) {
  return static_cast<E*>(t.mutable_data_ptr());
}


#ifdef __AVX512F__
// R weighted sums of the same n rows at once: out_r[0, 16 NV) = sum_j w[r * wr + j * wj] x_j[0, 16 NV)
// for r < R, out_r = out + r * os. Each row x_j is loaded once for all R sums, and the R * NV sums are
// independent chains of FMAs (one sum alone waits on its previous FMA's latency at every row: the
// rows here are 5-30 positions). Zero weights are not skipped.
template <int NV, int R, typename E>
inline void weighted_block16(const float* w, int64_t wr, int64_t wj, const float* x, int64_t xs, int64_t n, E* out,
                             int64_t os) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * xs;
    __m512 xv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) xv[j] = _mm512_loadu_ps(xi + 16 * j);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 b = _mm512_set1_ps(w[r * wr + i * wj]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_fmadd_ps(b, xv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) store16(out + r * os + 16 * j, acc[r][j]);
}

// `m` weighted sums of the same rows (weighted_block16's arguments), four at a time
template <int NV, typename E>
inline void weighted_sums16(const float* w, int64_t wr, int64_t wj, const float* x, int64_t xs, int64_t n, E* out,
                            int64_t os, int64_t m) {
  constexpr int kR = NV <= 2 ? 6 : 4;  // sums at once: R * NV accumulators and NV rows in 32 registers
  int64_t r = 0;
  for (; r + kR <= m; r += kR) weighted_block16<NV, kR>(w + r * wr, wr, wj, x, xs, n, out + r * os, os);
  for (; r + 2 <= m; r += 2) weighted_block16<NV, 2>(w + r * wr, wr, wj, x, xs, n, out + r * os, os);
  for (; r < m; ++r) weighted_block16<NV, 1>(w + r * wr, wr, wj, x, xs, n, out + r * os, os);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
// Lane j of the result: the sum of v[j]'s 16 lanes (a transposing tree of adds: 45 instructions
// for 16 sums, where 16 separate reductions take ~130).
__attribute__((always_inline)) inline __m512 sum_lanes16(const __m512* v) {
  __m512 w[8], x[4];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k)
    w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    const __m512d a = _mm512_castps_pd(w[2 * k]), b = _mm512_castps_pd(w[2 * k + 1]);
    x[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
  const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, 0x88), _mm512_shuffle_f32x4(z01, z23, 0xDD));
}

// s[0, 16) = x . row_t for rows t < n (n <= 16) `step` elements apart, 0 for t >= n: bf16 dot
// products by the CPU's bf16 pair instruction (exact products, float sums), 32 elements at a time
// (the last block's tail loaded masked, as zeros). The 16 sums stay in registers (the loop over
// rows unrolled), each row read once per call.
template <int DH>
inline void bf16_dots16(const uint16_t* x, const uint16_t* rows, int64_t step, int64_t n, float* s) {
  constexpr int C = (DH + 31) / 32, kTail = DH % 32;
  constexpr __mmask32 kTailMask = kTail == 0 ? ~__mmask32{0} : (__mmask32{1} << kTail) - 1;
  auto block = [](const uint16_t* p, int c) {
    if (kTail != 0 && c == C - 1) return (__m512bh)_mm512_maskz_loadu_epi16(kTailMask, p + 32 * c);
    return (__m512bh)_mm512_loadu_si512(p + 32 * c);
  };
  __m512bh xv[C];
  for (int c = 0; c < C; ++c) xv[c] = block(x, c);
  __m512 acc[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) {
    if (t < n) {
      const uint16_t* row = rows + t * step;
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[t] = _mm512_dpbf16_ps(acc[t], xv[c], block(row, c));
    }
  }
  _mm512_storeu_ps(s, sum_lanes16(acc));
}

// s[0, n) = x . row_t for rows t < n `step` elements apart, in blocks of 16 (s holds a multiple of 16)
template <int DH>
inline void bf16_dots(const uint16_t* x, const uint16_t* rows, int64_t step, int64_t n, float* s) {
  if (n <= 16) {  // G2P's rows: one block
    bf16_dots16<DH>(x, rows, step, n, s);
    return;
  }
  for (int64_t t = 0; t < n; t += 16) bf16_dots16<DH>(x, rows + t * step, step, std::min<int64_t>(16, n - t), s + t);
}
#endif

inline int64_t padded16(int64_t t) { return (t + 15) / 16 * 16; }

// Whether a task's scores are bf16 dot products straight from the rows (bf16 elements, dh known at
// compile time, a CPU with AVX512-BF16), else float sums against rows laid out transposed.
template <int DH, typename E>
constexpr bool kDots =
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
    std::is_same_v<E, uint16_t> && DH > 0;
#else
    false;
#endif

// s[0, tk) = x . row_t: from x's and the rows' elements (kDots), else from x as float (xf) and the
// rows transposed (mt, dh x tkp); s holds padded16(tk) floats.
template <int DH, typename E>
inline void key_sums(const E* x, const float* xf, const E* rows, int64_t step, const float* mt, int64_t tk,
                     int64_t tkp, int64_t dh, float* s) {
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (kDots<DH, E>) {
    bf16_dots<DH>(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<const uint16_t*>(rows), step, tk, s);
    return;
  }
#endif
  row_sums_any<DH>(xf, mt, tkp, dh, s);
}

template <int DH, typename E>
void forward_run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mp, int64_t mask_row,
                 int64_t mask_q, int64_t mask_step, bool causal, float scale, const Shape& z, E* op, float* pp) {
  constexpr bool kFloat = std::is_same_v<E, float>;
  const int64_t dh = DH > 0 ? DH : z.dh, tkp = padded(z.tk), tq = z.tq, tk = z.tk;
  const E* qp = elements<E>(q);
  const E* kp = elements<E>(k);
  const E* vp = elements<E>(v);
  const int64_t out_q = z.h * dh;
  // strides read once: inside the loops each call would reload them from the tensors
  const int64_t q0 = q.stride(0), q1 = q.stride(1), q2 = q.stride(2), k0 = k.stride(0), k1 = k.stride(1),
                k2 = k.stride(2), v0 = v.stride(0), v1 = v.stride(1), v2 = v.stride(2);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, tq * tk * dh));
  at::parallel_for(0, z.b * z.h, grain, [&](int64_t begin, int64_t end) {
    constexpr bool dots = kDots<DH, E>;  // no transposed keys then
    std::vector<float> kt(dots ? 0 : dh * tkp, 0.f), bias(tkp), s(padded16(tk)), acc_buf(dh);
    std::vector<float> qbuf(kFloat ? 0 : tq * dh), vbuf(kFloat ? 0 : tk * dh);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / z.h, head = u % z.h;
      const E* qr = qp + r * q0 + head * q1;
      const E* kr = kp + r * k0 + head * k1;
      const E* vr = vp + r * v0 + head * v1;
      if constexpr (!dots) transpose<DH>(kr, k2, tk, dh, tkp, kt.data());
      // this row's queries and values as float, and the distance between their rows
      const float* qf;
      const float* vf;
      int64_t qs, vs;
      if constexpr (kFloat) {
        qf = qr, vf = vr, qs = q2, vs = v2;
      } else {
        if constexpr (!dots) rows_to_float<DH>(qr, q2, tq, dh, qbuf.data());
        rows_to_float<DH>(vr, v2, tk, dh, vbuf.data());
        qf = qbuf.data(), vf = vbuf.data(), qs = vs = dh;
      }
      // the keys' mask: the row's, or (mask_q != 0) each query's, filled at that query
      auto fill_bias = [&](int64_t i) {
        const bool* m = mp == nullptr ? nullptr : mp + r * mask_row + i * mask_q;
        for (int64_t t = 0; t < tkp; ++t) bias[t] = (t < tk && (m == nullptr || m[t * mask_step])) ? 0.f : kMasked;
      };
      fill_bias(0);
      float* prob = pp + u * tq * tk;
      for (int64_t i = 0; i < tq; ++i) {
        if (mask_q != 0 && i > 0) fill_bias(i);
        const int64_t len = causal ? tk - tq + i + 1 : tk;
        key_sums<DH>(qr + i * q2, qf + i * qs, kr, k2, kt.data(), tk, tkp, dh, s.data());
        float top = kMasked;
#pragma omp simd reduction(max : top)
        for (int64_t t = 0; t < tkp; ++t) {
          s[t] = t < len ? s[t] * scale + bias[t] : kMasked;
          top = std::max(top, s[t]);
        }
        E* __restrict__ o = op + r * tq * out_q + i * out_q + head * dh;
        float* __restrict__ p = prob + i * tk;
        if (top <= 0.5f * kMasked) {  // no key to attend to
          for (int64_t d = 0; d < dh; ++d) store(o + d, 0.f);
          for (int64_t t = 0; t < tk; ++t) p[t] = 0.f;
          continue;
        }
        const float inv = 1.f / exp_shifted(s.data(), tkp, top);
#pragma omp simd
        for (int64_t t = 0; t < tk; ++t) p[t] = s[t] * inv;
#ifdef __AVX512F__
        if constexpr (DH > 0 && DH % 16 == 0) continue;  // the weighted sums below, all queries at once
#endif
        float* __restrict__ acc = acc_buf.data();
        for (int64_t d = 0; d < dh; ++d) acc[d] = 0.f;
        for (int64_t t = 0; t < tk; ++t) {
          const float pt = p[t];
          if (pt == 0.f) continue;
          const float* __restrict__ vt = vf + t * vs;
#pragma omp simd
          for (int64_t d = 0; d < dh; ++d) acc[d] += pt * vt[d];
        }
        for (int64_t d = 0; d < dh; ++d) store(o + d, acc[d]);
      }
#ifdef __AVX512F__
      if constexpr (DH > 0 && DH % 16 == 0) {
        // out_i = sum_t p_it v_t (a query that sees no key has p = 0: zeros)
        weighted_sums16<DH / 16>(prob, tk, 1, vf, vs, tk, op + r * tq * out_q + head * dh, out_q, tq);
      }
#endif
    }
  });
}

template <int DH, typename E>
void backward_run(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const float* pp, float scale, const Shape& z, E* dqp, E* dkp, E* dvp, int64_t qb, int64_t qr_,
                  int64_t kb, int64_t kr_) {
  // qb, qr_: dq's strides between rows and between positions; kb, kr_: dk's and dv's
  constexpr bool kFloat = std::is_same_v<E, float>;
  const int64_t dh = DH > 0 ? DH : z.dh, tkp = padded(z.tk), tq = z.tq, tk = z.tk;
  const E* gp = elements<E>(g);
  const E* qp = elements<E>(q);
  const E* kp = elements<E>(k);
  const E* vp = elements<E>(v);
  const int64_t g0 = g.stride(0), g1 = g.stride(1), g2 = g.stride(2), q0 = q.stride(0), q1 = q.stride(1),
                q2 = q.stride(2), k0 = k.stride(0), k1 = k.stride(1), k2 = k.stride(2), v0 = v.stride(0),
                v1 = v.stride(1), v2 = v.stride(2);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, tq * tk * dh));
  at::parallel_for(0, z.b * z.h, grain, [&](int64_t begin, int64_t end) {
    constexpr bool dots = kDots<DH, E>;  // no transposed values then
    std::vector<float> vt(dots ? 0 : dh * tkp, 0.f), dp(padded16(tk)), ds(tq * tk), acc_buf(3 * dh);
    // bf16: this row's g, q, k as float
    std::vector<float> gbuf(kFloat ? 0 : tq * dh), qbuf(kFloat ? 0 : tq * dh), kbuf(kFloat ? 0 : tk * dh);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / z.h, head = u % z.h;
      const E* gr = gp + r * g0 + head * g1;
      const E* qr = qp + r * q0 + head * q1;
      const E* kr = kp + r * k0 + head * k1;
      const E* vr = vp + r * v0 + head * v1;
      if constexpr (!dots) transpose<DH>(vr, v2, tk, dh, tkp, vt.data());
      const float* prob = pp + u * tq * tk;
      const float *gf, *qf, *kf;
      int64_t gs, qs, ks;
      if constexpr (kFloat) {
        gf = gr, qf = qr, kf = kr, gs = g2, qs = q2, ks = k2;
      } else {
        rows_to_float<DH>(gr, g2, tq, dh, gbuf.data());
        rows_to_float<DH>(qr, q2, tq, dh, qbuf.data());
        rows_to_float<DH>(kr, k2, tk, dh, kbuf.data());
        gf = gbuf.data(), qf = qbuf.data(), kf = kbuf.data(), gs = qs = ks = dh;
      }
      // Each gradient is summed in registers (where dh is known here) and stored once: dq_i over
      // the keys, dk_t and dv_t over the queries (summing dk and dv in memory, one query at a
      // time, read and wrote each row tq times).
      float local[DH > 0 ? 3 * DH : 1];
      float* __restrict__ acc = DH > 0 ? local : acc_buf.data();
      for (int64_t i = 0; i < tq; ++i) {
        const float* __restrict__ p = prob + i * tk;
        float* __restrict__ dsi = ds.data() + i * tk;
        // dP[t] = g_i . v_t; the softmax's gradient dS = P * (dP - sum_t P dP)
        key_sums<DH>(gr + i * g2, gf + i * gs, vr, v2, vt.data(), tk, tkp, dh, dp.data());
#ifdef __AVX512F__
        // in whole vectors, the last one masked (GCC made the short loops scalar stores and a reduction)
        __m512 dot16 = _mm512_setzero_ps();
        for (int64_t t = 0; t < tk; t += 16) {
          const __mmask16 m = tk - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (tk - t)) - 1);
          dot16 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, p + t), _mm512_maskz_loadu_ps(m, dp.data() + t), dot16);
        }
        const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(dot16)), sc = _mm512_set1_ps(scale);
        for (int64_t t = 0; t < tk; t += 16) {
          const __mmask16 m = tk - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (tk - t)) - 1);
          const __m512 pv = _mm512_maskz_loadu_ps(m, p + t);
          const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dp.data() + t), dot);
          _mm512_mask_storeu_ps(dsi + t, m, _mm512_mul_ps(_mm512_mul_ps(pv, d), sc));
        }
#else
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t t = 0; t < tk; ++t) dot += p[t] * dp[t];
#pragma omp simd
        for (int64_t t = 0; t < tk; ++t) dsi[t] = p[t] * (dp[t] - dot) * scale;
#endif
        E* __restrict__ dq_out = dqp + r * qb + i * qr_ + head * dh;
#ifdef __AVX512F__
        if constexpr (DH > 0 && DH % 16 == 0) continue;  // dq below, all queries at once
#endif
        for (int64_t d = 0; d < dh; ++d) acc[d] = 0.f;
        for (int64_t t = 0; t < tk; ++t) {
          if (p[t] == 0.f) continue;  // masked, or beyond the causal limit
          const float dst = dsi[t];
          const float* __restrict__ kt = kf + t * ks;
#pragma omp simd
          for (int64_t d = 0; d < dh; ++d) acc[d] += dst * kt[d];
        }
        for (int64_t d = 0; d < dh; ++d) store(dq_out + d, acc[d]);
      }
      E* dk_row = dkp + r * kb + head * dh;
      E* dv_row = dvp + r * kb + head * dh;
#ifdef __AVX512F__
      if constexpr (DH > 0 && DH % 16 == 0) {
        // dq_i = sum_t dS_it k_t; dk_t = sum_i dS_it q_i; dv_t = sum_i P_it g_i (zero weights where
        // P is: masked keys, or beyond the causal limit)
        weighted_sums16<DH / 16>(ds.data(), tk, 1, kf, ks, tk, dqp + r * qb + head * dh, qr_, tq);
        weighted_sums16<DH / 16>(ds.data(), 1, tk, qf, qs, tq, dk_row, kr_, tk);
        weighted_sums16<DH / 16>(prob, 1, tk, gf, gs, tq, dv_row, kr_, tk);
        continue;
      }
#endif
      for (int64_t t = 0; t < tk; ++t) {
        E* __restrict__ dk_out = dk_row + t * kr_;
        E* __restrict__ dv_out = dv_row + t * kr_;
        float* __restrict__ dk = acc;
        float* __restrict__ dv = acc + dh;
        for (int64_t d = 0; d < dh; ++d) dk[d] = dv[d] = 0.f;
        for (int64_t i = 0; i < tq; ++i) {
          const float pt = prob[i * tk + t];
          if (pt == 0.f) continue;
          const float dst = ds[i * tk + t];
          const float* __restrict__ qi = qf + i * qs;
          const float* __restrict__ gi = gf + i * gs;
#pragma omp simd
          for (int64_t d = 0; d < dh; ++d) {
            dk[d] += dst * qi[d];
            dv[d] += pt * gi[d];
          }
        }
        for (int64_t d = 0; d < dh; ++d) store(dk_out + d, dk[d]);
        for (int64_t d = 0; d < dh; ++d) store(dv_out + d, dv[d]);
      }
    }
  });
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              op, ": q, k, v must all be float32 or all bfloat16");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be (rows, heads, len, dh)");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, op, ": innermost dim must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              op, ": k, v must match q's rows, heads and dh");
}

std::tuple<at::Tensor, at::Tensor> attention_train(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& mask, bool causal, double scale) {
  check_qkv("attention_train", q, k, v);
  const Shape z{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(!causal || z.tq <= z.tk, "attention_train: causal needs no more queries than keys");
  const bool has_mask = mask.defined() && mask.numel();
  if (has_mask) {
    TORCH_CHECK(mask.scalar_type() == at::kBool &&
                    ((mask.dim() == 2 && mask.size(0) == z.b && mask.size(1) == z.tk) ||
                     (mask.dim() == 3 && mask.size(0) == z.b && mask.size(1) == z.tq && mask.size(2) == z.tk)),
                "attention_train: mask must be bool (rows, keys) or (rows, queries, keys)");
  }
  auto out = at::empty({z.b, z.tq, z.h * z.dh}, q.options());
  auto probs = at::empty({z.b, z.h, z.tq, z.tk}, q.options().dtype(at::kFloat));
  if (z.b * z.h * z.tq == 0) return {out, probs};
  TORCH_CHECK(z.tk > 0, "attention_train: no keys");
  const bool* mp = has_mask ? mask.data_ptr<bool>() : nullptr;
  const bool per_query = has_mask && mask.dim() == 3;
  const int64_t mr = has_mask ? mask.stride(0) : 0, mq = per_query ? mask.stride(1) : 0;
  const int64_t ms = has_mask ? mask.stride(mask.dim() - 1) : 0;
  const float sc = static_cast<float>(scale);
  float* pp = probs.data_ptr<float>();
  auto run = [&](auto* op) {
    using E = std::remove_pointer_t<decltype(op)>;
    switch (z.dh) {
      case 32: forward_run<32, E>(q, k, v, mp, mr, mq, ms, causal, sc, z, op, pp); break;
      case 48: forward_run<48, E>(q, k, v, mp, mr, mq, ms, causal, sc, z, op, pp); break;
      case 64: forward_run<64, E>(q, k, v, mp, mr, mq, ms, causal, sc, z, op, pp); break;
      default: forward_run<0, E>(q, k, v, mp, mr, mq, ms, causal, sc, z, op, pp);
    }
  };
  if (q.scalar_type() == at::kFloat) {
    run(elements_mut<float>(out));
  } else {
    run(elements_mut<uint16_t>(out));
  }
  return {out, probs};
}

void attention_train_backward_into(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& probs, double scale, const at::Tensor& dq,
                                   const at::Tensor& dk, const at::Tensor& dv) {
  check_qkv("attention_train_backward", q, k, v);
  const Shape z{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(grad.scalar_type() == q.scalar_type() && grad.sizes() == q.sizes() && grad.stride(3) == 1,
              "attention_train_backward: grad must be of q's dtype and shape, innermost dim contiguous");
  TORCH_CHECK(probs.scalar_type() == at::kFloat && probs.is_contiguous() &&
                  probs.sizes() == at::IntArrayRef({z.b, z.h, z.tq, z.tk}),
              "attention_train_backward: probs must be attention_train's (rows, heads, queries, keys)");
  auto heads_contiguous = [&](const at::Tensor& t, int64_t len) {
    return t.scalar_type() == q.scalar_type() && t.dim() == 4 &&
           t.sizes() == at::IntArrayRef({z.b, len, z.h, z.dh}) && t.stride(3) == 1 && t.stride(2) == z.dh;
  };
  TORCH_CHECK(heads_contiguous(dq, z.tq) && heads_contiguous(dk, z.tk) && heads_contiguous(dv, z.tk) &&
                  dk.strides() == dv.strides(),
              "attention_train_backward: dq (rows, Tq, heads, dh), dk and dv (rows, Tk, heads, dh) of q's dtype, "
              "heads contiguous, dk and dv with the same strides");
  if (z.b * z.h == 0) return;
  if (z.tq == 0) {
    dk.zero_();
    dv.zero_();
    return;
  }
  const float sc = static_cast<float>(scale);
  const float* pp = probs.data_ptr<float>();
  const int64_t qb = dq.stride(0), qr = dq.stride(1), kb = dk.stride(0), kr = dk.stride(1);
  auto run = [&](auto* dqp) {
    using E = std::remove_pointer_t<decltype(dqp)>;
    E* dkp = elements_mut<E>(dk);
    E* dvp = elements_mut<E>(dv);
    switch (z.dh) {
      case 32: backward_run<32, E>(grad, q, k, v, pp, sc, z, dqp, dkp, dvp, qb, qr, kb, kr); break;
      case 48: backward_run<48, E>(grad, q, k, v, pp, sc, z, dqp, dkp, dvp, qb, qr, kb, kr); break;
      case 64: backward_run<64, E>(grad, q, k, v, pp, sc, z, dqp, dkp, dvp, qb, qr, kb, kr); break;
      default: backward_run<0, E>(grad, q, k, v, pp, sc, z, dqp, dkp, dvp, qb, qr, kb, kr);
    }
  };
  if (q.scalar_type() == at::kFloat) {
    run(elements_mut<float>(dq));
  } else {
    run(elements_mut<uint16_t>(dq));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_train_backward(const at::Tensor& grad, const at::Tensor& q,
                                                                        const at::Tensor& k, const at::Tensor& v,
                                                                        const at::Tensor& probs, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "attention_train_backward: q, k, v must be (rows, heads, len, dh)");
  auto dq = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options());
  auto dk = at::empty({k.size(0), k.size(2), k.size(1), k.size(3)}, q.options());
  auto dv = at::empty({k.size(0), k.size(2), k.size(1), k.size(3)}, q.options());
  attention_train_backward_into(grad, q, k, v, probs, scale, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(transduce, m) {
  m.def("attention_train(Tensor q, Tensor k, Tensor v, Tensor mask, bool causal, float scale) -> (Tensor, Tensor)",
        &attention_train);
  m.def("attention_train_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor probs, float scale) "
        "-> (Tensor, Tensor, Tensor)",
        &attention_train_backward);
  m.def("attention_train_backward_into(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor probs, float scale, "
        "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv) -> ()",
        &attention_train_backward_into);
}
