// Training attention for CPU: a forward pass that keeps the softmax probabilities, and its
// backward pass, one task per (row, head).
//
// Sequences of characters or phonemes are short (5-30 positions): PyTorch's flash kernel for CPU
// sets up blocks of 32+ queries and keys per (row, head) and spends most of its time on that, and
// the math path runs a dozen batched ops of tiny matrices. Here each task holds one row's keys
// transposed (dh x T, padded to whole vectors) in scratch and computes every query's scores,
// softmax and weighted values in one pass; the backward pass reads the saved probabilities back.
//
//   attention_train(q, k, v, mask, causal, scale) -> (out, probs)
//     q (B, H, Tq, dh), k, v (B, H, Tk, dh): any strides, innermost contiguous (the heads of a
//     fused projection, unsplit); mask bool, true = attend: (B, Tk) for padded keys, (B, Tq, Tk)
//     for a mask per query (a prefix LM's), any strides, or empty; causal: query i sees
//     keys [0, Tk - Tq + i]. out (B, Tq, H * dh) contiguous (heads merged); probs (B, H, Tq, Tk).
//     A query that sees no key gets zeros (as PyTorch's SDPA), and zero gradients.
//   attention_train_backward(grad, q, k, v, probs, scale) -> (dq, dk, dv)
//     grad (B, H, Tq, dh) any strides, innermost contiguous; dq (B, Tq, H, dh), dk and dv
//     (B, Tk, H, dh), contiguous: as (B, H, T, dh) views they are the split heads' gradients.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "rows.h"

namespace {

using namespace transduce_kernels;

struct Shape {
  int64_t b, h, tq, tk, dh;
};

template <int DH>
void forward_run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mp, int64_t mask_row,
                 int64_t mask_q, int64_t mask_step, bool causal, float scale, const Shape& z, float* op, float* pp) {
  const int64_t dh = DH > 0 ? DH : z.dh, tkp = padded(z.tk), tq = z.tq, tk = z.tk;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t out_q = z.h * dh;
  // strides read once: inside the loops each call would reload them from the tensors
  const int64_t q0 = q.stride(0), q1 = q.stride(1), q2 = q.stride(2), k0 = k.stride(0), k1 = k.stride(1),
                k2 = k.stride(2), v0 = v.stride(0), v1 = v.stride(1), v2 = v.stride(2);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, tq * tk * dh));
  at::parallel_for(0, z.b * z.h, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(dh * tkp, 0.f), bias(tkp), s(tkp);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / z.h, head = u % z.h;
      const float* qr = qp + r * q0 + head * q1;
      const float* kr = kp + r * k0 + head * k1;
      const float* vr = vp + r * v0 + head * v1;
      transpose<DH>(kr, k2, tk, dh, tkp, kt.data());
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
        row_sums_any<DH>(qr + i * q2, kt.data(), tkp, dh, s.data());
        float top = kMasked;
#pragma omp simd reduction(max : top)
        for (int64_t t = 0; t < tkp; ++t) {
          s[t] = t < len ? s[t] * scale + bias[t] : kMasked;
          top = std::max(top, s[t]);
        }
        float* __restrict__ o = op + r * tq * out_q + i * out_q + head * dh;
        float* __restrict__ p = prob + i * tk;
        if (top <= 0.5f * kMasked) {  // no key to attend to
          for (int64_t d = 0; d < dh; ++d) o[d] = 0.f;
          for (int64_t t = 0; t < tk; ++t) p[t] = 0.f;
          continue;
        }
        // the sums in registers where dh is known here, else in place
        float local[DH > 0 ? DH : 1];
        float* __restrict__ acc = DH > 0 ? local : o;
        for (int64_t d = 0; d < dh; ++d) acc[d] = 0.f;
        const float inv = 1.f / exp_shifted(s.data(), tkp, top);
        for (int64_t t = 0; t < tk; ++t) {
          const float pt = s[t] * inv;
          p[t] = pt;
          if (pt == 0.f) continue;
          const float* __restrict__ vt = vr + t * v2;
#pragma omp simd
          for (int64_t d = 0; d < dh; ++d) acc[d] += pt * vt[d];
        }
        if (DH > 0) {
          for (int64_t d = 0; d < dh; ++d) o[d] = acc[d];
        }
      }
    }
  });
}

