// GELU (the erf form) or ReLU for training, with the preceding projection's bias: the forward pass
// writes the derivative beside the output, so the backward pass is a product. Gated units (GEGLU,
// SwiGLU) likewise: the forward pass keeps both factors of the gradient.
//
// PyTorch's GELU keeps its input for the backward pass, which evaluates erf and exp there again:
// forward and backward each cost a transcendental evaluation per element. Here one pass per element
// gives both Phi(x) and phi(x) from a single exp: erf by Abramowitz and Stegun 7.1.26,
// erf(a) = 1 - q(t) exp(-a^2) with t = 1 / (1 + 0.3275911 a) (absolute error under 1.5e-7), and
// exp(-a^2) with a = |x| / sqrt(2) is sqrt(2 pi) phi(x).
//
// In bf16 GELU is a table instead: v rounded to bf16 has 65,536 values, and one 256 KB table holds
// y and d for each, computed in double precision and rounded once (exact, where the polynomial
// could land a bf16 step off). A gather of 16 entries replaces ~35 vector operations, which made
// the pass bound by arithmetic on an AMD EPYC (Zen 4: 512-bit operations at half rate): a
// (2304, 1024) bf16 pass with a bias on 2 threads, 1.0 ms -> 0.71-1.04 alone (the spread: the sums
// reach more of the table than L1 holds), 1.50 -> 0.83 ms inside a training step.
//
// Inside a training step these passes are bound by memory, not arithmetic (a (2304, 1024) bf16
// GELU took 3.3 ms in a step of the G2P model against 0.8 ms on the same tensor kept in cache), so
// they move as few bytes as they can. The projection runs without its bias and the bias is added
// here (an addmm first writes the broadcast bias into its output); the derivative can take the
// input's place in memory (the input is needed for nothing else, and lines just read need no
// read-for-ownership as a fresh buffer's do); the backward pass writes the gradient over the
// derivative and sums the bias gradient as it goes, instead of a separate pass.
//
//   bias_act_train(x, bias, act, overwrite) -> (y, d)
//     x (..., n) float32 or bfloat16 CPU tensor (made contiguous); bias float32 (n) or None;
//     act 1 = ReLU, 2 = GELU. v = x + bias; y = act(v) and d = act'(v) in x's dtype (bf16 rounded
//     to nearest even, as PyTorch's cast); d is written into x itself when `overwrite` (x must then
//     be contiguous). GELU: y = v Phi(v), d = Phi(v) + v phi(v), absolute error under 5e-7 in
//     float32 (PyTorch's own: ~1e-7); Phi of a negative v is q exp(-a^2) / 2 itself, not 1 + erf,
//     so the far tail is small rather than 0 (PyTorch's is 0 below v = -5.5). In bf16, v is rounded
//     to bf16 (as PyTorch's addmm rounds its output with the bias added) and y and d are the exact
//     values rounded to nearest even; infinities give their limits (0 and 0 at -inf, inf and 1 at
//     inf), NaN gives NaN. ReLU: y = max(v, 0), d = 1 where v > 0, else 0.
//   bias_glu_train(x, bias, act, overwrite) -> (y, d)
//     A gated linear unit (GEGLU with act 2, SwiGLU with act 3; Shazeer 2020): x (..., 2n) holds the
//     gate's projection in its first n columns and the linear one's in its last n; bias (2n) or None.
//     With g and l those halves plus their biases (each rounded to bf16 in bf16), y (..., n) =
//     act(g) l and d (..., 2n) = [act'(g) l | act(g)], each rounded once to x's dtype (act(g) itself
//     first, as PyTorch's bf16 activation output is); d is written into x when `overwrite`. SiLU:
//     y = v sigma(v), d = sigma(v) (1 + v (1 - sigma(v))); in bf16 both by a table, as GELU.
//   act_backward(g, d, bias_grad) -> (dx, db)
//     g and d contiguous, of one shape and dtype: dx = g * d, written into d (which is returned);
//     or d of twice g's last dimension (a gated unit's): dx = [g * d1 | g * d2] for d's halves;
//     db = dx summed over every dimension but the last, in float32 and a fixed order (blocks of
//     rows, then the blocks one after another: the same bits on any thread count), or an empty
//     tensor when not `bias_grad`.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "rows.h"

