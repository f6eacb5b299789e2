#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
// AVX-512 VNNI path (Cascade Lake / Ice Lake / Sapphire Rapids / Zen 4).
//
// The target list is exactly what dispatch.cpp checks for kAvx512Vnni;
// avx512bf16 is deliberately not enabled (Cascade/Ice Lake have VNNI but no
// BF16, and vcvtneps2bf16 flushes denormals, so the bf16 output uses the
// integer round-to-nearest-even trick instead).
//
// ODR: everything except the entry points declared in impl.h is in an
// anonymous namespace, and no out-of-line std:: template is used, so no
// AVX-512 code can be picked by the linker for another path.
//
// GEMM scheme (w stays in the canonical [N,K] layout, both operands are
// K-contiguous): each output (m,n) gets a zmm of 16 int32 partial dot
// products over K, 64 bytes per vpdpbusd; the partial vectors of a 16-output
// tile are reduced together at the end (hsum16, ~3 instructions per output).
// vpdpbusd multiplies u8 x s8, so w is fed as the unsigned operand after
// flipping its sign bit (w ^ 0x80 == w + 128 as u8) and x as the signed one:
//   sum_k (w+128)*x = sum_k w*x + 128 * sum_k x,
// and the row sums of x (computed while quantizing) are subtracted in the
// epilogue. All arithmetic wraps modulo 2^32, so the result equals the ref
// path bitwise for any int8 inputs (including -128 in either operand).
//
// Packed-weight path (int8_linear_packed, vnni16 layout, see kernels.h):
// the roles flip. The activation is quantized straight to u8 = q+128 (the
// unsigned operand, broadcast 4 bytes at a time) and each 64-byte line of a
// weight panel is loaded as the signed operand as is, so a zmm accumulator
// holds 16 output columns and no reduction is needed; 128*colsum[n]
// (precomputed at pack time) is subtracted in the epilogue.
// GCC 12's own intrinsic headers trip -Wuninitialized / -Wmaybe-uninitialized
// (the `__Y = __Y` idiom of _mm512_undefined_*, GCC PR105593); silence that
// for the header's lines only.
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

// Lane i of the result = sum of the 16 lanes of v[i]. Transpose-and-add tree:
// 8 + 4 + 3 adds and twice as many shuffles for 16 outputs, instead of ~8
// instructions per output for independent reductions (which would rival the
// K loop itself for K of a few hundred).
inline __m512i hsum16(const __m512i* v) {
  __m512i s[8], t[4];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    s[j] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * j], v[2 * j + 1]),
                            _mm512_unpackhi_epi32(v[2 * j], v[2 * j + 1]));
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)  // per 128-bit lane: partials of v[4j..4j+3]
    t[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(s[2 * j], s[2 * j + 1]),
                            _mm512_unpackhi_epi64(s[2 * j], s[2 * j + 1]));
  // Sum the four 128-bit lanes of each t[j] and place it in lane j.
  const __m512i p = _mm512_add_epi32(_mm512_shuffle_i32x4(t[0], t[1], 0x44), _mm512_shuffle_i32x4(t[0], t[1], 0xEE));
  const __m512i q = _mm512_add_epi32(_mm512_shuffle_i32x4(t[2], t[3], 0x44), _mm512_shuffle_i32x4(t[2], t[3], 0xEE));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(p, q, 0x88), _mm512_shuffle_i32x4(p, q, 0xDD));
}

