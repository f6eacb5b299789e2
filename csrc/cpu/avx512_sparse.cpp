#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi")
// 2:4 sparse GEMMs on AVX-512 + VBMI (Ice Lake, Sapphire Rapids, Zen 4):
// int8 W8A8 (vpdpbusd) and float with fp32 FMAs. The bf16 x bf16 variant
// (vdpbf16ps) is in avx512_bf16.cpp. Layouts are in kernels.h.
//
// The idea (the same in every kernel here): a dense kernel multiplies every
// weight, half of which are zero. Here the 16-column weight vector holds
// only the kept values, and per row the activations those values meet are
// gathered into a vector by one in-register permute (vpermb / vpermps of a
// small broadcast of x), whose indices come from the 2:4 codes. The codes
// are turned into indices once per weight vector with vpmultishiftqb (each
// byte picks the 2-bit field at any bit offset of its qword) and reused by
// all rows of the tile, so per row and weight vector the cost is one permute
// plus one multiply instruction doing only useful work. On Zen 4 a
// vpermb+vpdpbusd pair issues at 0.73x the rate of a lone vpdpbusd, and does
// twice its useful work: ~1.45x the dense compute rate, and 62.5% (int8) or
// 56% (bf16) of the dense weight bytes for the memory-bound shapes.
//
// ODR: all helpers are in anonymous namespaces (see impl.h).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>
#include <cstring>

#include "impl.h"
#include "avx512_common.h"

namespace pysparse { namespace cpu { namespace detail {

namespace {

constexpr int64_t kPrefetchBytes = 2048;  // as in the dense packed kernel (avx512_vnni.cpp)

inline void prefetch_l2(const void* p, int64_t ahead) {
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + ahead), _MM_HINT_T1);
}

// ---------------------------------------------------------------- int8
// vpmultishiftqb control for the sp24i8 codes: after a 128-bit broadcast of
// a block's 16 code bytes, qword q holds the meta bytes of columns 2q and
// 2q+1 at byte 2*(q/2) and 2*(q/2)+1. Output byte p of qword q is lane
// t = p%4 of column 2q + p/4, which needs the 2-bit field t of that byte:
// bit offset 16*(q/2) + 8*(p/4) + 2*t.
inline __m512i i8_ctrl() {
  alignas(64) uint8_t c[64];
  for (int i = 0; i < 64; ++i) {
    const int q = i / 8, p = i % 8;
    c[i] = uint8_t(16 * (q / 2) + 8 * (p / 4) + 2 * (p % 4));
  }
  return _mm512_load_si512(c);
}
// +4 for the lanes of the second group of the 8-k block (t = 2, 3).
inline __m512i i8_off() {
  alignas(64) uint8_t c[64];
  for (int i = 0; i < 64; ++i) c[i] = uint8_t((i % 4) >= 2 ? 4 : 0);
  return _mm512_load_si512(c);
}

// Gather indices of one 16-column x 8-k block: byte (j,t) = position within
// the block's 8 activations of the weight value (j,t).
inline __m512i i8_index(const uint8_t* codes, __m512i ctrl, __m512i off) {
  const __m512i cb = _mm512_broadcast_i64x2(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  // (field & 3) | off   (ternary-logic truth table 0xEA = (A & B) | C)
  return _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(ctrl, cb), _mm512_set1_epi8(3), off, 0xEA);
}

// MR rows x NP 16-column panels over all of K. Per 8-k block: NP value
// vectors and NP index vectors, then per row one 8-byte broadcast and NP
// (vpermb, vpdpbusd) pairs. U > 1 splits K over independent accumulator
// sets for the weight-streaming shapes (1-2 rows), as in the dense kernel.
template <int MR, int NP, int U>
void i8_tile(const Sparse24I8Args& a, int64_t m, int64_t n, __m512i ctrl, __m512i off) {
  static_assert(MR * NP * U + 2 * NP + 2 <= 32, "must fit the zmm file");
  const int64_t Kp = a.Kp, KB = Kp / 8, vps = 64 * KB, cps = 16 * KB;  // per-panel bytes
  const int64_t as = a.astride;
  const uint8_t* A = static_cast<const uint8_t*>(a.a) + m * as;
  const int8_t* V = a.sv + (n / 16) * vps;
  const uint8_t* C = a.sc + (n / 16) * cps;
  __m512i acc[U][MR][NP];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[u][r][p] = _mm512_setzero_si512();
  auto step = [&](int u, int64_t kb) {
    __m512i wv[NP], ix[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      const int8_t* vl = V + p * vps + kb * 64;
      prefetch_l2(vl, kPrefetchBytes);
      if ((kb & 3) == 0) prefetch_l2(C + p * cps + kb * 16, kPrefetchBytes / 4);
      wv[p] = _mm512_loadu_si512(vl);
      ix[p] = i8_index(C + p * cps + kb * 16, ctrl, off);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      long long x8;
      std::memcpy(&x8, A + r * as + kb * 8, 8);
      const __m512i xb = _mm512_set1_epi64(x8);
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) dpbusd(acc[u][r][p], _mm512_permutexvar_epi8(ix[p], xb), wv[p]);
    }
  };
  int64_t kb = 0;
  for (; kb + U <= KB; kb += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) step(u, kb + u);
  }
  for (; kb < KB; ++kb) step(0, kb);  // leftover blocks when U does not divide KB
#pragma GCC unroll 4
  for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[0][r][p] = _mm512_add_epi32(acc[0][r][p], acc[u][r][p]);
  // Epilogue as in the dense packed kernel (avx512_common.h).
  store_w8a8_tile<MR, NP>(acc[0], a.colsum, a.ws, a.bias, a.xs, m, n, a.N, a.dt, a.y);
}

