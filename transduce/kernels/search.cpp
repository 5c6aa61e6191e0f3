// One greedy decoding step's bookkeeping in one call (search.py's `_one_path`): with several
// decoding workers on threads, every op a step calls takes the interpreter lock back from the
// other worker, and the ~18 small ops of a step's bookkeeping cost more than their work.
//
//   logits   (N, V) float32, rows contiguous
//   stop     (N,) int64: the step at which each row must end (its maximum length)
//   live     (N,) bool, updated in place: rows still decoding
//   logprob  (N,) float32, updated in place: += log_softmax(logits)[best]
//   returns  best (N,) int64: the most probable token other than pad and bos (the first of ties),
//            eos where stop == t; the rows that finished at this step (live and best == eos);
//            how many rows are still live
// log_softmax is over the whole vocabulary, pad and bos included, as search.py's `_log_probs`.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

// The kernels are built with -ffast-math, under which the compiler may assume no value is
// infinite and fold comparisons with -inf away; beam scores use -inf for "no beam", so they are
// told apart by their bits.
inline bool is_minus_inf(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits == 0xFF800000u;
}

// log(sum(exp(x))) over a row: log_softmax(x) = x - this
inline float log_sum_exp(const float* __restrict__ x, int64_t v) {
  float top = -INFINITY;
#pragma omp simd reduction(max : top)
  for (int64_t j = 0; j < v; ++j) top = std::max(top, x[j]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < v; ++j) sum += std::exp(x[j] - top);
  return top + std::log(sum);
}

std::tuple<at::Tensor, at::Tensor, int64_t> greedy_pick(const at::Tensor& logits, const at::Tensor& stop, int64_t t,
                                                         at::Tensor live, at::Tensor logprob, int64_t pad, int64_t bos,
                                                         int64_t eos) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.stride(1) == 1,
              "greedy_pick: logits must be float32 (N, V) on the CPU with contiguous rows");
  const int64_t n = logits.size(0), v = logits.size(1);
  TORCH_CHECK(stop.scalar_type() == at::kLong && stop.numel() == n && stop.is_contiguous() &&
                  live.scalar_type() == at::kBool && live.numel() == n && live.is_contiguous() &&
                  logprob.scalar_type() == at::kFloat && logprob.numel() == n && logprob.is_contiguous(),
              "greedy_pick: stop (N,) int64, live (N,) bool and logprob (N,) float32, contiguous");
  TORCH_CHECK(0 <= pad && pad < v && 0 <= bos && bos < v && 0 <= eos && eos < v,
              "greedy_pick: pad, bos and eos must be token ids of the vocabulary");
  auto best = at::empty({n}, stop.options());
  std::vector<int64_t> done;
  int64_t n_live = 0;
  const float* lp = logits.data_ptr<float>();
  const int64_t* sp = stop.data_ptr<int64_t>();
  bool* alive = live.data_ptr<bool>();
  float* acc = logprob.data_ptr<float>();
  int64_t* bp = best.data_ptr<int64_t>();
  const int64_t ls = logits.stride(0);
  for (int64_t r = 0; r < n; ++r) {
    const float* x = lp + r * ls;
    const float lse = log_sum_exp(x, v);
    int64_t b = -1;
    float most = -INFINITY;
    for (int64_t j = 0; j < v; ++j) {
      if (j != pad && j != bos && (b < 0 || x[j] > most)) {
        most = x[j];
        b = j;
      }
    }
    if (sp[r] == t) b = eos;
    bp[r] = b;
    acc[r] += x[b] - lse;
    if (alive[r] && b == eos) {
      done.push_back(r);
      alive[r] = false;
    }
    n_live += alive[r];
  }
  auto rows = at::empty({static_cast<int64_t>(done.size())}, stop.options());
  std::copy(done.begin(), done.end(), rows.data_ptr<int64_t>());
  return {best, rows, n_live};
}