namespace {

using transduce_kernels::load;
using transduce_kernels::store;
#ifdef __AVX512F__
using transduce_kernels::bf16_round16;
using transduce_kernels::load16;
using transduce_kernels::store16;
#endif

// exp(v) for v in [-80, 0]: v = n ln2 + r, |r| <= ln2 / 2 (ln2 in two parts), exp(r) by Cephes'
// expf polynomial (relative error ~1e-7), 2^n added to the exponent's bits. Straight-line
// arithmetic, so the loop around it vectorises (glibc's vector expf is a call per vector).
inline float exp_neg(float v) {
  const float n = std::floor(v * 1.44269504f + 0.5f);
  const float r = (v - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = (p * r * r + r) + 1.f;
  int32_t bits;
  std::memcpy(&bits, &e, sizeof bits);
  bits += static_cast<int32_t>(n) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

#ifdef __AVX512F__
// 16 lanes of gelu1 (below) at a time in AVX-512, for float32 (bf16 takes the table): the division by
// the 14-bit reciprocal and a Newton step, the exponent by scalef. On an AMD EPYC (Zen 4), (1000,
// 768) bf16 on one thread, when bf16 took this path too: 500 us against 516 for the scalar loop as
// GCC vectorises it; (4000, 1024): 2,704 us, PyTorch's forward 1,791 and backward 3,373.
template <typename T>
inline void gelu16(__m512 v, T* y, T* d) {
  const __m512 a = _mm512_mul_ps(_mm512_abs_ps(v), _mm512_set1_ps(0.70710678f));
  const __m512 den = _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f));
  __m512 t = _mm512_rcp14_ps(den);
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.f)));
  __m512 q = _mm512_set1_ps(1.061405429f);
  for (const float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f}) q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(c));
  q = _mm512_mul_ps(q, t);
  const __m512 s = _mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a), _mm512_set1_ps(-80.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(s, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), s));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __m512 e = _mm512_scalef_ps(_mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f)), n);
  const __m512 tail = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), q), e);
  const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 phi = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(1.f), tail), tail);
  store16(y, _mm512_mul_ps(v, phi));
  store16(d, _mm512_fmadd_ps(_mm512_mul_ps(v, e), _mm512_set1_ps(0.39894228f), phi));
}

template <typename T>
inline void relu16(__m512 v, T* y, T* d) {
  const __mmask16 pos = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
  store16(y, _mm512_maskz_mov_ps(pos, v));
  store16(d, _mm512_maskz_mov_ps(pos, _mm512_set1_ps(1.f)));
}
#endif

enum Act : int64_t { kRelu = 1, kGelu = 2, kSilu = 3 };

// The bf16 value nearest to v (ties to even), by comparing the float32 rounding's neighbours in
// double precision: rounding v to float32 first could land on a bf16 tie and round it the wrong way.
// v is finite; so are the candidates (NaN is tested on the bits: this file is built with -ffast-math).
uint16_t bf16_nearest(double v) {
  const float f = static_cast<float>(v);
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t mid = u >> 16;
  auto value = [](uint32_t c) {
    const uint32_t cu = (c & 0xFFFFu) << 16;
    float cf;
    std::memcpy(&cf, &cu, sizeof cf);
    return static_cast<double>(cf);
  };
  uint32_t best = mid;
  double best_err = std::fabs(value(mid) - v);
  for (uint32_t c : {mid - 1, mid + 1}) {
    if ((c & 0x7F80u) == 0x7F80u || ((c ^ mid) & 0x8000u) != 0) continue;  // not finite, or across zero
    const double err = std::fabs(value(c) - v);
    if (err < best_err || (err == best_err && (c & 1u) == 0)) {
      best = c;
      best_err = err;
    }
  }
  return static_cast<uint16_t>(best);
}

// GELU or SiLU and their derivatives at v, in double precision.
void act_exact(int64_t act, double v, double& y, double& d) {
  if (act == kGelu) {
    const double cdf = 0.5 * std::erfc(-v / std::sqrt(2.0));
    y = v * cdf;
    d = cdf + v * std::exp(-0.5 * v * v) / std::sqrt(2.0 * M_PI);
  } else {  // SiLU; for v far below 0, exp(-v) is inf and sigma 0
    const double sigma = 1.0 / (1.0 + std::exp(-v));
    y = v * sigma;
    d = sigma * (1.0 + v * (1.0 - sigma));
  }
}

