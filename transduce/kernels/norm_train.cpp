// A post-norm layer's residual connection, dropout and LayerNorm with gradients, for training:
// out = LayerNorm(x + dropout(y)), one pass over each row forward and one backward.
//
// Under bf16 autocast a sublayer's output y is bf16 (its projection's) and the residual stream x
// float32: PyTorch drops out y, adds in float32, normalises in float32, and every projection that
// reads the result casts it to bf16 again; backward, the projections' bf16 gradients are cast up
// and added, and the sum's gradient is cast down for y: about eight passes over the rows each way
// besides the norm's own. Here the forward pass reads x and y once and writes the float32 result
// and (half) its bf16 rounding, which the next projections take as it is; the backward pass
// takes both results' gradients and writes x's in float32 and y's in y's dtype.
//
//   add_norm_train(x, y, weight, bias, eps, seed, threshold, scale, half) -> (out, out16, mean, rstd)
//     x (N, D) float32, y (N, D) float32 or bfloat16, both contiguous; weight, bias (D) float32.
//     threshold > 0: dropout on y with dropout.cpp's mask for `seed` and its bf16 rounding of the
//     scaled y, so the result is dropout_apply's, an add and layer_norm's. out (N, D) float32;
//     out16 (N, D) bfloat16 if half, else empty; mean, rstd (N) float32 (for the backward pass).
//   add_norm_train_backward(g, g16, x, y, weight, mean, rstd, seed, threshold, scale)
//     -> (dx, dy, dweight, dbias)
//     g (N, D) float32 and g16 (N, D) bfloat16, contiguous, or empty: the gradients of out and out16.
//     dx float32, dy in y's dtype (through the same dropout); dweight, dbias (D) float32, summed
//     over blocks of rows in a fixed order (the same result whatever the thread count).
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

#include "dropout_mask.h"
#include "rows.h"

namespace {

using namespace transduce_kernels;

// v as an element of type Y holds it: itself for float, rounded to bf16 for bf16 (uint16_t)
template <typename Y>
inline float held(float v) {
  if constexpr (std::is_same_v<Y, float>) {
    return v;
  } else {
    uint16_t h;
    store(&h, v);
    return load(&h);
  }
}

// s[0, d) = x + dropout(y) for one row starting at element `start`
template <typename Y>
inline void row_sum(const float* __restrict__ x, const Y* __restrict__ y, int64_t start, int64_t d, uint64_t seed,
                    int thr, float scale, uint64_t* words, float* __restrict__ s) {
  if (thr > 0) {
    const unsigned char* __restrict__ keep = mask_bytes(seed, start, d, words);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) s[i] = x[i] + (keep[i] >= thr ? held<Y>(load(y + i) * scale) : 0.f);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) s[i] = x[i] + load(y + i);
  }
}

template <typename Y>
void forward_rows(const float* xp, const Y* yp, const float* wp, const float* bp, float eps, uint64_t seed, int thr,
                  float scale, int64_t n, int64_t d, float* op, uint16_t* hp, float* mp, float* rp) {
  const float inv_d = 1.f / static_cast<float>(d);
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / d), [&](int64_t begin, int64_t end) {
    std::vector<float> sum(d);
    std::vector<uint64_t> words(d / 8 + 2);
    float* __restrict__ s = sum.data();
    for (int64_t r = begin; r < end; ++r) {
      row_sum(xp + r * d, yp + r * d, r * d, d, seed, thr, scale, words.data(), s);
      float mean = 0.f;
#pragma omp simd reduction(+ : mean)
      for (int64_t i = 0; i < d; ++i) mean += s[i];
      mean *= inv_d;
      float* __restrict__ o = op + r * d;
      const float rstd = normalize_row(s, d, mean, eps, wp, bp, o);
      if (hp != nullptr) {
        uint16_t* __restrict__ h = hp + r * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) store(h + i, o[i]);
      }
      mp[r] = mean;
      rp[r] = rstd;
    }
  });
}

// Rows per block of the weight's and bias's partial gradient sums.
constexpr int64_t kBlock = 16;

template <typename Y>
void backward_rows(const float* gp, const uint16_t* hp, const float* xp, const Y* yp, const float* wp,
                   const float* mp, const float* rp, uint64_t seed, int thr, float scale, int64_t n, int64_t d,
                   float* dxp, Y* dyp, float* part) {
  const float inv_d = 1.f / static_cast<float>(d);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 1024 / (kBlock * d) + 1), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * d);
    std::vector<uint64_t> words(d / 8 + 2);
    // A local copy: read through the lambda's captured reference, GCC reloaded the pointer in every
    // lane of the simd loop below (a gather of pointers, then of floats: 1.4x this pass's time).
    const float* __restrict__ w = wp;
    float* __restrict__ xh = buf.data();
    float* __restrict__ gt = buf.data() + d;
    for (int64_t blk = begin; blk < end; ++blk) {
      float* __restrict__ pw = part + blk * 2 * d;
      float* __restrict__ pb = pw + d;
      for (int64_t r = blk * kBlock; r < std::min(n, (blk + 1) * kBlock); ++r) {
        const int64_t at = r * d;
        row_sum(xp + at, yp + at, at, d, seed, thr, scale, words.data(), xh);
        const float mean = mp[r], rstd = rp[r];
        if (gp != nullptr && hp != nullptr) {
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) gt[i] = gp[at + i] + load(hp + at + i);
        } else if (gp != nullptr) {
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) gt[i] = gp[at + i];
        } else {
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) gt[i] = load(hp + at + i);
        }
        float s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t i = 0; i < d; ++i) {
          const float xn = (xh[i] - mean) * rstd;
          xh[i] = xn;
          const float gw = gt[i] * w[i];
          s1 += gw;
          s2 += gw * xn;
          pw[i] += gt[i] * xn;
          pb[i] += gt[i];
        }
        s1 *= inv_d;
        s2 *= inv_d;
        float* __restrict__ dx = dxp + at;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) dx[i] = rstd * (gt[i] * w[i] - s1 - xh[i] * s2);
        Y* __restrict__ dy = dyp + at;
        if (thr > 0) {
          // dropout.cpp's backward on the gradient as y's dtype holds it
          const unsigned char* __restrict__ keep = mask_bytes(seed, at, d, words.data());
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) {
            const float v = held<Y>(dx[i]) * scale;  // unconditional: a masked load does not vectorise
            store(dy + i, keep[i] >= thr ? v : 0.f);
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) store(dy + i, dx[i]);
        }
      }
    }
  });
}

