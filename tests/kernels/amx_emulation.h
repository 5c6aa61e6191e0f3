// AMX tiles in software, for building transduce/kernels/linear.cpp's AMX path on a CPU without AMX
// (tests/test_kernels.py, `emulated_tiles`): force-included ahead of the source, it replaces the
// tile intrinsics that the source uses with plain C++ on a per-thread register file, and the OS's
// permission request with success. The rest of the path (the packed layout, the blocks, AVX-512
// quantization and scaling, the gated units) is then the source's own code, run on any CPU with
// AVX-512. What it does not check is the hardware: the real path's tests run where AMX is.
//
// Semantics (Intel's ISA reference, TDPBSSD): a tile holds rows x colsb bytes as the last
// _tile_loadconfig said; C[m][n] (int32) += sum over k < colsb(A) / 4, i < 4 of
// A[m][4k + i] * B[k][4n + i], all int8 signed.
#pragma once
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

namespace amx_emulation {

struct Registers {
  alignas(64) int8_t tile[8][16][64];
  uint8_t rows[8];
  uint16_t colsb[8];
};
inline thread_local Registers regs;

inline void loadconfig(const void* config) {
  const auto* p = static_cast<const uint8_t*>(config);  // palette, start row, 14 reserved, colsb[16], rows[16]
  for (int t = 0; t < 8; ++t) {
    regs.colsb[t] = static_cast<uint16_t>(p[16 + 2 * t] | (p[17 + 2 * t] << 8));
    regs.rows[t] = p[48 + t];
  }
}

inline void load(int t, const void* base, long stride) {
  std::memset(regs.tile[t], 0, sizeof regs.tile[t]);
  for (int r = 0; r < regs.rows[t]; ++r)
    std::memcpy(regs.tile[t][r], static_cast<const int8_t*>(base) + r * stride, regs.colsb[t]);
}

inline void store(int t, void* base, long stride) {
  for (int r = 0; r < regs.rows[t]; ++r) std::memcpy(static_cast<int8_t*>(base) + r * stride, regs.tile[t][r], regs.colsb[t]);
}

inline void zero(int t) { std::memset(regs.tile[t], 0, sizeof regs.tile[t]); }

inline void dpbssd(int c, int a, int b) {
  for (int m = 0; m < regs.rows[c]; ++m)
    for (int n = 0; n < regs.colsb[c] / 4; ++n) {
      int32_t sum;
      std::memcpy(&sum, regs.tile[c][m] + 4 * n, 4);
      for (int k = 0; k < regs.colsb[a] / 4; ++k)
        for (int i = 0; i < 4; ++i) sum += int32_t(regs.tile[a][m][4 * k + i]) * int32_t(regs.tile[b][k][4 * n + i]);
      std::memcpy(regs.tile[c][m] + 4 * n, &sum, 4);
    }
}

}  // namespace amx_emulation

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbssd
#define _tile_loadconfig(config) amx_emulation::loadconfig(config)
#define _tile_release() ((void)0)
#define _tile_loadd(t, base, stride) amx_emulation::load(t, base, stride)
#define _tile_stored(t, base, stride) amx_emulation::store(t, base, stride)
#define _tile_zero(t) amx_emulation::zero(t)
#define _tile_dpbssd(c, a, b) amx_emulation::dpbssd(c, a, b)
#define syscall(...) 0L  // arch_prctl's permission for the tile registers: granted