// Entry i: (y << 16) | d for the bf16 value whose bits are i; act kGelu or kSilu.
std::vector<uint32_t> make_bf16_table(int64_t act) {
  std::vector<uint32_t> t(65536);
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint32_t exponent = (i >> 7) & 0xFFu, mantissa = i & 0x7Fu;
    uint32_t y, d;
    if (exponent == 0xFFu && mantissa != 0) {  // NaN (tested on the bits: built with -ffast-math)
      y = d = 0x7FC0u;
    } else if (exponent == 0xFFu) {  // infinities: their limits
      y = (i & 0x8000u) ? 0u : i;
      d = (i & 0x8000u) ? 0u : 0x3F80u;
    } else {
      const uint32_t u = i << 16;
      float f;
      std::memcpy(&f, &u, sizeof f);
      double yv, dv;
      act_exact(act, f, yv, dv);
      y = bf16_nearest(yv);
      d = bf16_nearest(dv);
    }
    t[i] = (y << 16) | d;
  }
  return t;
}

const uint32_t* act_bf16_table(int64_t act) {
  if (act == kSilu) {
    static const std::vector<uint32_t> silu = make_bf16_table(kSilu);
    return silu.data();
  }
  static const std::vector<uint32_t> gelu = make_bf16_table(kGelu);
  return gelu.data();
}

// GELU of 16 bf16 values (bits zero-extended to 32) by the table: y and d stored as bf16.
#ifdef __AVX512F__
inline void gelu16_bf16(__m512i bits, const uint32_t* table, uint16_t* y, uint16_t* d) {
  const __m512i e = _mm512_i32gather_epi32(bits, reinterpret_cast<const int*>(table), 4);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), _mm512_cvtepi32_epi16(_mm512_srli_epi32(e, 16)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_cvtepi32_epi16(e));
}
#endif

// One bf16 row of GELU by the table; x and d may be the same memory.
inline void gelu_row_bf16(const uint16_t* x, const float* bias, uint16_t* y, uint16_t* d, int64_t n,
                          const uint32_t* table) {
  int64_t j = 0;
#ifdef __AVX512F__
  for (; j + 16 <= n; j += 16) {
    __m512i bits;
    if (bias == nullptr) {
      bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)));
    } else {
      bits = _mm512_cvtepu16_epi32(bf16_round16(_mm512_add_ps(load16(x + j), _mm512_loadu_ps(bias + j))));
    }
    gelu16_bf16(bits, table, y + j, d + j);
  }
#endif
  for (; j < n; ++j) {
    uint16_t bits = x[j];
    if (bias != nullptr) store(&bits, load(x + j) + bias[j]);
    const uint32_t e = table[bits];
    y[j] = static_cast<uint16_t>(e >> 16);
    d[j] = static_cast<uint16_t>(e & 0xFFFFu);
  }
}

inline void gelu1(float v, float& y, float& d) {
  const float a = std::fabs(v) * 0.70710678f;
  const float t = 1.f / (1.f + 0.3275911f * a);
  const float q = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f +
                  t * (-1.453152027f + t * 1.061405429f))));
  const float e = exp_neg(std::max(-a * a, -80.f));  // exp(-x^2 / 2); below e^-80, Phi is 0 or 1 in float32
  const float tail = 0.5f * q * e;                  // Phi(-|x|)
  const float phi = v < 0.f ? tail : 1.f - tail;
  y = v * phi;
  d = phi + v * e * 0.39894228f;                     // Phi + x phi, phi = e / sqrt(2 pi)
}

inline void silu1(float v, float& y, float& d) {
  const float e = exp_neg(std::max(-std::fabs(v), -80.f));  // exp(-|v|)
  const float r = 1.f / (1.f + e);
  const float sigma = v < 0.f ? e * r : r;
  y = v * sigma;
  d = sigma * (1.f + v * (1.f - sigma));
}