typedef void (*I8TileFn)(const Sparse24I8Args&, int64_t, int64_t, __m512i, __m512i);
// [rows-1][panels-1]; up to 6 rows x 3 panels (18 accumulators + 6 value /
// index vectors + broadcast + permute result = 26 zmm).
#define PYSPARSE_TILE_ROW(mr, u) {i8_tile<mr, 1, u>, i8_tile<mr, 2, u>, i8_tile<mr, 3, u>}
const I8TileFn kI8Tiles[6][3] = {PYSPARSE_TILE_ROW(1, 4), PYSPARSE_TILE_ROW(2, 2), PYSPARSE_TILE_ROW(3, 1),
                                 PYSPARSE_TILE_ROW(4, 1), PYSPARSE_TILE_ROW(5, 1), PYSPARSE_TILE_ROW(6, 1)};
#undef PYSPARSE_TILE_ROW

// Many rows (more than kFewRows in the block): the gather indices of a 48-column block are
// computed once into `ix` ([panel][kb][64] bytes, L1/L2 resident) and reused
// by every row tile, and each row's activations are loaded 64 bytes (8
// blocks) at a time: the indices of block kb carry the offset 8*(kb%8) into
// that register, so per row and weight vector the only work left is
// vpermb + vpdpbusd.
// Up to kFewRows rows the indices are computed inline per row tile: writing
// them out costs about 3 cycles per weight vector (a zmm store is 2 cycles on
// Zen 4), which only pays when more than ~8 rows reuse them (measured).
constexpr int64_t kFewRows = 8;

void i8_indices(const Sparse24I8Args& a, int64_t n, int np, uint8_t* ix, __m512i ctrl, __m512i off) {
  const int64_t KB = a.Kp / 8;
  for (int p = 0; p < np; ++p) {
    const uint8_t* C = a.sc + (n / 16 + p) * KB * 16;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const __m512i o = _mm512_add_epi8(off, _mm512_set1_epi8(char(8 * (kb % 8))));
      _mm512_storeu_si512(ix + (p * KB + kb) * 64, i8_index(C + kb * 16, ctrl, o));
    }
  }
}

template <int MR, int NP>
void i8_tile_many(const Sparse24I8Args& a, int64_t m, int64_t n, const uint8_t* ix, int64_t as) {
  static_assert(MR * NP + MR + 2 * NP + 1 <= 32, "must fit the zmm file");
  const int64_t KB = a.Kp / 8, vps = 64 * KB;
  const uint8_t* A = static_cast<const uint8_t*>(a.a) + m * as;
  const int8_t* V = a.sv + (n / 16) * vps;
  __m512i acc[MR][NP];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_si512();
  for (int64_t kb0 = 0; kb0 < KB; kb0 += 8) {
    __m512i xc[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) xc[r] = _mm512_loadu_si512(A + r * as + kb0 * 8);
    const int64_t kend = kb0 + 8 < KB ? kb0 + 8 : KB;
    for (int64_t kb = kb0; kb < kend; ++kb) {
      __m512i wv[NP], iv[NP];
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) {
        wv[p] = _mm512_loadu_si512(V + p * vps + kb * 64);
        iv[p] = _mm512_loadu_si512(ix + (p * KB + kb) * 64);
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int p = 0; p < NP; ++p) dpbusd(acc[r][p], _mm512_permutexvar_epi8(iv[p], xc[r]), wv[p]);
    }
  }
  store_w8a8_tile<MR, NP>(acc, a.colsum, a.ws, a.bias, a.xs, m, n, a.N, a.dt, a.y);
}

