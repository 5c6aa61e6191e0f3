// Linear layers and feed-forward blocks for CPU inference, in blocks of rows whose intermediate
// results stay in the core's cache (`ffn` in float32; `int8_linear`, `int8_ffn` in int8).
//
// int8: y = x W^T (+ b), W quantized once per output channel, x quantized per row at each call,
// the product in int8 with int32 sums (at::_int_mm: oneDNN's VNNI kernels where the CPU has them,
// 2-4x float32's matmul at decoding sizes).
//
// Quantizing and scaling back are passes over memory, which on small rows cost as much as the
// product saves; so they are fused: `int8_linear` quantizes, multiplies and scales back (plus
// bias) in one call, and `int8_ffn` runs a feed-forward block, up -> bias + activation ->
// down, with the hidden layer going from int32 sums to int8 row by row in cache, never stored
// as float32.
//
//   x        (M, K) float32, rows contiguous
//   w        (N, K) int8 contiguous: round(W / w_scale), |w| <= 127
//   w_scale  (N,) float32: max |W[n, :]| / 127
//   bias     (N,) float32 or empty
//   act      0: none, 1: ReLU, 2: GELU (erf form); gated (Shazeer 2020), the up projection's rows
//            the gate's then the linear half's, the hidden layer act(gate) * linear, half as wide:
//            3: GEGLU (GELU gate), 4: SwiGLU (SiLU gate).
//
// Per row: s = max|x| / 127, q = round(x * (127 / max|x|)) (half to even; a zero row gives zeros);
// y[m, n] = acc[m, n] * (s[m] * w_scale[n]) + bias[n]. models/quantize.py does the same with
// PyTorch's ops where the kernels are not built.
//
// On a CPU with AMX int8 tiles (Sapphire Rapids and later), `int8_pack` lays a weight out once in
// the tiles' order and both ops take the packed weight (3-D) instead: the product runs on the
// tiles in blocks of 32 rows x 32 columns whose int32 sums go from the tile registers to a 4 KB
// buffer and on to float32 (scale, bias, activation) while in L1. At decoding sizes oneDNN's
// `_int_mm` spent as long reordering the weight and writing its (M, N) int32 product to memory as
// multiplying; here nothing of the product but the float32 result leaves the cache.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define TRANSDUCE_AMX 1
#endif

namespace {

enum Act : int64_t { kNone = 0, kRelu = 1, kGelu = 2, kGeglu = 3, kSwiglu = 4 };

inline bool gated(int64_t act) { return act == kGeglu || act == kSwiglu; }

// Quantize one row of k floats into o; returns its scale.
inline float quantize_row(const float* __restrict__ a, int64_t k, int8_t* __restrict__ o) {
  float top = 0.f;
#pragma omp simd reduction(max : top)
  for (int64_t i = 0; i < k; ++i) top = std::max(top, std::fabs(a[i]));
  const float inv = top > 0.f ? 127.f / top : 0.f;
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) o[i] = static_cast<int8_t>(std::nearbyint(a[i] * inv));
  return top / 127.f;
}

// erf by Abramowitz and Stegun 7.1.28, 1 - 1 / p(|z|)^16 (absolute error under 3e-7, float32's
// resolution near 1): a polynomial, four squarings and one division, no exp (1.6x faster than
// 7.1.26's form with exp here, where erff is a scalar call). |z| is capped at 6, where erf is 1
// in float32 and p^16 is still finite.
inline float gelu(float x) {
  const float z = x * 0.70710678f;
  const float az = std::min(std::fabs(z), 6.f);
  float p = 1.f + az * (0.0705230784f + az * (0.0422820123f + az * (0.0092705272f +
                   az * (0.0001520143f + az * (0.0002765672f + az * 0.0000430638f)))));
  p *= p;
  p *= p;
  p *= p;
  p *= p;
  const float e = 1.f - 1.f / p;  // erf(|z|)
  return 0.5f * x * (1.f + (z < 0.f ? -e : e));
}