// One row of n elements. x and d may be the same memory: each element is read before it is written.
template <int64_t A, typename T>
inline void act_row(const T* x, const float* bias, T* y, T* d, int64_t n) {
  int64_t j = 0;
#ifdef __AVX512F__
  for (; j + 16 <= n; j += 16) {
    __m512 v = load16(x + j);
    if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j));
    if constexpr (A == kGelu) gelu16(v, y + j, d + j); else relu16(v, y + j, d + j);
  }
#endif
#pragma omp simd
  for (int64_t i = j; i < n; ++i) {
    const float v = load(x + i) + (bias == nullptr ? 0.f : bias[i]);
    float yv, dv;
    if constexpr (A == kGelu) {
      gelu1(v, yv, dv);
    } else {
      yv = v > 0.f ? v : 0.f;
      dv = v > 0.f ? 1.f : 0.f;
    }
    store(y + i, yv);
    store(d + i, dv);
  }
}

template <int64_t A, typename T>
void act_rows(const T* x, const float* bias, T* y, T* d, int64_t rows, int64_t n) {
  const uint32_t* table = nullptr;
  if constexpr (A == kGelu && std::is_same_v<T, uint16_t>) table = act_bf16_table(kGelu);
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if constexpr (A == kGelu && std::is_same_v<T, uint16_t>) {
        gelu_row_bf16(x + r * n, bias, y + r * n, d + r * n, n, table);
      } else {
        act_row<A>(x + r * n, bias, y + r * n, d + r * n, n);
      }
    }
  });
}

// One row of a gated unit: x (2n: gate, then linear) -> y (n) and d (2n: act'(g) l, then act(g)).
// x and d may be the same memory: each element is read before it is written.
template <typename T>
inline void glu_row(const T* x, const float* bias, T* y, T* d, int64_t n, int64_t act, const uint32_t* table) {
  const float* lbias = bias == nullptr ? nullptr : bias + n;
  if constexpr (std::is_same_v<T, uint16_t>) {
    int64_t j = 0;
#ifdef __AVX512F__
    for (; j + 16 <= n; j += 16) {
      __m256i g16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j));
      if (bias != nullptr) g16 = bf16_round16(_mm512_add_ps(load16(x + j), _mm512_loadu_ps(bias + j)));
      __m512 l = load16(x + n + j);
      if (bias != nullptr)  // rounded to bf16, as the projection's output with its bias would be
        l = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(bf16_round16(_mm512_add_ps(l, _mm512_loadu_ps(lbias + j)))), 16));
      const __m512i e = _mm512_i32gather_epi32(_mm512_cvtepu16_epi32(g16), reinterpret_cast<const int*>(table), 4);
      const __m512 a = _mm512_castsi512_ps(_mm512_and_si512(e, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
      const __m512 da = _mm512_castsi512_ps(_mm512_slli_epi32(e, 16));
      store16(y + j, _mm512_mul_ps(a, l));
      store16(d + j, _mm512_mul_ps(da, l));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + n + j), _mm512_cvtepi32_epi16(_mm512_srli_epi32(e, 16)));
    }
#endif
    for (; j < n; ++j) {
      uint16_t gbits = x[j], lbits = x[n + j];
      if (bias != nullptr) {
        store(&gbits, load(x + j) + bias[j]);
        store(&lbits, load(x + n + j) + lbias[j]);
      }
      const uint32_t e = table[gbits];
      const uint16_t abits = static_cast<uint16_t>(e >> 16), dbits = static_cast<uint16_t>(e & 0xFFFFu);
      const float l = load(&lbits);
      store(y + j, load(&abits) * l);
      store(d + j, load(&dbits) * l);
      d[n + j] = abits;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float g = x[j] + (bias == nullptr ? 0.f : bias[j]);
      const float l = x[n + j] + (bias == nullptr ? 0.f : lbias[j]);
      float a, da;
      if (act == kGelu) gelu1(g, a, da); else silu1(g, a, da);
      y[j] = a * l;
      d[j] = da * l;
      d[n + j] = a;
    }
  }
}

template <typename T>
void glu_rows(const T* x, const float* bias, T* y, T* d, int64_t rows, int64_t n, int64_t act) {
  const uint32_t* table = std::is_same_v<T, uint16_t> ? act_bf16_table(act) : nullptr;
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(2 * n, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) glu_row(x + r * 2 * n, bias, y + r * n, d + r * 2 * n, n, act, table);
  });
}

