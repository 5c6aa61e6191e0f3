// Inference attention for CPU in one pass: scores, softmax and the weighted sum of values per
// (row, head, query), written straight into the merged (N, Tq, H*dh) layout.
//
// Decoding steps attend with one query per row against a few dozen keys; PyTorch does that as
// batched matmuls of 1 x dh x T per head (about 1 us each of set-up), a scale, a mask fill, a
// softmax and a merge copy. Here one task takes a memory row and head: it lays the keys out
// transposed, dh x T, in scratch, so that the scores of a query are
// dh vector multiply-adds across all keys at once, then serves every query that reads them (the
// beams of a source, the positions of a sequence).
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
#include <cstdint>
#include <cstring>
#include <math.h>
#include <limits>
#include <vector>

#include "rows.h"

namespace {

using namespace transduce_kernels;

struct Scratch {
  int64_t tkp;
  std::vector<float> kt, bias, s;
  explicit Scratch(int64_t tk, int64_t dh) : tkp(padded(tk)), kt(tkp * dh, 0.f), bias(tkp, kMasked), s(tkp) {}
};

inline void fill_bias(const bool* mask, int64_t step, int64_t tk, float* __restrict__ bias) {
  for (int64_t t = 0; t < tk; ++t) bias[t] = (mask == nullptr || mask[t * step]) ? 0.f : kMasked;
}

// s[0, tkp) = scale * (q . keys) + bias for keys before len, kMasked after; keys transposed
// (dh, tkp), their sums in registers up to 32 keys (rows.h). Returns the largest.
template <int DH>
inline float scores(const float* __restrict__ q, const float* __restrict__ kt, const float* __restrict__ bias,
                    int64_t tkp, int64_t len, int64_t dh_runtime, float scale, float* __restrict__ s) {
  row_sums_any<DH>(q, kt, tkp, dh_runtime, s);
  float top = kMasked;
#pragma omp simd reduction(max : top)
  for (int64_t t = 0; t < tkp; ++t) {
    s[t] = t < len ? s[t] * scale + bias[t] : kMasked;
    top = std::max(top, s[t]);
  }
  return top;
}

// As `scores`, straight from the key rows: for a memory row read by a single query (greedy
// decoding), where laying the keys out transposed would cost more than it saves.
template <int DH>
inline float direct_scores(const float* __restrict__ q, const float* __restrict__ k, int64_t k_step,
                           const float* __restrict__ bias, int64_t tkp, int64_t len, int64_t dh_runtime,
                           float scale, float* __restrict__ s) {
  const int64_t dh = DH > 0 ? DH : dh_runtime;
  float top = kMasked;
  for (int64_t t = 0; t < tkp; ++t) {
    if (t >= len || bias[t] != 0.f) {
      s[t] = kMasked;
      continue;
    }
    const float* __restrict__ kt = k + t * k_step;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < dh; ++d) acc += q[d] * kt[d];
    s[t] = acc * scale;
    top = std::max(top, s[t]);
  }
  return top;
}