// Micro-kernel: MR rows of x times NR rows of w over the whole K; returns
// the 16-lane vector with lane r*NR+c = sum_k (w[c]+128) * x[r] (lanes past
// MR*NR are 0). MR*NR <= 16 accumulators + MR x vectors + 2 stay within the
// 32 zmm registers; every w vector loaded is reused by MR rows and every x
// vector by NR columns.
template <int MR, int NR>
inline __m512i micro(const int8_t* const* xr, const int8_t* const* wr, int64_t K) {
  static_assert(MR * NR <= 16, "too many accumulators");
  __m512i acc[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    __m512i xv[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) xv[r] = _mm512_loadu_si512(xr[r] + k);
#pragma GCC unroll 16
    for (int c = 0; c < NR; ++c) {
      const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(wr[c] + k), flip);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) dpbusd(acc[r * NR + c], wv, xv[r]);
    }
  }
  if (k < K) {
    // K tail: masked loads never touch bytes past the row; x's masked-out
    // lanes are 0, so whatever w holds there (0x80 after the flip) adds 0.
    const __mmask64 mk = mask64(K - k);
    __m512i xv[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) xv[r] = _mm512_maskz_loadu_epi8(mk, xr[r] + k);
#pragma GCC unroll 16
    for (int c = 0; c < NR; ++c) {
      const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, wr[c] + k), flip);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) dpbusd(acc[r * NR + c], wv, xv[r]);
    }
  }
  return hsum16(acc);
}

constexpr int log2i(int v) { return v <= 1 ? 0 : 1 + log2i(v / 2); }

// Epilogue for one micro-tile: rows [m, m+mr), cols [n, n+nr); s lane r*NR+c.
template <int MR, int NR>
inline void store_tile(const GemmArgs& a, __m512i s, int64_t m, int mr, int64_t n, int nr) {
  static_assert((NR & (NR - 1)) == 0, "NR must be a power of two");
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i idx_r = _mm512_srli_epi32(iota, log2i(NR));           // lane -> row in tile
  const __m512i idx_c = _mm512_and_si512(iota, _mm512_set1_epi32(NR - 1));  // lane -> col in tile
  const __mmask16 mrm = mask16(mr), nrm = mask16(nr);
  // Undo the +128 bias of w: subtract 128 * sum_k x[row] (wrapping).
  const __m512i xsum = _mm512_permutexvar_epi32(idx_r, _mm512_maskz_loadu_epi32(mrm, a.xsum + m));
  s = _mm512_sub_epi32(s, _mm512_slli_epi32(xsum, 7));
  const int64_t N = a.N;
  if (a.acc) {
    for (int r = 0; r < mr; ++r) {
      const __m512i row = _mm512_permutexvar_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(r * NR)), s);
      _mm512_mask_storeu_epi32(a.acc + (m + r) * N + n, nrm, row);
    }
    return;
  }
  // y = ((float)acc * xs[m]) * ws[n] (+ bias[n]): two roundings then the add,
  // never an FMA (the asm barrier stops GCC from contracting mul+add).
  __m512 f = _mm512_cvtepi32_ps(s);
  f = _mm512_mul_ps(f, _mm512_permutexvar_ps(idx_r, _mm512_maskz_loadu_ps(mrm, a.xs + m)));
  f = _mm512_mul_ps(f, _mm512_permutexvar_ps(idx_c, _mm512_maskz_loadu_ps(nrm, a.ws + n)));
  if (a.bias) {
    __asm__("" : "+v"(f));
    f = _mm512_add_ps(f, _mm512_permutexvar_ps(idx_c, _mm512_maskz_loadu_ps(nrm, a.bias + n)));
  }
  for (int r = 0; r < mr; ++r) {
    const __m512 row = _mm512_permutexvar_ps(_mm512_add_epi32(iota, _mm512_set1_epi32(r * NR)), f);
    if (a.dt == kBF16)
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.y) + (m + r) * N + n, nrm, f32_to_bf16_16(row));
    else
      _mm512_mask_storeu_ps(static_cast<float*>(a.y) + (m + r) * N + n, nrm, row);
  }
}