// dx = g * d over rows [r0, r1), into d; the products added to acc when given. A row of d holds
// `parts` segments of n (2 for a gated unit's), each multiplied by g's row; acc holds parts * n.
template <typename T>
void backward_rows(const T* g, T* d, int64_t r0, int64_t r1, int64_t n, int64_t parts, float* acc) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* gr = g + r * n;
    for (int64_t part = 0; part < parts; ++part) {
      T* dr = d + (r * parts + part) * n;
      float* ac = acc == nullptr ? nullptr : acc + part * n;
      int64_t j = 0;
#ifdef __AVX512F__
      for (; j + 16 <= n; j += 16) {
        const __m512 v = _mm512_mul_ps(load16(gr + j), load16(dr + j));
        store16(dr + j, v);
        if (ac != nullptr) _mm512_storeu_ps(ac + j, _mm512_add_ps(_mm512_loadu_ps(ac + j), v));
      }
#endif
      for (; j < n; ++j) {
        const float v = load(gr + j) * load(dr + j);
        store(dr + j, v);
        if (ac != nullptr) ac[j] += v;
      }
    }
  }
}

// Rows per block of the bias gradient's sum: fixed, so the order of the additions is too.
constexpr int64_t kBlockRows = 64;

template <typename T>
void act_backward_typed(const T* g, T* d, int64_t rows, int64_t n, int64_t parts, float* db) {
  if (db == nullptr) {
    at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(parts * n, 1)), [&](int64_t r0, int64_t r1) {
      backward_rows(g, d, r0, r1, n, parts, nullptr);
    });
    return;
  }
  const int64_t width = parts * n, blocks = (rows + kBlockRows - 1) / kBlockRows;
  std::vector<float> partial(static_cast<size_t>(blocks * width), 0.f);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      backward_rows(g, d, b * kBlockRows, std::min(rows, (b + 1) * kBlockRows), n, parts, partial.data() + b * width);
  });
  for (int64_t b = 0; b < blocks; ++b) {
    const float* p = partial.data() + b * width;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) db[j] += p[j];
  }
}

// x (made contiguous) and the float32 bias (or nullptr) of a training activation kernel, checked.
struct ActInput {
  at::Tensor x, bias_tensor;
  const float* bias = nullptr;
};

ActInput act_input(const char* name, const at::Tensor& x_in, const c10::optional<at::Tensor>& bias_in,
                   bool overwrite, int64_t bias_len) {
  TORCH_CHECK(x_in.device().is_cpu() && (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              name, ": float32 or bfloat16 CPU tensors only");
  TORCH_CHECK(x_in.dim() >= 1, name, ": x needs at least one dimension");
  TORCH_CHECK(!overwrite || x_in.is_contiguous(), name, ": overwrite needs a contiguous x");
  ActInput in{x_in.contiguous(), at::Tensor()};
  if (bias_in.has_value() && bias_in->defined()) {
    in.bias_tensor = bias_in->contiguous();
    TORCH_CHECK(in.bias_tensor.scalar_type() == at::kFloat && in.bias_tensor.dim() == 1 && in.bias_tensor.size(0) == bias_len,
                name, ": bias must be float32 of shape (", bias_len, "), got ", in.bias_tensor.scalar_type(), " ",
                in.bias_tensor.sizes());
    in.bias = in.bias_tensor.data_ptr<float>();
  }
  return in;
}

std::tuple<at::Tensor, at::Tensor> bias_act_train(const at::Tensor& x_in, const c10::optional<at::Tensor>& bias_in,
                                                  int64_t act, bool overwrite) {
  TORCH_CHECK(act == kRelu || act == kGelu, "bias_act_train: act must be 1 (ReLU) or 2 (GELU), got ", act);
  const ActInput in = act_input("bias_act_train", x_in, bias_in, overwrite, x_in.dim() >= 1 ? x_in.size(-1) : 0);
  const at::Tensor& x = in.x;
  const float* bias = in.bias;
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto d = overwrite ? x : at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.scalar_type() == at::kFloat) {
    const float* xp = x.data_ptr<float>();
    if (act == kGelu) act_rows<kGelu>(xp, bias, y.data_ptr<float>(), d.data_ptr<float>(), rows, n);
    else act_rows<kRelu>(xp, bias, y.data_ptr<float>(), d.data_ptr<float>(), rows, n);
  } else {
    const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
    auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>());
    auto* dp = reinterpret_cast<uint16_t*>(d.data_ptr<c10::BFloat16>());
    if (act == kGelu) act_rows<kGelu>(xp, bias, yp, dp, rows, n);
    else act_rows<kRelu>(xp, bias, yp, dp, rows, n);
  }
  return {y, d};
}