// One memory row and head: its `group` query rows x tq queries.
template <int DH>
inline void forward_unit(const float* q, int64_t q_row_step, int64_t q_step, int64_t group, int64_t tq,
                         const float* k, int64_t k_step, const float* v, int64_t v_step, const bool* mask,
                         int64_t mask_step, int64_t tk, bool causal, int64_t dh_runtime, float scale,
                         Scratch& w, float* out, int64_t out_row_step, int64_t out_q_step) {
  const int64_t dh = DH > 0 ? DH : dh_runtime;
  const int64_t tkp = w.tkp;
  const bool direct = group * tq == 1;
  if (!direct) transpose<DH>(k, k_step, tk, dh, tkp, w.kt.data());
  fill_bias(mask, mask_step, tk, w.bias.data());
  float* __restrict__ s = w.s.data();
  for (int64_t r = 0; r < group; ++r) {
    for (int64_t i = 0; i < tq; ++i) {
      const int64_t len = causal ? tk - tq + i + 1 : tk;
      float* __restrict__ o = out + r * out_row_step + i * out_q_step;
      const float* qi = q + r * q_row_step + i * q_step;
      float top;
      if (direct) {
        top = direct_scores<DH>(qi, k, k_step, w.bias.data(), tkp, len, dh, scale, s);
      } else {
        top = scores<DH>(qi, w.kt.data(), w.bias.data(), tkp, len, dh, scale, s);
      }
      for (int64_t d = 0; d < dh; ++d) o[d] = 0.f;
      if (top <= 0.5f * kMasked) continue;  // no key to attend to: zeros
      const float sum = exp_shifted(s, tkp, top);
      for (int64_t t = 0; t < len; ++t) {
        const float p = s[t];
        const float* __restrict__ vt = v + t * v_step;
#pragma omp simd
        for (int64_t d = 0; d < dh; ++d) o[d] += p * vt[d];
      }
      const float inv = 1.f / sum;
#pragma omp simd
      for (int64_t d = 0; d < dh; ++d) o[d] *= inv;
    }
  }
}

template <int DH>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, int64_t group,
         bool causal, double scale, at::Tensor& out) {
  const int64_t h = q.size(1), tq = q.size(2), dh = q.size(3), tk = k.size(2), m = k.size(0);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.defined() && mask.numel() ? mask.data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // out (N, Tq, H * dh): row n, query i, head at n * Tq * H * dh + i * H * dh + head * dh
  const int64_t out_q = h * dh, out_row = tq * out_q;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, group * tq * tk * dh));
  at::parallel_for(0, m * h, grain, [&](int64_t begin, int64_t end) {
    Scratch w(tk, dh);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t mi = u / h, head = u % h, row = mi * group;
      forward_unit<DH>(qp + row * q.stride(0) + head * q.stride(1), q.stride(0), q.stride(2), group, tq,
                       kp + mi * k.stride(0) + head * k.stride(1), k.stride(2),
                       vp + mi * v.stride(0) + head * v.stride(1), v.stride(2),
                       mp ? mp + mi * mask.stride(0) : nullptr, mp ? mask.stride(1) : 0, tk, causal, dh, sc, w,
                       op + row * out_row + head * dh, out_row, out_q);
    }
  });
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, int64_t group,
           bool causal) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "attend: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "attend: float32 only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attend: q, k, v must be (rows, heads, len, dh)");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attend: innermost dim must be contiguous");
  TORCH_CHECK(group >= 1 && k.size(0) * group == q.size(0), "attend: q rows must be k rows times group");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "attend: k, v must match q's heads and dh");
  TORCH_CHECK(!causal || q.size(2) <= k.size(2), "attend: causal needs no more queries than keys");
  TORCH_CHECK(k.size(2) > 0 || q.numel() == 0, "attend: no keys");
  if (mask.defined() && mask.numel()) {
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == k.size(0) &&
                    mask.size(1) == k.size(2),
                "attend: mask must be bool (k rows, keys)");
  }
}

at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                  int64_t group, bool causal, double scale) {
  check(q, k, v, mask, group, causal);
  auto out = at::empty({q.size(0), q.size(2), q.size(1) * q.size(3)}, q.options());
  if (q.numel() == 0) return out;
  switch (q.size(3)) {
    case 32: run<32>(q, k, v, mask, group, causal, scale, out); break;
    case 48: run<48>(q, k, v, mask, group, causal, scale, out); break;
    case 64: run<64>(q, k, v, mask, group, causal, scale, out); break;
    default: run<0>(q, k, v, mask, group, causal, scale, out);
  }
  return out;
}

// One decoding step's query per row, q (N, H * dh) (rows may be strided, e.g. a slice of a fused
// projection), against k, v (M, H, T, dh): attend() on the (N, H, 1, dh) view. Returns (N, H * dh).
at::Tensor attend_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                       int64_t group, double scale) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 4 && q.size(1) == k.size(1) * k.size(3),
              "attend_step: q must be (rows, heads * dh) for k (rows, heads, len, dh)");
  const int64_t n = q.size(0), h = k.size(1), dh = k.size(3);
  return attend(q.as_strided({n, h, 1, dh}, {q.stride(0), dh * q.stride(1), 0, q.stride(1)}), k, v, mask, group,
                false, scale)
      .view({n, h * dh});
}