// Rows [m, m+mv) (mv <= MR) x cols [n, n+nv) (nv <= 16) with MR x NR tiles.
// Rows/cols of a tile past the valid ones point at a valid row (the first of
// the tile), so they read in-bounds memory; their results are not stored.
template <int MR, int NR>
inline void run_rows(const GemmArgs& a, int64_t m, int mv, int64_t n, int nv) {
  const int64_t K = a.K;
  const int8_t* xr[MR];
  for (int r = 0; r < MR; ++r) xr[r] = a.xq + (m + (r < mv ? r : 0)) * K;
  for (int c0 = 0; c0 < nv; c0 += NR) {
    const int nr = nv - c0 < NR ? nv - c0 : NR;
    const int8_t* wr[NR];
    for (int c = 0; c < NR; ++c) wr[c] = a.w + (n + c0 + (c < nr ? c : 0)) * K;
    store_tile<MR, NR>(a, micro<MR, NR>(xr, wr, K), m, mv, n + c0, nr);
  }
}

// Per-token quantization of rows [m0,m1) (contract in kernels.h). U8=false
// stores q as int8 at out + m*K (the canonical path); U8=true stores q+128
// as uint8 at out + m*stride and zeroes the pad [K,stride), the activation
// operand of the packed GEMM (vpdpbusd multiplies u8 x s8). Both share this
// one body so the packed path's q is bitwise the canonical path's q.
template <bool U8>
int64_t quant_rows(const void* x, DType dt, int64_t K, int64_t stride, int64_t m0, int64_t m1,
                   void* out, float* scale, int32_t* rowsum) {
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t base = m * K;
    // amax on the bit patterns: for non-negative floats integer order equals
    // float order, and |NaN|, |Inf| >= 0x7f800000, so one max detects both.
    __m512i mx = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = load16(x, dt, base + k, mask16(K - k));
      mx = _mm512_max_epu32(mx, _mm512_and_si512(_mm512_castps_si512(v), absmask));
    }
    const uint32_t abits = _mm512_reduce_max_epu32(mx);
    if (abits >= 0x7f800000u) return m;
    float amax;
    std::memcpy(&amax, &abits, 4);
    const float s = (amax > 1e-12f ? amax : 1e-12f) / 127.0f;
    scale[m] = s;
    const __m512 vs = _mm512_set1_ps(s);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = mask16(K - k);
      __m512 r = _mm512_div_ps(load16(x, dt, base + k, mk), vs);  // IEEE division, like ref
      r = _mm512_roundscale_ps(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
      const __m512i qi = _mm512_cvtps_epi32(r);  // exact: r is an integer in [-127,127]
      sum = _mm512_add_epi32(sum, qi);           // masked-out lanes are 0
      if (U8)  // qi+128 is in [1,255]; the truncating store keeps its low byte = the u8 value
        _mm512_mask_cvtepi32_storeu_epi8(static_cast<uint8_t*>(out) + m * stride + k, mk,
                                         _mm512_add_epi32(qi, _mm512_set1_epi32(128)));
      else
        _mm512_mask_cvtepi32_storeu_epi8(static_cast<int8_t*>(out) + base + k, mk, qi);
    }
    if (rowsum) rowsum[m] = _mm512_reduce_add_epi32(sum);
    // Zero activation in the pad: it meets whatever the packed weight holds
    // there and must contribute nothing.
    if (U8 && stride > K)
      _mm512_mask_storeu_epi8(static_cast<uint8_t*>(out) + m * stride + K, mask64(stride - K), _mm512_setzero_si512());
  }
  return -1;
}

// ---------------------------------------------------------------- packed path
// Micro-kernel of the packed (vnni16) path: MR rows x NP 16-column panels
// over all of K, accumulators in registers. Per 4-k step it loads NP
// 64-byte weight lines (16 columns x 4 k, one zmm each) and MR 4-byte
// activation groups (vpbroadcastd), then issues MR*NP vpdpbusd: each weight
// vector is reused by all MR rows and each broadcast by all NP panels, and
// no horizontal reduction is needed because lane j of an accumulator is
// column j of its panel. At MR=8, NP=3: 24 accumulators + 3 weights + 1
// broadcast = 28 of the 32 zmm, 24 vpdpbusd per 11 loads.
// U > 1 (used for MR <= 2, the weight-streaming shapes) splits the K loop
// over U independent accumulator sets: with only MR*NP chains the loop
// would otherwise wait on vpdpbusd latency whenever w comes from cache.
// Activation rows are u8 q+128 padded with zeros to Kp, panels are padded to
// 16 columns and Kp, so every load is in bounds and full width; only the
// epilogue masks (columns >= N of the last panel).