inline float silu(float x) { return x / (1.f + std::exp(-x)); }

// o[0, f) = gate(h[j]) * h[f + j]: a gated unit's hidden row from its up projection's (2f wide, bias added)
inline void gate_row(const float* __restrict__ h, int64_t f, int64_t act, float* __restrict__ o) {
  if (act == kGeglu) {
#pragma omp simd
    for (int64_t j = 0; j < f; ++j) o[j] = gelu(h[j]) * h[f + j];
  } else {
    for (int64_t j = 0; j < f; ++j) o[j] = silu(h[j]) * h[f + j];
  }
}

void check_act(int64_t act, const char* what) {
  TORCH_CHECK(act >= kNone && act <= kSwiglu, what, ": act must be 0 (none), 1 (ReLU), 2 (GELU), 3 (GEGLU) or ",
              "4 (SwiGLU), got ", act);
}

void check_weight(const at::Tensor& w, const at::Tensor& w_scale, const at::Tensor& bias, int64_t k, const char* what) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.size(1) == k && w.is_contiguous(), what,
              ": weight must be int8 (N, K) contiguous with K = the input's width");
  const int64_t n = w.size(0);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == n && w_scale.is_contiguous(), what,
              ": weight scale must be float32 (N,)");
  TORCH_CHECK(!bias.defined() || !bias.numel() ||
                  (bias.scalar_type() == at::kFloat && bias.numel() == n && bias.is_contiguous()),
              what, ": bias must be float32 (N,) or empty");
}

void check_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1, what,
              ": input must be float32 (M, K) on the CPU with contiguous rows");
}

// o = act(o + bias) in place (bias may be null)
inline void activate_row(float* __restrict__ o, const float* __restrict__ bias, int64_t n, int64_t act) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] += bias[j];
  }
  if (act == kRelu) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = std::max(o[j], 0.f);
  } else if (act == kGelu) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = gelu(o[j]);
  }
}

// Row r of acc scaled back: o = acc * (s * ws) + bias, then the activation.
inline void dequantize_row(const int32_t* __restrict__ a, float s, const float* __restrict__ ws,
                           const float* __restrict__ bias, int64_t n, int64_t act, float* __restrict__ o) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = static_cast<float>(a[j]) * (s * ws[j]) + bias[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = static_cast<float>(a[j]) * (s * ws[j]);
  }
  activate_row(o, nullptr, n, act);
}

const float* maybe(const at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

// Rows go through in blocks of kBlock, each block's whole computation on one thread: the int32
// sums and the hidden layer of a block stay in that core's cache (the host's caches are small:
// streaming a (2000, 512) int32 product through memory cost more than the product).
constexpr int64_t kBlock = 128;

// `rows` rows of x (`xs` apart) quantized into q (their scales into `scale`), times wt (K, N):
// (rows, N) int32.
at::Tensor block_product(const float* x, int64_t xs, int64_t rows, int64_t k, const at::Tensor& q, float* scale,
                         const at::Tensor& wt) {
  int8_t* qp = q.data_ptr<int8_t>();
  for (int64_t r = 0; r < rows; ++r) scale[r] = quantize_row(x + r * xs, k, qp + r * k);
  return at::_int_mm(q.narrow(0, 0, rows), wt);
}


#ifdef TRANSDUCE_AMX
namespace tiles {

// Linux lets a process use the tile registers only once it has asked for them (once per process;
// oneDNN asks too, but it may not have run yet).
bool granted() {
  static const bool ok = [] {
    constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return ok;
}

// Tiles 0-3: int32 sums (2 x 2 blocks of 16 x 16); 4, 5: 16 rows x 64 int8 of the input; 6, 7: 64 x 16
// int8 of the weight, 4 consecutive k of a column next to each other (VNNI order).
struct alignas(64) Config {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

constexpr int64_t kRows = 32, kCols = 32, kDepth = 64;  // a block of rows, of columns; k per tile
inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// quantize_row for a row whose largest magnitude is known
inline float quantize_known(const float* __restrict__ a, int64_t k, float t, int8_t* __restrict__ o) {
  const __m512 inv = _mm512_set1_ps(t > 0.f ? 127.f / t : 0.f);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(a + i), inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), _mm512_cvtsepi32_epi8(q));
  }
  if (i < k) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (k - i)) - 1u);
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(tail, a + i), inv));
    _mm_mask_storeu_epi8(o + i, tail, _mm512_cvtsepi32_epi8(q));
  }
  return t / 127.f;
}

