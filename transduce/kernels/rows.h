// Helpers shared by the kernels: bf16 loads and stores (one element, or 16 in AVX-512), keys laid out transposed in whole vectors
// and one row's products with all of them (attention.cpp, attention_train.cpp), a row's LayerNorm
// (norm.cpp, norm_train.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace transduce_kernels {

// Built with -ffast-math (vectorised exp): no infinities anywhere. A masked key gets a score of
// -1e30, whose exp(score - top) is exactly 0; a query with every key masked gets zeros (as
// PyTorch's SDPA does).
constexpr float kMasked = -1e30f;

// Keys are padded to a multiple of the vector width: the loops over keys run whole vectors (G2P
// rows have 5-20 keys; a scalar remainder loop would be most of the work). Padded keys are zero
// in the transposed keys and masked in the scores.
constexpr int64_t kLanes = 8;
inline int64_t padded(int64_t t) { return (t + kLanes - 1) / kLanes * kLanes; }

// Elements in memory: float32, or bfloat16 held as its upper 16 bits (uint16_t). Plain shifts and
// adds, so loops over them vectorise as they do for float.
inline float load(const float* p) { return *p; }
inline void store(float* p, float v) { *p = v; }
inline float load(const uint16_t* p) {
  const uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store(uint16_t* p, float v) {  // round to nearest, ties to even (as PyTorch's cast)
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  *p = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#ifdef __AVX512F__
// 16 elements at a time in AVX-512: float32, or bf16 widened to float32 and stored rounded to
// nearest even (by the CPU's conversion where it has one).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// 16 floats rounded to bf16 (nearest even), as 16-bit lanes
inline __m256i bf16_round16(__m512 v) {
#ifdef __AVX512BF16__
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16));
#endif
}
inline void store16(uint16_t* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_round16(v)); }
#endif

// dst (dh, tp) = src (t_len, dh), rows `step` apart; columns t_len.. are left as they are (zero)
template <int DH, typename E>
inline void transpose(const E* src, int64_t step, int64_t t_len, int64_t dh_runtime, int64_t tp,
                      float* __restrict__ dst) {
  const int64_t dh = DH > 0 ? DH : dh_runtime;
  for (int64_t t = 0; t < t_len; ++t) {
    const E* __restrict__ row = src + t * step;
    for (int64_t d = 0; d < dh; ++d) dst[d * tp + t] = load(row + d);
  }
}

// dst (t_len, dh) contiguous = src rows `step` apart, as float
template <int DH, typename E>
inline void rows_to_float(const E* src, int64_t step, int64_t t_len, int64_t dh_runtime, float* __restrict__ dst) {
  const int64_t dh = DH > 0 ? DH : dh_runtime;
  for (int64_t t = 0; t < t_len; ++t) {
    const E* __restrict__ row = src + t * step;
#pragma omp simd
    for (int64_t d = 0; d < dh; ++d) dst[t * dh + d] = load(row + d);
  }
}

// s[0, tp) = sum_d x[d] * mt[d, :]: one row against every column of a transposed matrix (dh, tp).
// NV > 0 (tp == NV * kLanes): the sums stay in registers, in four partial sums over d so the
// multiply-adds do not wait on each other (with one accumulator in memory a query's 32 steps ran
// one at a time). NV == 0: any tp, summed in s.
template <int DH, int NV>
inline void row_sums(const float* __restrict__ x, const float* __restrict__ mt, int64_t tp, int64_t dh_runtime,
                     float* __restrict__ s) {
  constexpr int64_t P = 4, W = NV > 0 ? NV * kLanes : 1;
  const int64_t dh = DH > 0 ? DH : dh_runtime;
  if constexpr (NV > 0) {
    float acc[P][W] = {};
    int64_t d = 0;
    for (; d + P <= dh; d += P) {
      for (int64_t p = 0; p < P; ++p) {
        const float xd = x[d + p];
        const float* __restrict__ row = mt + (d + p) * W;
#pragma omp simd
        for (int64_t t = 0; t < W; ++t) acc[p][t] += xd * row[t];
      }
    }
    for (; d < dh; ++d) {
      const float xd = x[d];
#pragma omp simd
      for (int64_t t = 0; t < W; ++t) acc[0][t] += xd * mt[d * W + t];
    }
#pragma omp simd
    for (int64_t t = 0; t < W; ++t) s[t] = (acc[0][t] + acc[1][t]) + (acc[2][t] + acc[3][t]);
  } else {
    for (int64_t t = 0; t < tp; ++t) s[t] = 0.f;
    for (int64_t d = 0; d < dh; ++d) {
      const float xd = x[d];
      const float* __restrict__ row = mt + d * tp;
#pragma omp simd
      for (int64_t t = 0; t < tp; ++t) s[t] += xd * row[t];
    }
  }
}

// row_sums for any tp, in registers up to 4 vectors (32 keys).
template <int DH>
inline void row_sums_any(const float* x, const float* mt, int64_t tp, int64_t dh, float* s) {
  switch (tp / kLanes) {
    case 1: row_sums<DH, 1>(x, mt, tp, dh, s); break;
    case 2: row_sums<DH, 2>(x, mt, tp, dh, s); break;
    case 3: row_sums<DH, 3>(x, mt, tp, dh, s); break;
    case 4: row_sums<DH, 4>(x, mt, tp, dh, s); break;
    default: row_sums<DH, 0>(x, mt, tp, dh, s);
  }
}

// s[t] = exp(s[t] - top) for t < tp, returning the sum. Differences below -87 (exp < 1.7e-38, as
// masked keys' -1e30) give exactly 0 without reaching the vector exp's slow path for underflow.
inline float exp_shifted(float* __restrict__ s, int64_t tp, float top) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < tp; ++t) {
    const float x = s[t] - top;
    const float e = expf(x < -87.f ? -87.f : x);
    s[t] = x < -87.f ? 0.f : e;
    sum += s[t];
  }
  return sum;
}

// o[0, d) = LayerNorm(s) = (s - mean) / std * w + b, `mean` being s's; returns 1 / std. o may be s
// (normalised in place).
inline float normalize_row(const float* s, int64_t d, float mean, float eps, const float* __restrict__ w,
                           const float* __restrict__ b, float* o) {
  float var = 0.f;
#pragma omp simd reduction(+ : var)
  for (int64_t i = 0; i < d; ++i) {
    const float c = s[i] - mean;
    var += c * c;
  }
  const float rstd = 1.f / std::sqrt(var / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) o[i] = (s[i] - mean) * rstd * w[i] + b[i];
  return rstd;
}

}  // namespace transduce_kernels
