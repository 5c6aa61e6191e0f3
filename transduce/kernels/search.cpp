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

#include <cmath>
#include <tuple>
#include <vector>

namespace {

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
    float top = -INFINITY;
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < v; ++j) top = std::max(top, x[j]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < v; ++j) sum += std::exp(x[j] - top);
    const float lse = top + std::log(sum);
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(transduce, m) {
  m.def("greedy_pick(Tensor logits, Tensor stop, int t, Tensor(a!) live, Tensor(b!) logprob, int pad, int bos, "
        "int eos) -> (Tensor, Tensor, int)",
        &greedy_pick);
}