// quantize_row in AVX-512 (which every CPU with AMX has): GCC leaves the loop above scalar
// (nearbyint and the narrowing store), a third of the layer's time at decoding sizes. The vector
// conversion rounds half to even under the default rounding mode, as nearbyint does.
inline float quantize_row(const float* __restrict__ a, int64_t k, int8_t* __restrict__ o) {
  __m512 top = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(a + i)));
  const __mmask16 tail = static_cast<__mmask16>((1u << (k - i)) - 1u);
  if (i < k) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, a + i)));
  return quantize_known(a, k, _mm512_reduce_max_ps(top), o);
}

// gelu() on 16 lanes
inline __m512 gelu16(__m512 x) {
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678f));
  const __m512 az = _mm512_min_ps(_mm512_abs_ps(z), _mm512_set1_ps(6.f));
  __m512 p = _mm512_set1_ps(0.0000430638f);
  for (const float c : {0.0002765672f, 0.0001520143f, 0.0092705272f, 0.0422820123f, 0.0705230784f, 1.f})
    p = _mm512_fmadd_ps(p, az, _mm512_set1_ps(c));
  p = _mm512_mul_ps(p, p);
  p = _mm512_mul_ps(p, p);
  p = _mm512_mul_ps(p, p);
  p = _mm512_mul_ps(p, p);
  // 1 / p by the 14-bit reciprocal and one Newton step (error ~1e-7 relative, as the division's
  // rounding; the division alone was a third of a GELU feed-forward block's time)
  __m512 r = _mm512_rcp14_ps(p);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(p, r, _mm512_set1_ps(2.f)));
  const __m512 e = _mm512_sub_ps(_mm512_set1_ps(1.f), r);  // erf(|z|)
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(INT32_MIN));
  const __m512 erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(e), sign));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.f), erf));
}

// dequantize_row for a block's row (width <= kCols) in AVX-512: acc * (s * ws) + bias, activated;
// returns the largest magnitude written (masked lanes are zeros).
inline float dequantize_cols(const int32_t* __restrict__ acc, float s, const float* __restrict__ ws,
                             const float* __restrict__ bias, int64_t width, int64_t act, float* __restrict__ o) {
  const __m512 vs = _mm512_set1_ps(s);
  __m512 top = _mm512_setzero_ps();
  for (int64_t j = 0; j < width; j += 16) {
    const int64_t left = width - j;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
    const __m512 a = _mm512_cvtepi32_ps(_mm512_loadu_si512(acc + j));
    const __m512 scale = _mm512_mul_ps(vs, _mm512_maskz_loadu_ps(m, ws + j));
    __m512 v = bias ? _mm512_fmadd_ps(a, scale, _mm512_maskz_loadu_ps(m, bias + j)) : _mm512_mul_ps(a, scale);
    if (act == kRelu)
      v = _mm512_max_ps(v, _mm512_setzero_ps());
    else if (act == kGelu)
      v = gelu16(v);
    _mm512_mask_storeu_ps(o + j, m, v);
    top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_maskz_mov_ps(m, v)));
  }
  return _mm512_reduce_max_ps(top);
}