void check_rows(const at::Tensor& t, int64_t n, int64_t d, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.size(0) == n && t.size(1) == d && t.is_contiguous(),
              "add_norm_train: ", name, " must be a contiguous (", n, ", ", d, ") CPU tensor");
}

template <typename Y>
Y* as(const at::Tensor& t) {
  return static_cast<Y*>(const_cast<void*>(t.const_data_ptr()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_train(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias, double eps,
    int64_t seed, int64_t threshold, double scale, bool half) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "add_norm_train: x must be (N, D) float32");
  const int64_t n = x.size(0), d = x.size(1);
  check_rows(x, n, d, "x");
  check_rows(y, n, d, "y");
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16,
              "add_norm_train: y must be float32 or bfloat16");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat && weight.numel() == d &&
                  bias.numel() == d && weight.is_contiguous() && bias.is_contiguous(),
              "add_norm_train: weight and bias must be (D,) float32 contiguous");
  TORCH_CHECK(threshold >= 0 && threshold < 256, "add_norm_train: threshold must be in 0..255");
  auto out = at::empty({n, d}, x.options());
  auto out16 = at::empty({half ? n : 0, d}, x.options().dtype(at::kBFloat16));
  auto mean = at::empty({n}, x.options());
  auto rstd = at::empty({n}, x.options());
  uint16_t* hp = half ? as<uint16_t>(out16) : nullptr;
  const auto s = static_cast<uint64_t>(seed);
  const int thr = static_cast<int>(threshold);
  if (n * d == 0) return {out, out16, mean, rstd};
  if (y.scalar_type() == at::kFloat) {
    forward_rows(as<float>(x), as<float>(y), as<float>(weight), as<float>(bias), static_cast<float>(eps), s, thr,
                 static_cast<float>(scale), n, d, as<float>(out), hp, as<float>(mean), as<float>(rstd));
  } else {
    forward_rows(as<float>(x), as<uint16_t>(y), as<float>(weight), as<float>(bias), static_cast<float>(eps), s,
                 thr, static_cast<float>(scale), n, d, as<float>(out), hp, as<float>(mean), as<float>(rstd));
  }
  return {out, out16, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_train_backward(
    const at::Tensor& g, const at::Tensor& g16, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, int64_t seed, int64_t threshold, double scale) {
  const int64_t n = x.size(0), d = x.size(1);
  const bool has_g = g.defined() && g.numel(), has_h = g16.defined() && g16.numel();
  if (has_g) {
    check_rows(g, n, d, "g");
    TORCH_CHECK(g.scalar_type() == at::kFloat, "add_norm_train_backward: g must be float32");
  }
  if (has_h) {
    check_rows(g16, n, d, "g16");
    TORCH_CHECK(g16.scalar_type() == at::kBFloat16, "add_norm_train_backward: g16 must be bfloat16");
  }
  TORCH_CHECK(has_g || has_h, "add_norm_train_backward: no gradient given");
  auto dx = at::empty({n, d}, x.options());
  auto dy = at::empty({n, d}, y.options());
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  auto part = at::zeros({blocks, 2, d}, x.options());
  const float* gp = has_g ? as<float>(g) : nullptr;
  const uint16_t* hp = has_h ? as<uint16_t>(g16) : nullptr;
  const auto s = static_cast<uint64_t>(seed);
  const int thr = static_cast<int>(threshold);
  const auto sc = static_cast<float>(scale);
  if (y.scalar_type() == at::kFloat) {
    backward_rows(gp, hp, as<float>(x), as<float>(y), as<float>(weight), as<float>(mean), as<float>(rstd), s, thr,
                  sc, n, d, as<float>(dx), as<float>(dy), as<float>(part));
  } else {
    backward_rows(gp, hp, as<float>(x), as<uint16_t>(y), as<float>(weight), as<float>(mean), as<float>(rstd), s,
                  thr, sc, n, d, as<float>(dx), as<uint16_t>(dy), as<float>(part));
  }
  auto dw = at::zeros({d}, x.options());
  auto db = at::zeros({d}, x.options());
  float* __restrict__ wsum = as<float>(dw);
  float* __restrict__ bsum = as<float>(db);
  const float* pp = as<float>(part);
  for (int64_t blk = 0; blk < blocks; ++blk) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      wsum[i] += pp[blk * 2 * d + i];
      bsum[i] += pp[blk * 2 * d + d + i];
    }
  }
  return {dx, dy, dw, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(transduce, m) {
  m.def("add_norm_train(Tensor x, Tensor y, Tensor weight, Tensor bias, float eps, int seed, int threshold, "
        "float scale, bool half) -> (Tensor, Tensor, Tensor, Tensor)",
        &add_norm_train);
  m.def("add_norm_train_backward(Tensor g, Tensor g16, Tensor x, Tensor y, Tensor weight, Tensor mean, Tensor rstd, "
        "int seed, int threshold, float scale) -> (Tensor, Tensor, Tensor, Tensor)",
        &add_norm_train_backward);
}
