// Inference attention for CPU in one pass: scores, softmax and the weighted sum of values per
// (row, head, query), written straight into the merged (N, Tq, H*dh) layout.
//
// Decoding steps attend with one query per row against a few dozen keys; PyTorch does that as
// batched matmuls of 1 x dh x T per head (about 1 us each of set-up), a scale, a mask fill, a
// softmax and a merge copy. Here each (row, head, query) is a short loop over its keys.
//
//   q      (N, H, Tq, dh)   any strides, innermost contiguous
//   k, v   (M, H, T, dh)    any strides, innermost contiguous; rows read memory n / group
//   mask   (M, T) bool      true = attend, or an empty tensor for none
//   causal                  query i sees keys [0, T - Tq + i]
//   returns (N, Tq, H * dh) contiguous
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// One (row, head, query): `s` holds at least `len` floats of scratch.
template <int DH>
inline void attend_one(const float* __restrict__ q, const float* __restrict__ k, int64_t k_step,
                       const float* __restrict__ v, int64_t v_step, const bool* mask, int64_t mask_step,
                       int64_t len, int64_t dh_runtime, float scale, float* __restrict__ s,
                       float* __restrict__ out) {
  const int64_t dh = DH > 0 ? DH : dh_runtime;
  // Built with -ffast-math (vectorised exp): no infinities here. A masked key scores -1e30, whose
  // exp(score - top) is exactly 0; a query with every key masked gets zeros (as PyTorch's SDPA does).
  float top = -std::numeric_limits<float>::max();
  int64_t live = 0;
  for (int64_t t = 0; t < len; ++t) {
    if (mask != nullptr && !mask[t * mask_step]) {
      s[t] = -1e30f;
      continue;
    }
    const float* __restrict__ kt = k + t * k_step;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < dh; ++d) acc += q[d] * kt[d];
    acc *= scale;
    s[t] = acc;
    top = std::max(top, acc);
    ++live;
  }
  float* __restrict__ o = out;
  for (int64_t d = 0; d < dh; ++d) o[d] = 0.f;
  if (live == 0) return;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < len; ++t) {
    const float e = std::exp(s[t] - top);
    s[t] = e;
    sum += e;
  }
  for (int64_t t = 0; t < len; ++t) {
    const float w = s[t];
    if (w == 0.f) continue;
    const float* __restrict__ vt = v + t * v_step;
#pragma omp simd
    for (int64_t d = 0; d < dh; ++d) o[d] += w * vt[d];
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t d = 0; d < dh; ++d) o[d] *= inv;
}

template <int DH>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, int64_t group,
         bool causal, double scale, at::Tensor& out) {
  const int64_t n = q.size(0), h = q.size(1), tq = q.size(2), dh = q.size(3), tk = k.size(2);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.numel() ? mask.data_ptr<bool>() : nullptr;
  const int64_t ms0 = mp ? mask.stride(0) : 0, ms1 = mp ? mask.stride(1) : 0;
  float* op = out.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const float sc = static_cast<float>(scale);
  // Enough (row, head, query) units per task that a thread's set-up is paid back.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, tk * dh));
  at::parallel_for(0, n * h * tq, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(tk);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / (h * tq), head = (i / tq) % h, qi = i % tq;
      const int64_t m = row / group;
      const int64_t len = causal ? tk - tq + qi + 1 : tk;
      attend_one<DH>(qp + row * qs0 + head * qs1 + qi * qs2, kp + m * ks0 + head * ks1, ks2,
                     vp + m * vs0 + head * vs1, vs2, mp ? mp + m * ms0 : nullptr, ms1, len, dh, sc,
                     scratch.data(), op + (row * tq + qi) * h * dh + head * dh);
    }
  });
}

at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                  int64_t group, bool causal, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "attend: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "attend: float32 only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attend: q, k, v must be (rows, heads, len, dh)");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attend: innermost dim must be contiguous");
  TORCH_CHECK(group >= 1 && k.size(0) * group == q.size(0), "attend: q rows must be k rows times group");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "attend: k, v must match q's heads and dh");
  TORCH_CHECK(!causal || q.size(2) <= k.size(2), "attend: causal needs no more queries than keys");
  if (mask.numel()) {
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == k.size(0) &&
                    mask.size(1) == k.size(2),
                "attend: mask must be bool (k rows, keys)");
  }
  auto out = at::empty({q.size(0), q.size(2), q.size(1) * q.size(3)}, q.options());
  if (q.numel() == 0) return out;
  TORCH_CHECK(k.size(2) > 0, "attend: no keys");
  switch (q.size(3)) {
    case 32: run<32>(q, k, v, mask, group, causal, scale, out); break;
    case 64: run<64>(q, k, v, mask, group, causal, scale, out); break;
    default: run<0>(q, k, v, mask, group, causal, scale, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(transduce, m) {
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor mask, int group, bool causal, float scale) -> Tensor",
        &attend);
}