// A packed weight: (Np / 16, Kp / 4, 64) int8, Np = N rounded up to kCols, Kp = K to kDepth, zero
// where padded; column block c, depth d holds W[16 c + j][d] at [c][d / 4][4 j + d % 4]. The tile of
// columns 16c.. and depths 64t.. is the 1 KB at [c][16 t], rows 64 bytes apart.
at::Tensor pack(const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2, "int8_pack: weight must be int8 (N, K)");
  const at::Tensor wc = w.contiguous();
  const int64_t n = w.size(0), k = w.size(1), np = round_up(n, kCols), kp = round_up(k, kDepth);
  auto out = at::zeros({np / 16, kp / 4, 64}, w.options());
  const int8_t* src = wc.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < k; ++d) dst[((i / 16) * (kp / 4) + d / 4) * 64 + 4 * (i % 16) + d % 4] = src[i * k + d];
  return out;
}

// acc (kRows, kCols) int32 = a's rows (kp apart; the first 16 only when !kTwo) x the 32 columns
// whose tiles start at b0 and b1.
template <bool kTwo>
inline void product(const int8_t* a, int64_t kp, const int8_t* b0, const int8_t* b1, int32_t* acc) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (kTwo) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t t = 0; t < kp / kDepth; ++t) {
    _tile_loadd(4, a + t * kDepth, kp);
    if constexpr (kTwo) _tile_loadd(5, a + 16 * kp + t * kDepth, kp);
    _tile_loadd(6, b0 + t * 1024, 64);
    _tile_loadd(7, b1 + t * 1024, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    if constexpr (kTwo) {
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
  }
  _tile_stored(0, acc, kCols * 4);
  _tile_stored(1, acc + 16, kCols * 4);
  if constexpr (kTwo) {
    _tile_stored(2, acc + 16 * kCols, kCols * 4);
    _tile_stored(3, acc + 16 * kCols + 16, kCols * 4);
  }
}

// `rows` (<= kRows) quantized rows a (kp apart, scales `scale`) times a packed weight of n columns,
// scaled back, plus bias, activated: into out (rows ldo apart); with `top`, each row's largest
// magnitude is raised into it (the next quantization then needs no pass of its own).
void rows_times(const int8_t* a, int64_t kp, const float* scale, int64_t rows, const int8_t* wp, int64_t n,
                const float* ws, const float* bias, int64_t act, float* out, int64_t ldo, float* top = nullptr) {
  alignas(64) int32_t acc[kRows * kCols];
  const int64_t column_tiles = (kp / 4) * 64;  // bytes of one block of 16 columns
  for (int64_t c0 = 0; c0 < n; c0 += kCols) {
    const int8_t* b0 = wp + (c0 / 16) * column_tiles;
    if (rows > 16)
      product<true>(a, kp, b0, b0 + column_tiles, acc);
    else
      product<false>(a, kp, b0, b0 + column_tiles, acc);
    const int64_t width = std::min(kCols, n - c0);
    for (int64_t r = 0; r < rows; ++r) {
      const float t = dequantize_cols(acc + r * kCols, scale[r], ws + c0, bias ? bias + c0 : nullptr, width, act,
                                      out + r * ldo + c0);
      if (top != nullptr) top[r] = std::max(top[r], t);
    }
  }
}

// x's rows r0.. (up to kRows) quantized into a (kp apart; the padding past k stays zero)
inline int64_t quantize_rows(const float* x, int64_t xs, int64_t m, int64_t r0, int64_t k, int64_t kp, int8_t* a,
                             float* scale) {
  const int64_t rows = std::min(kRows, m - r0);
  for (int64_t r = 0; r < rows; ++r) scale[r] = quantize_row(x + (r0 + r) * xs, k, a + r * kp);
  return rows;
}

void check_packed(const at::Tensor& w, const at::Tensor& w_scale, const at::Tensor& bias, int64_t k,
                  const char* what) {
  TORCH_CHECK(granted(), what, ": the kernel could not get the CPU's AMX tiles from the OS (arch_prctl)");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 3 && w.size(1) * 4 == round_up(k, kDepth) &&
                  w.size(2) == 64 && w.is_contiguous(),
              what, ": packed weight must be int8_pack's layout for the input's width");
  const int64_t n = w_scale.numel();
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w.size(0) * 16 == round_up(n, kCols),
              what, ": weight scale must be float32 (N,) for the packed weight's columns");
  TORCH_CHECK(!bias.defined() || !bias.numel() ||
                  (bias.scalar_type() == at::kFloat && bias.numel() == n && bias.is_contiguous()),
              what, ": bias must be float32 (N,) or empty");
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale, const at::Tensor& bias) {
  const int64_t m = x.size(0), k = x.size(1), kp = round_up(k, kDepth), n = w_scale.numel();
  check_packed(w, w_scale, bias, k, "int8_linear");
  auto out = at::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* ws = w_scale.data_ptr<float>();
  const float* bp = maybe(bias);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, (m + kRows - 1) / kRows, 1, [&](int64_t b0, int64_t b1) {
    const Config config;
    _tile_loadconfig(&config);
    std::vector<int8_t> a(kRows * kp, 0);
    float scale[kRows];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t rows = quantize_rows(xp, x.stride(0), m, blk * kRows, k, kp, a.data(), scale);
      rows_times(a.data(), kp, scale, rows, wp, n, ws, bp, kNone, op + blk * kRows * n, n);
    }
    _tile_release();
  });
  return out;
}