std::tuple<at::Tensor, at::Tensor> bias_glu_train(const at::Tensor& x_in, const c10::optional<at::Tensor>& bias_in,
                                                  int64_t act, bool overwrite) {
  TORCH_CHECK(act == kGelu || act == kSilu, "bias_glu_train: act must be 2 (GEGLU) or 3 (SwiGLU), got ", act);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) % 2 == 0, "bias_glu_train: x's last dimension must be even (gate, "
              "then linear), got ", x_in.sizes());
  const ActInput in = act_input("bias_glu_train", x_in, bias_in, overwrite, x_in.size(-1));
  const at::Tensor& x = in.x;
  const int64_t n = x.size(-1) / 2, rows = n == 0 ? 0 : x.numel() / (2 * n);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  auto y = at::empty(shape, x.options());
  auto d = overwrite ? x : at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.scalar_type() == at::kFloat) {
    glu_rows(x.data_ptr<float>(), in.bias, y.data_ptr<float>(), d.data_ptr<float>(), rows, n, act);
  } else {
    glu_rows(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()), in.bias,
             reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>()),
             reinterpret_cast<uint16_t*>(d.data_ptr<c10::BFloat16>()), rows, n, act);
  }
  return {y, d};
}

std::tuple<at::Tensor, at::Tensor> act_backward(const at::Tensor& g, const at::Tensor& d, bool bias_grad) {
  TORCH_CHECK(g.device().is_cpu() && d.device().is_cpu() && g.scalar_type() == d.scalar_type() &&
              (g.scalar_type() == at::kFloat || g.scalar_type() == at::kBFloat16),
              "act_backward: g and d must be CPU tensors of one dtype, float32 or bfloat16");
  TORCH_CHECK(g.is_contiguous() && d.is_contiguous() && d.dim() >= 1 && g.dim() == d.dim() &&
              g.sizes().slice(0, g.dim() - 1) == d.sizes().slice(0, d.dim() - 1) &&
              (d.size(-1) == g.size(-1) || d.size(-1) == 2 * g.size(-1)),
              "act_backward: g and d must be contiguous, of one shape or d of twice g's last dimension, got ",
              g.sizes(), " and ", d.sizes());
  const int64_t n = g.size(-1), parts = d.size(-1) == n ? 1 : 2, rows = n == 0 ? 0 : g.numel() / n;
  at::Tensor db = bias_grad ? at::zeros({parts * n}, d.options().dtype(at::kFloat))
                            : at::empty({0}, d.options().dtype(at::kFloat));
  float* dbp = bias_grad ? db.data_ptr<float>() : nullptr;
  if (d.scalar_type() == at::kFloat) {
    act_backward_typed(g.data_ptr<float>(), d.data_ptr<float>(), rows, n, parts, dbp);
  } else {
    act_backward_typed(reinterpret_cast<const uint16_t*>(g.data_ptr<c10::BFloat16>()),
                       reinterpret_cast<uint16_t*>(d.data_ptr<c10::BFloat16>()), rows, n, parts, dbp);
  }
  return {d, db};
}

std::tuple<at::Tensor, at::Tensor> gelu_train(const at::Tensor& x) {
  return bias_act_train(x, c10::nullopt, kGelu, false);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(transduce, m) {
  m.def("gelu_train(Tensor x) -> (Tensor, Tensor)", &gelu_train);
  m.def("bias_act_train(Tensor x, Tensor? bias, int act, bool overwrite) -> (Tensor, Tensor)", &bias_act_train);
  m.def("bias_glu_train(Tensor x, Tensor? bias, int act, bool overwrite) -> (Tensor, Tensor)", &bias_glu_train);
  m.def("act_backward(Tensor g, Tensor d, bool bias_grad) -> (Tensor, Tensor)", &act_backward);
}