// One beam search step (search.py's `beam_search`) for N sources of K beams, in one call:
//
//   logits   (N * K, V) float32, rows contiguous
//   scores   (N, K) float32: each beam's log-probability so far (-inf: no beam)
//   stop     (N,) int64: the step at which each source must end (only </s> may follow there)
//   live     (N,) bool, updated in place: sources still searching
//   count    (N,) int64 and best (N, K) float32, updated in place: how many finished hypotheses
//            each source has (at most K) and their scores (raw / length ** length_penalty),
//            best first
//
// The 2K best continuations (score + log_softmax, pad and bos excluded; the first index of ties
// first) are ranked; </s> among the first K ranks of a live source finishes a hypothesis, and the
// first K others stay alive, in rank order (the rest -inf). A source is done when its best beam is
// -inf, it has K finished hypotheses, or it has nbest and its best beam, ending at the next step,
// cannot beat the nbest-th. Returns the new scores (N, K), tokens (N, K), the rows of the
// previous beams they continue (N * K, as indices into the N * K rows), the finished hypotheses
// (E, 3: source, beam, rank; their raw scores (E,) apart) and the number of live sources.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t> beam_advance(
    const at::Tensor& logits, const at::Tensor& scores, const at::Tensor& stop, int64_t t, at::Tensor live,
    at::Tensor count, at::Tensor best, int64_t nbest, double length_penalty, int64_t pad, int64_t bos, int64_t eos) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.stride(1) == 1,
              "beam_advance: logits must be float32 (N * K, V) on the CPU with contiguous rows");
  TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.dim() == 2 && scores.is_contiguous(),
              "beam_advance: scores must be float32 (N, K) contiguous");
  const int64_t n = scores.size(0), k = scores.size(1), v = logits.size(1);
  TORCH_CHECK(logits.size(0) == n * k, "beam_advance: logits must have N * K rows");
  TORCH_CHECK(stop.scalar_type() == at::kLong && stop.numel() == n && stop.is_contiguous() &&
                  live.scalar_type() == at::kBool && live.numel() == n && live.is_contiguous() &&
                  count.scalar_type() == at::kLong && count.numel() == n && count.is_contiguous() &&
                  best.scalar_type() == at::kFloat && best.numel() == n * k && best.is_contiguous(),
              "beam_advance: stop (N,) int64, live (N,) bool, count (N,) int64, best (N, K) float32, contiguous");
  TORCH_CHECK(0 <= pad && pad < v && 0 <= bos && bos < v && 0 <= eos && eos < v && 1 <= nbest && nbest <= k,
              "beam_advance: token ids must be in the vocabulary and 1 <= nbest <= K");
  const int64_t nc = std::min(2 * k, k * v);
  auto new_scores = at::empty({n, k}, scores.options());
  auto new_tok = at::empty({n, k}, stop.options());
  auto rows = at::empty({n * k}, stop.options());
  std::vector<int64_t> ended;
  std::vector<float> ended_raw;
  const float* lp = logits.data_ptr<float>();
  const float* sp = scores.data_ptr<float>();
  const int64_t* stp = stop.data_ptr<int64_t>();
  bool* alive = live.data_ptr<bool>();
  int64_t* cnt = count.data_ptr<int64_t>();
  float* fin = best.data_ptr<float>();
  float* ns = new_scores.data_ptr<float>();
  int64_t* nt = new_tok.data_ptr<int64_t>();
  int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t ls = logits.stride(0);
  const float length = static_cast<float>(t + 1);
  const float norm_now = std::pow(length, static_cast<float>(length_penalty));
  const float norm_next = std::pow(length + 1.f, static_cast<float>(length_penalty));
  std::vector<float> top(nc);
  std::vector<int64_t> idx(nc);
  int64_t n_live = 0;
  for (int64_t i = 0; i < n; ++i) {
    // the nc best of the K * V candidates, best first; a later candidate must beat an earlier one
    int64_t filled = 0;
    const bool forced = stp[i] == t;
    for (int64_t j = 0; j < k; ++j) {
      const float base = sp[i * k + j];
      if (is_minus_inf(base)) continue;
      const float* x = lp + (i * k + j) * ls;
      const float lse = log_sum_exp(x, v);
      for (int64_t c = 0; c < v; ++c) {
        if (c == pad || c == bos || (forced && c != eos)) continue;
        const float cand = base + (x[c] - lse);
        if (is_minus_inf(cand) || (filled == nc && !(cand > top[nc - 1]))) continue;  // a -inf logit
        int64_t p = filled < nc ? filled++ : nc - 1;
        while (p > 0 && cand > top[p - 1]) {
          top[p] = top[p - 1];
          idx[p] = idx[p - 1];
          --p;
        }
        top[p] = cand;
        idx[p] = j * v + c;
      }
    }
    // finished hypotheses among the first K ranks; the first K others continue
    int64_t kept = 0;
    for (int64_t p = 0; p < filled; ++p) {  // the finite candidates
      const int64_t beam_of = idx[p] / v, tok = idx[p] % v;
      if (tok == eos && p < k && alive[i]) {
        ended.insert(ended.end(), {i, beam_of, p});
        ended_raw.push_back(top[p]);
        const float score = top[p] / norm_now;
        float* f = fin + i * k;
        int64_t q = std::min(cnt[i], k - 1);  // insert after equal scores (the earlier stay first)
        if (cnt[i] < k || score > f[k - 1]) {
          while (q > 0 && score > f[q - 1]) {
            f[q] = f[q - 1];
            --q;
          }
          f[q] = score;
          cnt[i] = std::min(cnt[i] + 1, k);
        }
      } else if (tok != eos && kept < k) {
        ns[i * k + kept] = top[p];
        nt[i * k + kept] = tok;
        rp[i * k + kept] = i * k + beam_of;
        ++kept;
      }
    }
    for (; kept < k; ++kept) {  // no continuation: -inf beams that follow beam 0
      ns[i * k + kept] = -INFINITY;
      nt[i * k + kept] = eos;
      rp[i * k + kept] = i * k;
    }
    const float lead = ns[i * k];
    const bool done = is_minus_inf(lead) || cnt[i] >= k || (cnt[i] >= nbest && lead / norm_next <= fin[i * k + nbest - 1]);
    alive[i] = alive[i] && !done;
    n_live += alive[i];
  }
  const int64_t e = static_cast<int64_t>(ended_raw.size());
  auto ended_t = at::empty({e, 3}, stop.options());
  std::copy(ended.begin(), ended.end(), ended_t.data_ptr<int64_t>());
  auto raw_t = at::empty({e}, scores.options());
  std::copy(ended_raw.begin(), ended_raw.end(), raw_t.data_ptr<float>());
  return {new_scores, new_tok, rows, ended_t, raw_t, n_live};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(transduce, m) {
  m.def("greedy_pick(Tensor logits, Tensor stop, int t, Tensor(a!) live, Tensor(b!) logprob, int pad, int bos, "
        "int eos) -> (Tensor, Tensor, int)",
        &greedy_pick);
  m.def("beam_advance(Tensor logits, Tensor scores, Tensor stop, int t, Tensor(a!) live, Tensor(b!) count, "
        "Tensor(c!) best, int nbest, float length_penalty, int pad, int bos, int eos) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, int)",
        &beam_advance);
}
