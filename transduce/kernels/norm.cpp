// Residual connection and LayerNorm in one pass over each row: sum = x + y + y_bias,
// out = LayerNorm(sum). y_bias is the bias of the projection that made y (so that projection can
// skip its own pass writing the bias), or an empty tensor.
// A decoding step does this after every sublayer on (rows, d_model) tensors of a few hundred kB,
// where PyTorch's separate add and layer_norm each read and write the whole tensor.
//
//   x, y       (N, D) float32, rows contiguous
//   y_bias     (D) or empty
//   weight, bias (D)
//   keep_sum   also return the sum (pre-norm stacks carry it as the residual stream)
//   returns    {out, sum} (sum undefined unless keep_sum)
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "rows.h"

namespace {

using transduce_kernels::normalize_row;

std::tuple<at::Tensor, at::Tensor> add_norm(const at::Tensor& x, const at::Tensor& y, const at::Tensor& y_bias,
                                            const at::Tensor& weight, const at::Tensor& bias, double eps,
                                            bool keep_sum) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat &&
                  weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat,
              "add_norm: float32 CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.sizes() == y.sizes(), "add_norm: x and y must be the same (rows, d)");
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(weight.numel() == d && bias.numel() == d && weight.is_contiguous() && bias.is_contiguous(),
              "add_norm: weight and bias must be (d,) contiguous");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "add_norm: rows must be contiguous");
  const bool has_yb = y_bias.defined() && y_bias.numel();
  TORCH_CHECK(!has_yb || (y_bias.numel() == d && y_bias.is_contiguous() && y_bias.scalar_type() == at::kFloat),
              "add_norm: y_bias must be float32 (d,) contiguous or empty");
  auto out = at::empty({n, d}, x.options());
  at::Tensor sum = keep_sum ? at::empty({n, d}, x.options()) : at::Tensor();
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const float* ybp = has_yb ? y_bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  float* sp = keep_sum ? sum.data_ptr<float>() : nullptr;
  const int64_t xs = x.stride(0), ys = y.stride(0);
  const float inv_d = 1.f / static_cast<float>(d);
  const float e = static_cast<float>(eps);
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict__ a = xp + r * xs;
      const float* __restrict__ b = yp + r * ys;
      float* o = op + r * d;
      // the sum goes to `sum`, or to `o` and is normalised in place (so no restrict on these two)
      float* s = sp ? sp + r * d : o;
      float mean = 0.f;
      if (ybp != nullptr) {
#pragma omp simd reduction(+ : mean)
        for (int64_t i = 0; i < d; ++i) {
          s[i] = a[i] + (b[i] + ybp[i]);
          mean += s[i];
        }
      } else {
#pragma omp simd reduction(+ : mean)
        for (int64_t i = 0; i < d; ++i) {
          s[i] = a[i] + b[i];
          mean += s[i];
        }
      }
      mean *= inv_d;
      normalize_row(s, d, mean, e, wp, bp, o);
    }
  });
  return {out, sum};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(transduce, m) {
  m.def("add_norm(Tensor x, Tensor y, Tensor y_bias, Tensor weight, Tensor bias, float eps, bool keep_sum) "
        "-> (Tensor, Tensor)",
        &add_norm);
}