at::Tensor ffn(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& s1, const at::Tensor& b1, int64_t act,
               const at::Tensor& w2, const at::Tensor& s2) {
  // gated: up has u = 2f columns (gate, linear), the hidden layer f
  const int64_t m = x.size(0), k = x.size(1), kp = round_up(k, kDepth), u = s1.numel();
  TORCH_CHECK(!gated(act) || u % 2 == 0, "int8_ffn: a gated block's up projection needs an even number of rows");
  const int64_t f = gated(act) ? u / 2 : u, fp = round_up(f, kDepth), d = s2.numel();
  check_packed(w1, s1, b1, k, "int8_ffn (up)");
  check_packed(w2, s2, at::Tensor(), f, "int8_ffn (down)");
  auto out = at::empty({m, d}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* bp1 = maybe(b1);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, (m + kRows - 1) / kRows, 1, [&](int64_t b0, int64_t b1_) {
    const Config config;
    _tile_loadconfig(&config);
    std::vector<int8_t> a(kRows * kp, 0), hq(kRows * fp, 0);
    std::vector<float> hidden(kRows * f), wide(gated(act) ? kRows * u : 0);
    float scale[kRows], hscale[kRows];
    for (int64_t blk = b0; blk < b1_; ++blk) {
      const int64_t rows = quantize_rows(xp, x.stride(0), m, blk * kRows, k, kp, a.data(), scale);
      if (gated(act)) {  // the block's 2f-wide rows (bias added), gated row by row into f-wide ones
        rows_times(a.data(), kp, scale, rows, w1.data_ptr<int8_t>(), u, s1.data_ptr<float>(), bp1, kNone,
                   wide.data(), u);
        for (int64_t r = 0; r < rows; ++r) {
          gate_row(wide.data() + r * u, f, act, hidden.data() + r * f);
          hscale[r] = quantize_row(hidden.data() + r * f, f, hq.data() + r * fp);
        }
      } else {
        float top[kRows] = {};
        rows_times(a.data(), kp, scale, rows, w1.data_ptr<int8_t>(), f, s1.data_ptr<float>(), bp1, act,
                   hidden.data(), f, top);
        for (int64_t r = 0; r < rows; ++r)
          hscale[r] = quantize_known(hidden.data() + r * f, f, top[r], hq.data() + r * fp);
      }
      rows_times(hq.data(), fp, hscale, rows, w2.data_ptr<int8_t>(), d, s2.data_ptr<float>(), nullptr, kNone,
                 op + blk * kRows * d, d);
    }
    _tile_release();
  });
  return out;
}

}  // namespace tiles
#endif