// Software prefetch distance in the panel streams: each of the NP weight
// streams is prefetched (prefetcht1, into L2) 2 KiB = 32 k-steps ahead.
// Measured on Zen 4 for M=1..8 at K,N in {4096, 11008}: without it a
// single thread reached 18-23 GB/s of its 26.7; with it 25-29 (T0 hints and
// 1 or 3-4 KiB distances were no better, a single 16-column stream worse).
// Harmless for the compute-bound shapes (one extra load per 8 vpdpbusd).
constexpr int64_t kPrefetchBytes = 2048;

template <int MR, int NP, int U>
void packed_tile(const PackedArgs& a, int64_t m, int64_t n) {
  static_assert(MR >= 1 && NP >= 1 && U >= 1 && MR * NP * U <= 24, "accumulators must fit the zmm file");
  const int64_t Kp = a.Kp, KG = Kp / 4, ps = 16 * Kp;  // ps: bytes per panel
  const uint8_t* A = static_cast<const uint8_t*>(a.a) + m * Kp;
  const int8_t* W = a.wp + (n / 16 - a.panel0) * ps;
  __m512i acc[U][MR][NP];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p)
        acc[u][r][p] = _mm512_setzero_si512();
  int64_t kg = 0;
  for (; kg + U <= KG; kg += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      __m512i wv[NP];
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) {
        const int8_t* wl = W + p * ps + (kg + u) * 64;
        // Near the end of the weight the prefetch address runs past the
        // buffer: harmless for the CPU (prefetches never fault), and formed
        // in integer arithmetic so no out-of-range pointer exists in C++.
        _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(wl) + kPrefetchBytes), _MM_HINT_T1);
        wv[p] = _mm512_loadu_si512(wl);
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        int32_t x4;
        std::memcpy(&x4, A + r * Kp + (kg + u) * 4, 4);
        const __m512i xb = _mm512_set1_epi32(x4);
#pragma GCC unroll 4
        for (int p = 0; p < NP; ++p) dpbusd(acc[u][r][p], xb, wv[p]);
      }
    }
  }
  for (; kg < KG; ++kg) {  // leftover k-steps when U does not divide the range
    __m512i wv[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) wv[p] = _mm512_loadu_si512(W + p * ps + kg * 64);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t x4;
      std::memcpy(&x4, A + r * Kp + kg * 4, 4);
      const __m512i xb = _mm512_set1_epi32(x4);
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) dpbusd(acc[0][r][p], xb, wv[p]);
    }
  }
#pragma GCC unroll 4
  for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[0][r][p] = _mm512_add_epi32(acc[0][r][p], acc[u][r][p]);
  // Epilogue: undo the +128 of the activation and apply the scales (avx512_common.h).
  store_w8a8_tile<MR, NP>(acc[0], a.colsum, a.ws, a.bias, a.xs, m, n, a.N, a.dt, a.y);
}

typedef void (*PackedTileFn)(const PackedArgs&, int64_t, int64_t);

// [rows-1][panels-1]: every tail shape gets an exact-size kernel, so no
// padded rows are computed and no row pointer has to be clamped.
#define PYSPARSE_TILE_ROW(mr, u) {packed_tile<mr, 1, u>, packed_tile<mr, 2, u>, packed_tile<mr, 3, u>}
const PackedTileFn kPackedTiles[8][3] = {PYSPARSE_TILE_ROW(1, 4), PYSPARSE_TILE_ROW(2, 2), PYSPARSE_TILE_ROW(3, 1),
                                         PYSPARSE_TILE_ROW(4, 1), PYSPARSE_TILE_ROW(5, 1), PYSPARSE_TILE_ROW(6, 1),
                                         PYSPARSE_TILE_ROW(7, 1), PYSPARSE_TILE_ROW(8, 1)};