typedef void (*I8ManyFn)(const Sparse24I8Args&, int64_t, int64_t, const uint8_t*, int64_t);
constexpr int kManyRows = 6;
#define PYSPARSE_TILE_ROW(mr) {i8_tile_many<mr, 1>, i8_tile_many<mr, 2>, i8_tile_many<mr, 3>}
const I8ManyFn kI8Many[kManyRows][3] = {PYSPARSE_TILE_ROW(1), PYSPARSE_TILE_ROW(2), PYSPARSE_TILE_ROW(3),
                                        PYSPARSE_TILE_ROW(4), PYSPARSE_TILE_ROW(5), PYSPARSE_TILE_ROW(6)};
#undef PYSPARSE_TILE_ROW

// ---------------------------------------------------------------- float, fp32 FMA
// vpmultishiftqb control for one sp24f code word (broadcast to all qwords):
// dword lane j needs the 2-bit field `which` (0: i0, 1: i1) of column j's
// nibble, bits 4j + 2*which; all four bytes of the dword take it, and the
// AND with 3 clears the upper three.
inline __m512i f_ctrl(int which) {
  alignas(64) uint8_t c[64];
  for (int i = 0; i < 64; ++i) c[i] = uint8_t(4 * (i / 4) + 2 * which);
  return _mm512_load_si512(c);
}

// Value lines of one 16-column group: lo[j] = first kept value of column j,
// hi[j] = second, as fp32 (bf16 widened exactly).
template <bool VBF16>
inline void f_values(const void* sv, int64_t line, __m512& lo, __m512& hi) {
  if (VBF16) {
    // [j][t] bf16 pairs: dword j = value0 | value1 << 16.
    const __m512i d = _mm512_loadu_si512(static_cast<const uint16_t*>(sv) + line * 32);
    lo = _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
    hi = _mm512_castsi512_ps(_mm512_and_si512(d, _mm512_set1_epi32(int(0xFFFF0000u))));
  } else {
    // [j][t] fp32 pairs (the bf16 order, so a dtype cast of the buffer stays a valid
    // layout): de-interleave the 32 floats into the two 16-column lines.
    const float* f = static_cast<const float*>(sv) + line * 32;
    const __m512 a = _mm512_loadu_ps(f), b = _mm512_loadu_ps(f + 16);
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    lo = _mm512_permutex2var_ps(a, even, b);
    hi = _mm512_permutex2var_ps(a, _mm512_add_epi32(even, _mm512_set1_epi32(1)), b);
  }
}

// 4 activations x[k..k+3] as fp32, broadcast to every 128-bit lane.
template <bool XBF16>
inline __m512 x4(const void* x, int64_t i) {
  if (XBF16) {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    return _mm512_broadcast_f32x4(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));
  }
  return _mm512_broadcast_f32x4(_mm_loadu_ps(static_cast<const float*>(x) + i));
}

template <int MR, int NP, bool XBF16, bool VBF16>
void f_tile(const Sparse24FArgs& a, int64_t m, int64_t n, __m512i c0, __m512i c1) {
  static_assert(MR * NP + 4 * NP + 2 <= 32, "must fit the zmm file");
  const int64_t K = a.K, G = K / 4, vsz = VBF16 ? 2 : 4;
  const int64_t nb = n / 16;
  const uint64_t* C = a.sc + nb * G;
  __m512 acc[MR][NP];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_ps();
  const __m512i three = _mm512_set1_epi32(3);
  for (int64_t g = 0; g < G; ++g) {
    __m512 lo[NP], hi[NP];
    __m512i i0[NP], i1[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      const int64_t line = (nb + p) * G + g;
      prefetch_l2(static_cast<const char*>(a.sv) + line * 32 * vsz, kPrefetchBytes);
      f_values<VBF16>(a.sv, line, lo[p], hi[p]);
      const __m512i cb = _mm512_set1_epi64(static_cast<long long>(C[p * G + g]));
      i0[p] = _mm512_and_si512(_mm512_multishift_epi64_epi8(c0, cb), three);
      i1[p] = _mm512_and_si512(_mm512_multishift_epi64_epi8(c1, cb), three);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = x4<XBF16>(a.x, (m + r) * K + 4 * g);
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) {
        acc[r][p] = _mm512_fmadd_ps(_mm512_permutexvar_ps(i0[p], xv), lo[p], acc[r][p]);
        acc[r][p] = _mm512_fmadd_ps(_mm512_permutexvar_ps(i1[p], xv), hi[p], acc[r][p]);
      }
    }
  }
  store_f32_tile<MR, NP>(acc, a.bias, m, n, a.N, a.dt, a.y);
}

