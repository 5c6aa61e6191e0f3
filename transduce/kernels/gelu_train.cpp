// GELU (the erf form) for training: the forward pass writes the derivative beside the output, so the
// backward pass is a product.
//
// PyTorch's GELU keeps its input for the backward pass, which evaluates erf and exp there again:
// forward and backward each cost a transcendental evaluation per element (5-10% of a bf16
// training step of the G2P models, as much as their LayerNorms). Here one pass per element gives
// both Phi(x) and phi(x) from a single exp: erf by Abramowitz and Stegun 7.1.26,
// erf(a) = 1 - q(t) exp(-a^2) with t = 1 / (1 + 0.3275911 a) (absolute error under 1.5e-7), and
// exp(-a^2) with a = |x| / sqrt(2) is sqrt(2 pi) phi(x). The derivative takes the input's place
// in memory (the input is needed for nothing else), and the backward pass reads it and the
// gradient once: dx = dy * d.
//
//   gelu_train(x) -> (y, d)
//     x float32 or bfloat16 CPU tensor (made contiguous); y = x Phi(x) and d = Phi(x) + x phi(x)
//     in x's dtype (bf16 rounded to nearest even, as PyTorch's cast). Absolute error under 5e-7
//     in float32 (PyTorch's own: ~1e-7); Phi of a negative x is q exp(-a^2) / 2 itself, not 1 + erf,
//     so the far tail is small rather than 0 (PyTorch's is 0 below x = -5.5).
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "rows.h"

namespace {

using transduce_kernels::load;
using transduce_kernels::store;

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
// 16 lanes of the loop below in AVX-512: the division by the 14-bit reciprocal and a Newton step
// (without it, 0.4% of bf16 results for x > -3 moved by one step: 4% faster, not kept), the
// exponent by scalef, bf16 stores by the CPU's conversion where it has one. On an AMD EPYC (Zen 4),
// (1000, 768) bf16 on one thread: 500 us against 516 for the scalar loop as GCC vectorises it;
// (4000, 1024): 2,704 us, PyTorch's forward 1,791 and backward 3,373, the product here 792.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(uint16_t* p, __m512 v) {  // round to nearest, ties to even
#ifdef __AVX512BF16__
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  return;
#endif
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

template <typename T>
inline void gelu16(const T* x, T* y, T* d) {
  const __m512 v = load16(x);
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
#endif

template <typename T>
void run(const T* __restrict__ x, T* __restrict__ y, T* __restrict__ d, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
#ifdef __AVX512F__
    for (; begin + 16 <= end; begin += 16) gelu16(x + begin, y + begin, d + begin);
#endif
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float v = load(x + i);
      const float a = std::fabs(v) * 0.70710678f;
      const float t = 1.f / (1.f + 0.3275911f * a);
      const float q = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f +
                      t * (-1.453152027f + t * 1.061405429f))));
      const float e = exp_neg(std::max(-a * a, -80.f));  // exp(-x^2 / 2); below e^-80, Phi is 0 or 1 in float32
      const float tail = 0.5f * q * e;                  // Phi(-|x|)
      const float phi = v < 0.f ? tail : 1.f - tail;
      store(y + i, v * phi);
      store(d + i, phi + v * e * 0.39894228f);           // Phi + x phi, phi = e / sqrt(2 pi)
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gelu_train(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu() && (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "gelu_train: float32 or bfloat16 CPU tensors only");
  const at::Tensor x = x_in.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto d = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.scalar_type() == at::kFloat) {
    run(x.data_ptr<float>(), y.data_ptr<float>(), d.data_ptr<float>(), x.numel());
  } else {
    run(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()),
        reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>()),
        reinterpret_cast<uint16_t*>(d.data_ptr<c10::BFloat16>()), x.numel());
  }
  return {y, d};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(transduce, m) {
  m.def("gelu_train(Tensor x) -> (Tensor, Tensor)", &gelu_train);
}
