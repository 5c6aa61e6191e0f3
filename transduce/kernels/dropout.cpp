// Inverted dropout in one pass, its mask a function of (seed, element index) (dropout_mask.h): the forward pass
// and the backward pass call the same op with the same seed, so the mask is never stored.
//
// PyTorch's dropout (and models/layers.py's byte-mask version) draws random numbers from a
// serial generator, compares them, multiplies and selects: four passes over the tensor in the
// forward, a stored mask and another pass in the backward. Here element i is kept when byte
// i % 8 of splitmix64(seed + i / 8) is at least `threshold` (p rounded to 1/256, as the Python
// version does); a kept element is multiplied by `scale`. The result depends on the seed alone,
// not on the thread count.
//
//   x          float32 or bfloat16 CPU tensor (made contiguous)
//   seed       drawn by the caller from torch's generator (so a resumed run draws it again)
//   threshold  bytes below it drop their element (0..255)
//   scale      256 / (256 - threshold)
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>

#include "dropout_mask.h"

namespace {

using transduce_kernels::splitmix64;

// Blocks of 64 words (512 elements): the words' splitmix64 in one loop, then the elements against
// their bytes in another, both straight-line loops that the compiler vectorises. Byte k of word w
// is the (8w + k)-th byte of the block's words on a little-endian machine (x86, ARM).
constexpr int64_t kWords = 64;

template <typename T>
void apply(const T* x, T* out, int64_t n, uint64_t seed, int threshold, float scale) {
  const int64_t blocks = (n + 8 * kWords - 1) / (8 * kWords);
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    uint64_t bits[kWords];
    for (int64_t blk = begin; blk < end; ++blk) {
      const uint64_t w0 = static_cast<uint64_t>(blk) * kWords;
      for (int64_t w = 0; w < kWords; ++w) bits[w] = splitmix64(seed + w0 + static_cast<uint64_t>(w));
      const unsigned char* bytes = reinterpret_cast<const unsigned char*>(bits);
      const int64_t base = blk * 8 * kWords;
      const int64_t len = n - base < 8 * kWords ? n - base : 8 * kWords;
      const T* xs = x + base;
      T* os = out + base;
      for (int64_t i = 0; i < len; ++i) {
        const float v = static_cast<float>(xs[i]) * scale;
        os[i] = static_cast<T>(bytes[i] >= threshold ? v : 0.f);
      }
    }
  });
}

at::Tensor dropout_apply(const at::Tensor& x_in, int64_t seed, int64_t threshold, double scale) {
  TORCH_CHECK(x_in.device().is_cpu() && (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "dropout_apply: float32 or bfloat16 CPU tensors only");
  TORCH_CHECK(threshold >= 0 && threshold < 256, "dropout_apply: threshold must be in 0..255");
  const at::Tensor x = x_in.contiguous();
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const uint64_t s = static_cast<uint64_t>(seed);
  const float sc = static_cast<float>(scale);
  if (x.scalar_type() == at::kFloat) {
    apply(x.data_ptr<float>(), out.data_ptr<float>(), x.numel(), s, static_cast<int>(threshold), sc);
  } else {
    apply(x.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), x.numel(), s, static_cast<int>(threshold), sc);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(transduce, m) {
  m.def("dropout_apply(Tensor x, int seed, int threshold, float scale) -> Tensor", &dropout_apply);
}
