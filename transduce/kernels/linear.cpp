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
//   act      0: none, 1: ReLU, 2: GELU (erf form)
//
// Per row: s = max|x| / 127, q = round(x * (127 / max|x|)) (half to even; a zero row gives zeros);
// y[m, n] = acc[m, n] * (s[m] * w_scale[n]) + bias[n]. models/quantize.py does the same with
// PyTorch's ops where the kernels are not built.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

enum Act : int64_t { kNone = 0, kRelu = 1, kGelu = 2 };

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

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale, const at::Tensor& bias) {
  check_input(x, "int8_linear");
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
  check_weight(w1, s1, b1, x.size(1), "int8_ffn (up)");
  const int64_t m = x.size(0), k = x.size(1), f = w1.size(0), d = w2.size(0);
  check_weight(w2, s2, at::Tensor(), f, "int8_ffn (down)");
  TORCH_CHECK(act == kNone || act == kRelu || act == kGelu, "int8_ffn: act must be 0, 1 or 2");
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
    std::vector<float> hidden(f);
    float scale[kBlock], hscale[kBlock];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kBlock, rows = std::min(kBlock, m - r0);
      const at::Tensor acc = block_product(xp + r0 * xs, xs, rows, k, q, scale, w1t);  // (rows, F) int32
      // the hidden layer: int32 sums -> float32 + bias -> activation -> int8, a row at a time
      const int32_t* ap = acc.data_ptr<int32_t>();
      int8_t* hp = hq.data_ptr<int8_t>();
      for (int64_t r = 0; r < rows; ++r) {
        dequantize_row(ap + r * f, scale[r], ws1, bp1, f, act, hidden.data());
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
  const int64_t m = x.size(0), k = x.size(1), f = w1.size(0), d = w2.size(0);
  TORCH_CHECK(w1.scalar_type() == at::kFloat && w1.dim() == 2 && w1.size(1) == k && w2.scalar_type() == at::kFloat &&
                  w2.dim() == 2 && w2.size(1) == f,
              "ffn: weights must be float32 (F, K) and (D, F) with K = the input's width");
  TORCH_CHECK(!b1.defined() || !b1.numel() || (b1.scalar_type() == at::kFloat && b1.numel() == f && b1.is_contiguous()),
              "ffn: bias must be float32 (F,) or empty");
  TORCH_CHECK(act == kNone || act == kRelu || act == kGelu, "ffn: act must be 0, 1 or 2");
  auto out = at::empty({m, d}, x.options());
  // detached: the worker threads run with autograd's default (enabled) mode, and out= ops refuse
  // inputs that require gradients
  const at::Tensor xd = x.detach(), w1t = w1.detach().t(), w2t = w2.detach().t();
  const float* bp1 = maybe(b1);
  const int64_t blocks = (m + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1_) {
    for (int64_t blk = b0; blk < b1_; ++blk) {
      const int64_t r0 = blk * kBlock, rows = std::min(kBlock, m - r0);
      at::Tensor h = at::mm(xd.narrow(0, r0, rows), w1t);  // (rows, F)
      float* hp = h.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) activate_row(hp + r * f, bp1, f, act);
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
}