// A decoding step's self-attention with its key/value cache: qkv (N, 3 * H * dh) is the fused
// projection of the new position (q, k, v in that order), to which `bias` (3 * H * dh, or empty)
// is added here (so the projection can skip its own pass writing it); its k and v are written
// into the caches ck, cv (N, H, T_max, dh) at position t, then q attends positions [0, t].
// Returns (N, H * dh).
//
// rows (N, T_max) int64, or an empty tensor: where a beam search keeps its cache. Position j < t
// of hypothesis n then lies in cache row rows[n, j] (its ancestor at step j), so selecting beams
// reorders this small table instead of copying the whole cache; the kernel sets rows[n, t] = n.
// Cache elements: float32, or bfloat16 held as its upper 16 bits (int8 copies' caches: half the
// bytes to read per step, where a beam's step reads every hypothesis's keys and values); rows.h's
// load and store read and write either.

template <int DH, typename T>
void self_step_run(const float* src, int64_t src_row, const float* bias, T* kp, T* vp, const int64_t* cs,
                   int64_t* table, int64_t table_row, int64_t n, int64_t h, int64_t dh_runtime, int64_t t, float scale,
                   float* op) {
  const int64_t dh = DH > 0 ? DH : dh_runtime, d = h * dh;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, (t + 1) * dh));
  at::parallel_for(0, n * h, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> s(t + 1);
    std::vector<int64_t> at_(t + 1);  // offset of position j's key (and value) in the caches
    std::vector<float> qb(dh);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / h, head = u % h;
      const float* __restrict__ in = src + r * src_row + head * dh;
      const int64_t own = r * cs[0] + head * cs[1];
      // not restrict: position t is read back below, through the same caches
      T* kd = kp + own + t * cs[2];
      T* vd = vp + own + t * cs[2];
      const float* __restrict__ q = in;
      if (bias != nullptr) {
        const float* __restrict__ b = bias + head * dh;
#pragma omp simd
        for (int64_t e = 0; e < dh; ++e) {
          qb[e] = in[e] + b[e];
          store(kd + e, in[d + e] + b[d + e]);
          store(vd + e, in[2 * d + e] + b[2 * d + e]);
        }
        q = qb.data();
      } else {
#pragma omp simd
        for (int64_t e = 0; e < dh; ++e) {
          store(kd + e, in[d + e]);
          store(vd + e, in[2 * d + e]);
        }
      }
      if (table != nullptr && head == 0) table[r * table_row + t] = r;
      for (int64_t j = 0; j <= t; ++j) {
        const int64_t row = (table != nullptr && j < t) ? table[r * table_row + j] : r;
        at_[j] = row * cs[0] + head * cs[1] + j * cs[2];
      }
      float top = kMasked;
      for (int64_t j = 0; j <= t; ++j) {
        const T* __restrict__ k = kp + at_[j];
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t e = 0; e < dh; ++e) acc += q[e] * load(k + e);
        s[j] = acc * scale;
        top = std::max(top, s[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j <= t; ++j) {
        s[j] = expf(s[j] - top);
        sum += s[j];
      }
      float* __restrict__ o = op + r * d + head * dh;
      const float inv = 1.f / sum;
#pragma omp simd
      for (int64_t e = 0; e < dh; ++e) o[e] = 0.f;
      for (int64_t j = 0; j <= t; ++j) {
        const float p = s[j] * inv;
        const T* __restrict__ v = vp + at_[j];
#pragma omp simd
        for (int64_t e = 0; e < dh; ++e) o[e] += p * load(v + e);
      }
    }
  });
}