bool int8_tiles() {
#ifdef TRANSDUCE_AMX
  return tiles::granted();
#else
  return false;
#endif
}

at::Tensor int8_pack(const at::Tensor& w) {
#ifdef TRANSDUCE_AMX
  TORCH_CHECK(tiles::granted(), "int8_pack: the OS did not grant this process the CPU's AMX tiles (arch_prctl)");
  return tiles::pack(w);
#else
  TORCH_CHECK(false, "int8_pack: the kernels were built for a CPU without AMX int8 tiles");
#endif
}

// A 3-D weight is int8_pack's (the AMX path).
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale, const at::Tensor& bias) {
  check_input(x, "int8_linear");
#ifdef TRANSDUCE_AMX
  if (w.dim() == 3) return tiles::linear(x, w, w_scale, bias);
#endif
  check_weight(w, w_scale, bias, x.size(1), "int8_linear");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  auto out = at::empty({m, n}, x.options());
  const at::Tensor wt = w.t();
  const float* xp = x.data_ptr<float>();
  const float* ws = w_scale.data_ptr<float>();
  const float* bp = maybe(bias);
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0);
  const int64_t blocks = (m + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    auto q = at::empty({kBlock, k}, x.options().dtype(at::kChar));
    float scale[kBlock];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kBlock, rows = std::min(kBlock, m - r0);
      const at::Tensor acc = block_product(xp + r0 * xs, xs, rows, k, q, scale, wt);  // (rows, N) int32
      const int32_t* ap = acc.data_ptr<int32_t>();
      for (int64_t r = 0; r < rows; ++r) dequantize_row(ap + r * n, scale[r], ws, bp, n, kNone, op + (r0 + r) * n);
    }
  });
  return out;
}

// down(act(up(x) + up_bias)), without down's bias (the next kernel adds it): (M, D) float32.
at::Tensor int8_ffn(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& s1, const at::Tensor& b1,
                    int64_t act, const at::Tensor& w2, const at::Tensor& s2) {
  check_input(x, "int8_ffn");
  check_act(act, "int8_ffn");
#ifdef TRANSDUCE_AMX
  if (w1.dim() == 3 && w2.dim() == 3) return tiles::ffn(x, w1, s1, b1, act, w2, s2);
#endif
  check_weight(w1, s1, b1, x.size(1), "int8_ffn (up)");
  // gated: up has 2f rows (gate, linear), the hidden layer f
  const int64_t m = x.size(0), k = x.size(1), u = w1.size(0), f = gated(act) ? u / 2 : u, d = w2.size(0);
  TORCH_CHECK(!gated(act) || u % 2 == 0, "int8_ffn: a gated block's up projection needs an even number of rows");
  check_weight(w2, s2, at::Tensor(), f, "int8_ffn (down)");
  auto out = at::empty({m, d}, x.options());
  const at::Tensor w1t = w1.t(), w2t = w2.t();
  const float* xp = x.data_ptr<float>();
  const float* ws1 = s1.data_ptr<float>();
  const float* bp1 = maybe(b1);
  const float* ws2 = s2.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0);
  const int64_t blocks = (m + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    auto q = at::empty({kBlock, k}, x.options().dtype(at::kChar));
    auto hq = at::empty({kBlock, f}, x.options().dtype(at::kChar));
    std::vector<float> hidden(f), wide(gated(act) ? u : 0);
    float scale[kBlock], hscale[kBlock];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kBlock, rows = std::min(kBlock, m - r0);
      const at::Tensor acc = block_product(xp + r0 * xs, xs, rows, k, q, scale, w1t);  // (rows, U) int32
      // the hidden layer: int32 sums -> float32 + bias -> activation (or gate) -> int8, a row at a time
      const int32_t* ap = acc.data_ptr<int32_t>();
      int8_t* hp = hq.data_ptr<int8_t>();
      for (int64_t r = 0; r < rows; ++r) {
        if (gated(act)) {
          dequantize_row(ap + r * u, scale[r], ws1, bp1, u, kNone, wide.data());
          gate_row(wide.data(), f, act, hidden.data());
        } else {
          dequantize_row(ap + r * f, scale[r], ws1, bp1, f, act, hidden.data());
        }
        hscale[r] = quantize_row(hidden.data(), f, hp + r * f);
      }
      const at::Tensor acc2 = at::_int_mm(hq.narrow(0, 0, rows), w2t);  // (rows, D) int32
      const int32_t* a2 = acc2.data_ptr<int32_t>();
      for (int64_t r = 0; r < rows; ++r) {
        dequantize_row(a2 + r * d, hscale[r], ws2, nullptr, d, kNone, op + (r0 + r) * d);
      }
    }
  });
  return out;
}

