// The dropout kernels' mask (dropout.cpp, norm_train.cpp): element i of a tensor is kept when byte
// i % 8 of splitmix64(seed + i / 8) is at least the threshold. A function of (seed, index) alone,
// so a backward pass recomputes it from the seed and two kernels with one seed drop the same elements.
#pragma once

#include <cstdint>

namespace transduce_kernels {

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The mask bytes of elements [start, start + len): a pointer into `words`, scratch of at least
// len / 8 + 2 words. Byte k of a word is its (8w + k)-th element's on a little-endian machine
// (x86, ARM).
inline const unsigned char* mask_bytes(uint64_t seed, int64_t start, int64_t len, uint64_t* words) {
  const int64_t w0 = start / 8, w1 = (start + len + 7) / 8;
  for (int64_t w = w0; w < w1; ++w) words[w - w0] = splitmix64(seed + static_cast<uint64_t>(w));
  return reinterpret_cast<const unsigned char*>(words) + (start - w0 * 8);
}

}  // namespace transduce_kernels