typedef void (*FTileFn)(const Sparse24FArgs&, int64_t, int64_t, __m512i, __m512i);
#define PYSPARSE_F_ROW(mr, xb, vb) {f_tile<mr, 1, xb, vb>, f_tile<mr, 2, xb, vb>}
#define PYSPARSE_F_TABLE(xb, vb)                                                                    \
  {PYSPARSE_F_ROW(1, xb, vb), PYSPARSE_F_ROW(2, xb, vb), PYSPARSE_F_ROW(3, xb, vb),                 \
   PYSPARSE_F_ROW(4, xb, vb), PYSPARSE_F_ROW(5, xb, vb), PYSPARSE_F_ROW(6, xb, vb)}
// [x bf16][values bf16][rows-1][panels-1]
const FTileFn kFTiles[2][2][6][2] = {{PYSPARSE_F_TABLE(false, false), PYSPARSE_F_TABLE(false, true)},
                                     {PYSPARSE_F_TABLE(true, false), PYSPARSE_F_TABLE(true, true)}};
#undef PYSPARSE_F_TABLE
#undef PYSPARSE_F_ROW

}  // namespace

void sparse24_i8_block_vbmi(const Sparse24I8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                            uint8_t* scratch) {
  // 48-column (3-panel) blocks swept over the rows: a block's 48*Kp*5/8
  // weight bytes are read from memory once and then come from L2.
  const __m512i ctrl = i8_ctrl(), off = i8_off();
  const int64_t as = a.astride;
  if (m1 - m0 <= kFewRows) {
    for (int64_t n = n0; n < n1; n += 48) {
      const int64_t nv = n1 - n < 48 ? n1 - n : 48;
      const int np = int((nv + 15) / 16);
      for (int64_t m = m0; m < m1; m += 6) {
        const int mr = m1 - m < 6 ? int(m1 - m) : 6;
        kI8Tiles[mr - 1][np - 1](a, m, n, ctrl, off);
      }
    }
    return;
  }
  uint8_t* ix = scratch;
  for (int64_t n = n0; n < n1; n += 48) {
    const int64_t nv = n1 - n < 48 ? n1 - n : 48;
    const int np = int((nv + 15) / 16);
    i8_indices(a, n, np, ix, ctrl, off);
    for (int64_t m = m0; m < m1; m += kManyRows) {
      const int mr = m1 - m < kManyRows ? int(m1 - m) : kManyRows;
      kI8Many[mr - 1][np - 1](a, m, n, ix, as);
    }
  }
}

void sparse24_f_block_vbmi(const Sparse24FArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const __m512i c0 = f_ctrl(0), c1 = f_ctrl(1);
  const FTileFn(*tab)[2] = kFTiles[a.dt == kBF16][a.vdt == kBF16];
  for (int64_t n = n0; n < n1; n += 32) {
    const int np = n1 - n > 16 ? 2 : 1;
    for (int64_t m = m0; m < m1; m += 6) {
      const int mr = m1 - m < 6 ? int(m1 - m) : 6;
      tab[mr - 1][np - 1](a, m, n, c0, c1);
    }
  }
}

int64_t first_nonfinite_row_avx512(const void* x, DType dt, int64_t K, int64_t m0, int64_t m1) {
  // |v| >= 0x7f800000 as integers <=> NaN or Inf (see quant_rows).
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  for (int64_t m = m0; m < m1; ++m) {
    __m512i mx = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = load16(x, dt, m * K + k, mask16(K - k));
      mx = _mm512_max_epu32(mx, _mm512_and_si512(_mm512_castps_si512(v), absmask));
    }
    if (_mm512_reduce_max_epu32(mx) >= 0x7f800000u) return m;
  }
  return -1;
}

}}}  // namespace pysparse::cpu::detail