template <int DH>
void backward_run(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const float* pp, float scale, const Shape& z, float* dqp, float* dkp, float* dvp) {
  const int64_t dh = DH > 0 ? DH : z.dh, tkp = padded(z.tk), tq = z.tq, tk = z.tk, hd = z.h * dh;
  const float* gp = g.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t g0 = g.stride(0), g1 = g.stride(1), g2 = g.stride(2), q0 = q.stride(0), q1 = q.stride(1),
                q2 = q.stride(2), k0 = k.stride(0), k1 = k.stride(1), k2 = k.stride(2), v0 = v.stride(0),
                v1 = v.stride(1), v2 = v.stride(2);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, tq * tk * dh));
  at::parallel_for(0, z.b * z.h, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> vt(dh * tkp, 0.f), dp(tkp);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / z.h, head = u % z.h;
      const float* gr = gp + r * g0 + head * g1;
      const float* qr = qp + r * q0 + head * q1;
      const float* kr = kp + r * k0 + head * k1;
      const float* vr = vp + r * v0 + head * v1;
      transpose<DH>(vr, v2, tk, dh, tkp, vt.data());
      const float* prob = pp + u * tq * tk;
      // this task's rows of dk, dv: (Tk, dh) `hd` apart, written by no other task
      float* dkr = dkp + r * tk * hd + head * dh;
      float* dvr = dvp + r * tk * hd + head * dh;
      for (int64_t t = 0; t < tk; ++t) {
        for (int64_t d = 0; d < dh; ++d) dkr[t * hd + d] = 0.f;
        for (int64_t d = 0; d < dh; ++d) dvr[t * hd + d] = 0.f;
      }
      for (int64_t i = 0; i < tq; ++i) {
        const float* __restrict__ p = prob + i * tk;
        const float* __restrict__ gi = gr + i * g2;
        const float* __restrict__ qi = qr + i * q2;
        float* __restrict__ dq_out = dqp + r * tq * hd + i * hd + head * dh;
        float local[DH > 0 ? DH : 1];  // dq in registers where dh is known here
        float* __restrict__ dq = DH > 0 ? local : dq_out;
        for (int64_t d = 0; d < dh; ++d) dq[d] = 0.f;
        // dP[t] = g_i . v_t; the softmax's gradient dS = P * (dP - sum_t P dP)
        row_sums_any<DH>(gi, vt.data(), tkp, dh, dp.data());
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t t = 0; t < tk; ++t) dot += p[t] * dp[t];
        for (int64_t t = 0; t < tk; ++t) {
          const float pt = p[t];
          if (pt == 0.f) continue;  // masked, or beyond the causal limit
          const float ds = pt * (dp[t] - dot) * scale;
          const float* __restrict__ kt = kr + t * k2;
          float* __restrict__ dk = dkr + t * hd;
          float* __restrict__ dv = dvr + t * hd;
#pragma omp simd
          for (int64_t d = 0; d < dh; ++d) {
            dq[d] += ds * kt[d];
            dk[d] += ds * qi[d];
            dv[d] += pt * gi[d];
          }
        }
        if (DH > 0) {
          for (int64_t d = 0; d < dh; ++d) dq_out[d] = dq[d];
        }
      }
    }
  });
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              op, ": float32 only");
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
  auto probs = at::empty({z.b, z.h, z.tq, z.tk}, q.options());
  if (z.b * z.h * z.tq == 0) return {out, probs};
  TORCH_CHECK(z.tk > 0, "attention_train: no keys");
  const bool* mp = has_mask ? mask.data_ptr<bool>() : nullptr;
  const bool per_query = has_mask && mask.dim() == 3;
  const int64_t mr = has_mask ? mask.stride(0) : 0, mq = per_query ? mask.stride(1) : 0;
  const int64_t ms = has_mask ? mask.stride(mask.dim() - 1) : 0;
  const float sc = static_cast<float>(scale);
  switch (z.dh) {
    case 32: forward_run<32>(q, k, v, mp, mr, mq, ms, causal, sc, z, out.data_ptr<float>(), probs.data_ptr<float>()); break;
    case 48: forward_run<48>(q, k, v, mp, mr, mq, ms, causal, sc, z, out.data_ptr<float>(), probs.data_ptr<float>()); break;
    case 64: forward_run<64>(q, k, v, mp, mr, mq, ms, causal, sc, z, out.data_ptr<float>(), probs.data_ptr<float>()); break;
    default: forward_run<0>(q, k, v, mp, mr, mq, ms, causal, sc, z, out.data_ptr<float>(), probs.data_ptr<float>());
  }
  return {out, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_train_backward(const at::Tensor& grad, const at::Tensor& q,
                                                                        const at::Tensor& k, const at::Tensor& v,
                                                                        const at::Tensor& probs, double scale) {
  check_qkv("attention_train_backward", q, k, v);
  const Shape z{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.sizes() == q.sizes() && grad.stride(3) == 1,
              "attention_train_backward: grad must be float32 shaped as q, innermost dim contiguous");
  TORCH_CHECK(probs.scalar_type() == at::kFloat && probs.is_contiguous() &&
                  probs.sizes() == at::IntArrayRef({z.b, z.h, z.tq, z.tk}),
              "attention_train_backward: probs must be attention_train's (rows, heads, queries, keys)");
  auto dq = at::empty({z.b, z.tq, z.h, z.dh}, q.options());
  auto dk = at::empty({z.b, z.tk, z.h, z.dh}, q.options());
  auto dv = at::empty({z.b, z.tk, z.h, z.dh}, q.options());
  if (z.b * z.h == 0) return {dq, dk, dv};
  if (z.tq == 0) {
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const float sc = static_cast<float>(scale);
  const float* pp = probs.data_ptr<float>();
  switch (z.dh) {
    case 32: backward_run<32>(grad, q, k, v, pp, sc, z, dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>()); break;
    case 48: backward_run<48>(grad, q, k, v, pp, sc, z, dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>()); break;
    case 64: backward_run<64>(grad, q, k, v, pp, sc, z, dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>()); break;
    default: backward_run<0>(grad, q, k, v, pp, sc, z, dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>());
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(transduce, m) {
  m.def("attention_train(Tensor q, Tensor k, Tensor v, Tensor mask, bool causal, float scale) -> (Tensor, Tensor)",
        &attention_train);
  m.def("attention_train_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor probs, float scale) "
        "-> (Tensor, Tensor, Tensor)",
        &attention_train_backward);
}