#undef PYSPARSE_TILE_ROW

}  // namespace

int64_t quantize_rows_avx512_vnni(const void* x, DType dt, int64_t K, int64_t m0, int64_t m1,
                                  int8_t* q, float* scale, int32_t* rowsum) {
  return quant_rows<false>(x, dt, K, K, m0, m1, q, scale, rowsum);
}

int64_t quantize_rows_u8_avx512_vnni(const void* x, DType dt, int64_t K, int64_t Kp, int64_t m0, int64_t m1,
                                     uint8_t* out, float* scale) {
  return quant_rows<true>(x, dt, K, Kp, m0, m1, out, scale, nullptr);
}

void row_sums_avx512_vnni(const int8_t* xq, int64_t K, int64_t m0, int64_t m1, int32_t* rowsum) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xr = xq + m * K;
    __m512i acc = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64)
      acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(mask64(K - k), xr + k));
    rowsum[m] = _mm512_reduce_add_epi32(acc);
  }
}

void gemm_block_avx512_vnni(const GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  // Loop order: a 16-column panel of w (16*K bytes, L1/L2 resident) is swept
  // over all rows of the block, 4 rows at a time (4x4 tiles: 16 dpbusd per
  // 4 x loads + 4 w loads). Row tails use tile shapes that still fill 16
  // accumulators instead of duplicating rows: 3 rows -> 3x4, 2 -> 2x8,
  // 1 -> 1x16 (the GEMV shape: each x vector feeds 16 w rows).
  for (int64_t n = n0; n < n1; n += 16) {
    const int nv = n1 - n < 16 ? int(n1 - n) : 16;
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) run_rows<4, 4>(a, m, 4, n, nv);
    const int rem = int(m1 - m);
    if (rem == 3) run_rows<3, 4>(a, m, 3, n, nv);
    else if (rem == 2) run_rows<2, 8>(a, m, 2, n, nv);
    else if (rem == 1) run_rows<1, 16>(a, m, 1, n, nv);
  }
}

void gemm_packed_block_avx512_vnni(const PackedArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  // 48-column (3-panel) weight blocks, each swept over all rows of the block
  // 8 rows at a time: the block (48*Kp bytes) is read from memory once and
  // then served from L2 to the following row groups. (Cutting K into
  // L1-sized chunks swept over all row groups, with partial sums parked in
  // memory, measured no faster on Zen 4 at M = 32..512, K = 1536..4096, so
  // the simpler full-K tile stays.)
  for (int64_t n = n0; n < n1; n += 48) {
    const int64_t nv = n1 - n < 48 ? n1 - n : 48;
    const int np = int((nv + 15) / 16);
    for (int64_t m = m0; m < m1; m += 8) {
      const int mr = m1 - m < 8 ? int(m1 - m) : 8;
      kPackedTiles[mr - 1][np - 1](a, m, n);
    }
  }
}

int64_t peak_loop_avx512_vnni(int64_t iters) {
  // 12 independent accumulator chains: more than vpdpbusd latency x
  // throughput on current cores, so the loop is throughput bound.
  // (Every loop over acc[] is fully unrolled so GCC keeps it in registers.)
  __m512i acc[12];
#pragma GCC unroll 12
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_epi32(i);
  __m512i x = _mm512_set1_epi8(3), w = _mm512_set1_epi8(-5);
  __asm__("" : "+v"(x), "+v"(w));
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) dpbusd(acc[i], x, w);
  }
  __m512i s = acc[0];
#pragma GCC unroll 12
  for (int i = 1; i < 12; ++i) s = _mm512_add_epi32(s, acc[i]);
  __asm__ volatile("" : : "v"(s));  // keep the chains alive
  return iters * 12 * 64;
}

}}}  // namespace pysparse::cpu::detail
