#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx512bf16")
// 2:4 sparse bf16 x bf16 GEMM with vdpbf16ps (AVX512-BF16: Cooper Lake,
// Sapphire Rapids, Zen 4). Same gather scheme as avx512_sparse.cpp: a
// 16-column weight vector of the sp24f bf16 layout holds the two kept values
// of every column for one group of 4 k (the [j][t] pair order vdpbf16ps
// multiplies), and per row one vpermw of the group's 4 activations (an
// 8-byte broadcast) lines up the pair each column needs. One vpermw +
// vdpbf16ps does the useful work of two dense vdpbf16ps.
//
// Numerics: vdpbf16ps forms the two bf16 products exactly in fp32, adds them
// to the accumulator with round-to-nearest-even, and treats denormal inputs
// and outputs as zero: the float tolerance of the op, not bitwise with ref.
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

// vpmultishiftqb control for one code word broadcast to all qwords: word
// lane w (column j = w/2, t = w%2) takes the 2-bit field t of column j's
// nibble, bit offset 4j + 2t; both bytes of the word take it and the AND
// with 3 clears the upper one.
inline __m512i ctrl_w() {
  alignas(64) uint8_t c[64];
  for (int i = 0; i < 64; ++i) {
    const int w = i / 2;
    c[i] = uint8_t(4 * (w / 2) + 2 * (w % 2));
  }
  return _mm512_load_si512(c);
}

inline void dpbf16(__m512& acc, __m512i a, __m512i b) {
  // Asm for the same reason as dpbusd (GCC 12 moves intrinsic accumulators
  // around); {att|intel} alternatives as there.
  __asm__("vdpbf16ps {%2, %1, %0|%0, %1, %2}" : "+v"(acc) : "v"(a), "v"(b));
}

constexpr int64_t kPrefetchBytes = 2048;

template <int MR, int NP, int U>
void bf16_tile(const Sparse24FArgs& a, int64_t m, int64_t n, __m512i ctrl) {
  static_assert(MR * NP * U + 2 * NP + 2 <= 32, "must fit the zmm file");
  const int64_t K = a.K, G = K / 4, nb = n / 16;
  const uint16_t* V = static_cast<const uint16_t*>(a.sv) + nb * G * 32;
  const uint64_t* C = a.sc + nb * G;
  const uint16_t* X = static_cast<const uint16_t*>(a.x) + m * K;
  const __m512i three = _mm512_set1_epi16(3);
  __m512 acc[U][MR][NP];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[u][r][p] = _mm512_setzero_ps();
  int64_t g = 0;
  auto step = [&](int u, int64_t gg) {
    __m512i wv[NP], ix[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      const uint16_t* vl = V + (p * G + gg) * 32;
      _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(vl) + kPrefetchBytes), _MM_HINT_T1);
      if ((gg & 7) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(C + p * G + gg) + kPrefetchBytes / 8),
                     _MM_HINT_T1);
      wv[p] = _mm512_loadu_si512(vl);
      ix[p] = _mm512_and_si512(
          _mm512_multishift_epi64_epi8(ctrl, _mm512_set1_epi64(static_cast<long long>(C[p * G + gg]))), three);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      long long x4;
      std::memcpy(&x4, X + r * K + 4 * gg, 8);
      const __m512i xb = _mm512_set1_epi64(x4);
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) dpbf16(acc[u][r][p], _mm512_permutexvar_epi16(ix[p], xb), wv[p]);
    }
  };
  for (; g + U <= G; g += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) step(u, g + u);
  }
  for (; g < G; ++g) step(0, g);
#pragma GCC unroll 4
  for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[0][r][p] = _mm512_add_ps(acc[0][r][p], acc[u][r][p]);
  store_f32_tile<MR, NP>(acc[0], a.bias, m, n, a.N, kBF16, a.y);
}

// Many rows: as in the int8 gather kernel (avx512_sparse.cpp), the vpermw
// indices of a 48-column block are computed once into `ix` ([panel][g][32]
// words) with the offset 4*(g%8) folded in, and each row's activations are
// loaded 32 at a time (8 groups), so per row and weight vector only
// vpermw + vdpbf16ps remain.
constexpr int64_t kFewRows = 8;  // as in the int8 kernel
constexpr int kManyRows = 6;