at::Tensor self_step(const at::Tensor& qkv, const at::Tensor& bias, const at::Tensor& ck, const at::Tensor& cv,
                     int64_t t, double scale, const at::Tensor& rows) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat, "self_step: qkv must be float32 on the CPU");
  const bool half = ck.scalar_type() == at::kBFloat16;
  TORCH_CHECK((half || ck.scalar_type() == at::kFloat) && cv.scalar_type() == ck.scalar_type(),
              "self_step: caches must both be float32 or both bfloat16");
  TORCH_CHECK(qkv.dim() == 2 && ck.dim() == 4 && ck.sizes() == cv.sizes() && ck.strides() == cv.strides(),
              "self_step: qkv (rows, 3 * d), caches (rows, heads, len, dh) of one layout");
  const int64_t n = qkv.size(0), h = ck.size(1), dh = ck.size(3), d = h * dh;
  const bool indirect = rows.defined() && rows.numel();
  // read through a table, the cache may hold more rows than are decoding (sources dropped)
  TORCH_CHECK(indirect ? ck.size(0) >= n : ck.size(0) == n, "self_step: ", n, " rows of qkv for a cache of ",
              ck.size(0), indirect ? " (it needs at least as many)" : " (they must be as many)");
  TORCH_CHECK(qkv.size(1) == 3 * d && qkv.stride(1) == 1,
              "self_step: qkv must be (rows, 3 * heads * dh), rows contiguous");
  TORCH_CHECK(ck.stride(3) == 1, "self_step: caches' innermost dim must be contiguous");
  TORCH_CHECK(t >= 0 && t < ck.size(2), "self_step: position ", t, " outside the cache (", ck.size(2), ")");
  const bool has_bias = bias.defined() && bias.numel();
  TORCH_CHECK(!has_bias || (bias.numel() == 3 * d && bias.is_contiguous() && bias.scalar_type() == at::kFloat),
              "self_step: bias must be float32 (3 * heads * dh) contiguous or empty");
  if (indirect) {
    TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 2 && rows.size(0) == n && rows.size(1) > t &&
                    rows.stride(1) == 1, "self_step: rows must be int64 (rows, len) with room for position ", t);
  }
  auto out = at::empty({n, d}, qkv.options());
  if (n == 0) return out;
  const int64_t cs[3] = {ck.stride(0), ck.stride(1), ck.stride(2)};
  int64_t* table = indirect ? rows.data_ptr<int64_t>() : nullptr;
  const int64_t table_row = indirect ? rows.stride(0) : 0;
  const float sc = static_cast<float>(scale);
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
#define SELF_STEP(DH)                                                                                          \
  if (half) {                                                                                                  \
    self_step_run<DH>(qkv.data_ptr<float>(), qkv.stride(0), bp, reinterpret_cast<uint16_t*>(ck.data_ptr()),    \
                      reinterpret_cast<uint16_t*>(cv.data_ptr()), cs, table, table_row, n, h, dh, t, sc,      \
                      out.data_ptr<float>());                                                                  \
  } else {                                                                                                     \
    self_step_run<DH>(qkv.data_ptr<float>(), qkv.stride(0), bp, ck.data_ptr<float>(), cv.data_ptr<float>(), cs, \
                      table, table_row, n, h, dh, t, sc, out.data_ptr<float>());                              \
  }
  switch (dh) {
    case 32: SELF_STEP(32); break;
    case 48: SELF_STEP(48); break;
    case 64: SELF_STEP(64); break;
    default: SELF_STEP(0);
  }
#undef SELF_STEP
  return out;
}

}  // namespace

TORCH_LIBRARY(transduce, m) {
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor mask, int group, bool causal, float scale) -> Tensor",
        &attend);
  m.def("attend_step(Tensor q, Tensor k, Tensor v, Tensor mask, int group, float scale) -> Tensor", &attend_step);
  m.def("self_step(Tensor qkv, Tensor bias, Tensor(a!) ck, Tensor(b!) cv, int t, float scale, Tensor(c!) rows) "
        "-> Tensor",
        &self_step);
}