// The float32 block: down(act(x up^T + up_bias)) without down's bias, in row blocks as above (the
// hidden layer of a block never leaves the core's cache; PyTorch stores it whole, twice: before
// and after the activation).
at::Tensor ffn(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, int64_t act, const at::Tensor& w2) {
  check_input(x, "ffn");
  check_act(act, "ffn");
  // gated: up has U = 2F rows (gate, linear), the hidden layer F
  const int64_t m = x.size(0), k = x.size(1), u = w1.size(0), f = gated(act) ? u / 2 : u, d = w2.size(0);
  TORCH_CHECK(w1.scalar_type() == at::kFloat && w1.dim() == 2 && w1.size(1) == k && w2.scalar_type() == at::kFloat &&
                  w2.dim() == 2 && w2.size(1) == f && (!gated(act) || u % 2 == 0),
              "ffn: weights must be float32 (U, K) and (D, F) with K = the input's width, U = F (2F if gated)");
  TORCH_CHECK(!b1.defined() || !b1.numel() || (b1.scalar_type() == at::kFloat && b1.numel() == u && b1.is_contiguous()),
              "ffn: bias must be float32 (U,) or empty");
  auto out = at::empty({m, d}, x.options());
  // detached: the worker threads run with autograd's default (enabled) mode, and out= ops refuse
  // inputs that require gradients
  const at::Tensor xd = x.detach(), w1t = w1.detach().t(), w2t = w2.detach().t();
  const float* bp1 = maybe(b1);
  const int64_t blocks = (m + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1_) {
    for (int64_t blk = b0; blk < b1_; ++blk) {
      const int64_t r0 = blk * kBlock, rows = std::min(kBlock, m - r0);
      at::Tensor h = at::mm(xd.narrow(0, r0, rows), w1t);  // (rows, U)
      float* hp = h.data_ptr<float>();
      if (gated(act)) {
        at::Tensor hg = at::empty({rows, f}, h.options());
        float* gp = hg.data_ptr<float>();
        for (int64_t r = 0; r < rows; ++r) {
          activate_row(hp + r * u, bp1, u, kNone);
          gate_row(hp + r * u, f, act, gp + r * f);
        }
        h = hg;
      } else {
        for (int64_t r = 0; r < rows; ++r) activate_row(hp + r * f, bp1, f, act);
      }
      at::Tensor dst = out.narrow(0, r0, rows);
      at::mm_out(dst, h, w2t);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(transduce, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor w_scale, Tensor bias) -> Tensor", &int8_linear);
  m.def("ffn(Tensor x, Tensor w1, Tensor b1, int act, Tensor w2) -> Tensor", &ffn);
  m.def("int8_ffn(Tensor x, Tensor w1, Tensor s1, Tensor b1, int act, Tensor w2, Tensor s2) -> Tensor", &int8_ffn);
  m.def("int8_tiles() -> bool", &int8_tiles);
  m.def("int8_pack(Tensor w) -> Tensor", &int8_pack);
}