void bf16_indices(const Sparse24FArgs& a, int64_t n, int np, uint16_t* ix, __m512i ctrl) {
  const int64_t G = a.K / 4;
  const __m512i three = _mm512_set1_epi16(3);
  for (int p = 0; p < np; ++p) {
    const uint64_t* C = a.sc + (n / 16 + p) * G;
    for (int64_t g = 0; g < G; ++g) {
      const __m512i f = _mm512_and_si512(
          _mm512_multishift_epi64_epi8(ctrl, _mm512_set1_epi64(static_cast<long long>(C[g]))), three);
      _mm512_storeu_si512(ix + (p * G + g) * 32, _mm512_add_epi16(f, _mm512_set1_epi16(short(4 * (g % 8)))));
    }
  }
}

template <int MR, int NP>
void bf16_tile_many(const Sparse24FArgs& a, int64_t m, int64_t n, const uint16_t* ix) {
  static_assert(MR * NP + MR + 2 * NP + 1 <= 32, "must fit the zmm file");
  const int64_t K = a.K, G = K / 4, nb = n / 16;
  const uint16_t* V = static_cast<const uint16_t*>(a.sv) + nb * G * 32;
  const uint16_t* X = static_cast<const uint16_t*>(a.x) + m * K;
  __m512 acc[MR][NP];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < G; g0 += 8) {
    // 32 activations (8 groups) per row; the last chunk of a row is masked
    // to the row's end (x is the caller's tensor, no padding).
    const int64_t gend = g0 + 8 < G ? g0 + 8 : G;
    const __mmask32 mk = gend - g0 == 8 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << (4 * (gend - g0))) - 1u);
    __m512i xc[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) xc[r] = _mm512_maskz_loadu_epi16(mk, X + r * K + 4 * g0);
    for (int64_t g = g0; g < gend; ++g) {
      __m512i wv[NP], iv[NP];
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) {
        wv[p] = _mm512_loadu_si512(V + (p * G + g) * 32);
        iv[p] = _mm512_loadu_si512(ix + (p * G + g) * 32);
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int p = 0; p < NP; ++p) dpbf16(acc[r][p], _mm512_permutexvar_epi16(iv[p], xc[r]), wv[p]);
    }
  }
  store_f32_tile<MR, NP>(acc, a.bias, m, n, a.N, kBF16, a.y);
}

typedef void (*ManyFn)(const Sparse24FArgs&, int64_t, int64_t, const uint16_t*);
#define PYSPARSE_TILE_ROW(mr) {bf16_tile_many<mr, 1>, bf16_tile_many<mr, 2>, bf16_tile_many<mr, 3>}
const ManyFn kMany[kManyRows][3] = {PYSPARSE_TILE_ROW(1), PYSPARSE_TILE_ROW(2), PYSPARSE_TILE_ROW(3),
                                    PYSPARSE_TILE_ROW(4), PYSPARSE_TILE_ROW(5), PYSPARSE_TILE_ROW(6)};
#undef PYSPARSE_TILE_ROW

typedef void (*TileFn)(const Sparse24FArgs&, int64_t, int64_t, __m512i);
#define PYSPARSE_TILE_ROW(mr, u) {bf16_tile<mr, 1, u>, bf16_tile<mr, 2, u>, bf16_tile<mr, 3, u>}
const TileFn kTiles[6][3] = {PYSPARSE_TILE_ROW(1, 4), PYSPARSE_TILE_ROW(2, 2), PYSPARSE_TILE_ROW(3, 1),
                             PYSPARSE_TILE_ROW(4, 1), PYSPARSE_TILE_ROW(5, 1), PYSPARSE_TILE_ROW(6, 1)};
#undef PYSPARSE_TILE_ROW

}  // namespace

void sparse24_f_block_bf16(const Sparse24FArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                           uint8_t* scratch) {
  const __m512i ctrl = ctrl_w();
  if (m1 - m0 <= kFewRows) {
    for (int64_t n = n0; n < n1; n += 48) {
      const int64_t nv = n1 - n < 48 ? n1 - n : 48;
      for (int64_t m = m0; m < m1; m += 6) {
        const int mr = m1 - m < 6 ? int(m1 - m) : 6;
        kTiles[mr - 1][int((nv + 15) / 16) - 1](a, m, n, ctrl);
      }
    }
    return;
  }
  uint16_t* ix = reinterpret_cast<uint16_t*>(scratch);
  for (int64_t n = n0; n < n1; n += 48) {
    const int64_t nv = n1 - n < 48 ? n1 - n : 48;
    const int np = int((nv + 15) / 16);
    bf16_indices(a, n, np, ix, ctrl);
    for (int64_t m = m0; m < m1; m += kManyRows) {
      const int mr = m1 - m < kManyRows ? int(m1 - m) : kManyRows;
      kMany[mr - 1][np - 1](a, m, n, ix);
    }
  }
}

}}}  // namespace pysparse::cpu::detail
