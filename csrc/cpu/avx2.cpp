#pragma GCC target("avx2,fma,f16c")
// AVX2 path (Haswell and later, Zen 1+).
//
// ODR: everything except the entry points declared in impl.h is in an
// anonymous namespace and no out-of-line std:: template is used, so the
// linker can never pick AVX2 code for the baseline path.
//
// GEMM scheme (w in canonical [N,K] layout, both operands K-contiguous): each
// output (m,n) gets a ymm of 8 int32 partial dot products over K. 16 int8 of x
// and of w are sign-extended to int16 (vpmovsxbw) and multiplied with
// vpmaddwd, which is exact for int8-valued inputs (each pair sum is at most
// 2*128*128 = 32768 in magnitude, well inside int32). vpmaddubsw is NOT used:
// its int16 saturation makes u8*s8 pair sums inexact. The 8 partial vectors of
// an 8-output tile are reduced together at the end (hsum8).
//
// Packed-weight path (vnni16 layout, see kernels.h): same exact int16
// scheme on the packed lines, activation stored as int16 q (so no +128 /
// colsum correction), described at packed_tile below.
// GCC 12's own intrinsic headers trip -Wuninitialized / -Wmaybe-uninitialized
// (the `__Y = __Y` idiom of _mm512_undefined_*, GCC PR105593); silence that
// for the header's lines only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>
#include <cmath>
#include <cstring>

#include "impl.h"

namespace pysparse { namespace cpu { namespace detail {

namespace {

// Up to 8 fp32 values of x starting at element i (fp32 or bf16). For n < 8
// the missing lanes are +0.0f (neutral for amax / finiteness) and nothing
// past element i+n-1 is read.
inline __m256 load8(const void* x, DType dt, int64_t i, int64_t n) {
  if (dt == kBF16) {
    const uint16_t* p = static_cast<const uint16_t*>(x) + i;
    __m128i h;
    if (n >= 8) {
      h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(buf, p, size_t(n) * 2);
      h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf));
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  const float* p = static_cast<const float*>(x) + i;
  if (n >= 8) return _mm256_loadu_ps(p);
  // vmaskmovps does not fault on masked-out elements.
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), lanes));
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40u);
  return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// Lane i of the result = sum of the 8 lanes of v[i] (hadd tree: 6 hadd +
// 2 permutes + 1 add for 8 outputs).
inline __m256i hsum8(const __m256i* v) {
  const __m256i s01 = _mm256_hadd_epi32(v[0], v[1]), s23 = _mm256_hadd_epi32(v[2], v[3]);
  const __m256i s45 = _mm256_hadd_epi32(v[4], v[5]), s67 = _mm256_hadd_epi32(v[6], v[7]);
  const __m256i t0 = _mm256_hadd_epi32(s01, s23);  // per 128-bit lane: partials of v0..v3
  const __m256i t1 = _mm256_hadd_epi32(s45, s67);  // per 128-bit lane: partials of v4..v7
  return _mm256_add_epi32(_mm256_permute2x128_si256(t0, t1, 0x20), _mm256_permute2x128_si256(t0, t1, 0x31));
}

// MR rows of x times NR rows of w over all of K; lane r*NR+c of the result is
// the dot product (lanes past MR*NR are 0). 8 accumulators + MR x vectors +
// 1-2 temporaries fit the 16 ymm registers.
template <int MR, int NR>
inline __m256i micro(const int8_t* const* xr, const int8_t* const* wr, int64_t K) {
  static_assert(MR * NR <= 8, "too many accumulators");
  __m256i acc[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i xv[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      xv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xr[r] + k)));
#pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) {
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[c] + k)));
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
        acc[r * NR + c] = _mm256_add_epi32(acc[r * NR + c], _mm256_madd_epi16(wv, xv[r]));
    }
  }
  if (k < K) {
    // K tail (< 16 bytes): AVX2 has no byte-masked load, so copy the tail
    // into zero-padded stack buffers; the zero lanes contribute nothing.
    const size_t rem = size_t(K - k);
    __m256i xv[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      alignas(16) int8_t buf[16] = {0};
      std::memcpy(buf, xr[r] + k, rem);
      xv[r] = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
    }
#pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) {
      alignas(16) int8_t buf[16] = {0};
      std::memcpy(buf, wr[c] + k, rem);
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
        acc[r * NR + c] = _mm256_add_epi32(acc[r * NR + c], _mm256_madd_epi16(wv, xv[r]));
    }
  }
  return hsum8(acc);
}

// Epilogue for one tile (rows [m,m+mr), cols [n,n+nr)); scalar, since it runs
// once per 8 outputs against K/16 vector steps per output.
template <int MR, int NR>
inline void store_tile(const GemmArgs& a, __m256i s, int64_t m, int mr, int64_t n, int nr) {
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), s);
  const int64_t N = a.N;
  for (int r = 0; r < mr; ++r) {
    const int64_t o = (m + r) * N + n;
    if (a.acc) {
      for (int c = 0; c < nr; ++c) a.acc[o + c] = t[r * NR + c];
      continue;
    }
    const float xs = a.xs[m + r];
    for (int c = 0; c < nr; ++c) {
      float f = static_cast<float>(t[r * NR + c]) * xs;
      f = f * a.ws[n + c];
      if (a.bias) {
        __asm__("" : "+x"(f));  // keep mul and add separate (no FMA contraction)
        f = f + a.bias[n + c];
      }
      if (a.dt == kBF16)
        static_cast<uint16_t*>(a.y)[o + c] = f32_to_bf16(f);
      else
        static_cast<float*>(a.y)[o + c] = f;
    }
  }
}

// Rows [m,m+mv) (mv <= MR) x cols [n,n+nv) (nv <= 8). Tile rows/cols past
// the valid ones alias the tile's first row (in-bounds reads, results dropped).
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

// Per-token quantization of rows [m0,m1) (contract in kernels.h). S16=false
// stores q as int8 at out + m*K (the canonical path); S16=true stores q as
// int16 at out + m*stride and zeroes the pad [K,stride) (the activation
// operand of the packed GEMM, ready for vpbroadcastq + vpmaddwd). One shared
// body, so both forms hold bitwise the same q.
template <bool S16>
int64_t quant_rows(const void* x, DType dt, int64_t K, int64_t stride, int64_t m0, int64_t m1,
                   void* out, float* scale, int32_t* rowsum) {
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t base = m * K;
    // amax on the bit patterns (integer order == float order for |x|);
    // anything >= 0x7f800000 is Inf or NaN.
    __m256i mx = _mm256_setzero_si256();
    for (int64_t k = 0; k < K; k += 8)
      mx = _mm256_max_epu32(mx, _mm256_and_si256(_mm256_castps_si256(load8(x, dt, base + k, K - k)), absmask));
    alignas(32) uint32_t mv[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(mv), mx);
    uint32_t abits = 0;
    for (int i = 0; i < 8; ++i) abits = mv[i] > abits ? mv[i] : abits;
    if (abits >= 0x7f800000u) return m;
    float amax;
    std::memcpy(&amax, &abits, 4);
    const float s = (amax > 1e-12f ? amax : 1e-12f) / 127.0f;
    scale[m] = s;
    const __m256 vs = _mm256_set1_ps(s);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t k = 0; k < K; k += 8) {
      __m256 r = _mm256_div_ps(load8(x, dt, base + k, K - k), vs);  // IEEE division, like ref
      r = _mm256_round_ps(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
      const __m256i qi = _mm256_cvtps_epi32(r);  // exact: integer in [-127,127]
      sum = _mm256_add_epi32(sum, qi);           // padded lanes are 0
      // int32 -> int16 / int8 (values fit, so the saturating packs are exact).
      const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
      if (S16) {
        int16_t* d = static_cast<int16_t*>(out) + m * stride + k;
        if (K - k >= 8) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d), p16);
        } else {
          alignas(16) int16_t buf[8];
          _mm_store_si128(reinterpret_cast<__m128i*>(buf), p16);
          std::memcpy(d, buf, size_t(K - k) * 2);
        }
        continue;
      }
      int8_t* d = static_cast<int8_t*>(out) + base + k;
      const __m128i p8 = _mm_packs_epi16(p16, p16);
      if (K - k >= 8) {
        _mm_storel_epi64(reinterpret_cast<__m128i*>(d), p8);
      } else {
        alignas(16) int8_t buf[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(buf), p8);
        std::memcpy(d, buf, size_t(K - k));
      }
    }
    if (rowsum) {
      alignas(32) int32_t sv[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(sv), sum);
      uint32_t t = 0;
      for (int i = 0; i < 8; ++i) t += uint32_t(sv[i]);
      rowsum[m] = int32_t(t);
    }
    // Zero activation in the pad: it meets whatever the packed weight holds
    // there and must contribute nothing.
    if (S16)
      for (int64_t k = K; k < stride; ++k) static_cast<int16_t*>(out)[m * stride + k] = 0;
  }
  return -1;
}

// ---------------------------------------------------------------- packed path
// Packed (vnni16) micro-kernel: MR rows x NP 16-column panels over all of K.
// AVX2 has no u8 x s8 dot product that is exact here (vpmaddubsw saturates
// its int16 pair sums: 255*127*2 > 32767), so each 16-byte quarter of a
// 64-byte weight line (4 columns x 4 k) is sign-extended to 16 int16
// (vpmovsxbw) and multiplied by the int16 activations with vpmaddwd, whose
// int32 pair sums are exact. The activation is int16 q (signed: no +128 /
// colsum correction needed), 4 consecutive k broadcast with vpbroadcastq.
// Accumulator (r, panel p, quarter qd) lane 2c+h holds column 4qd+c, k-pair
// h; the epilogue folds the pairs with one hadd per 8 columns. MR*NP*4
// accumulators + MR broadcasts + 1 weight + 1 product fit the 16 ymm.
inline __m256i fold8(__m256i q0, __m256i q1) {
  // hadd: [c0 c1 c4 c5 | c2 c3 c6 c7] (per 128-bit lane), then qword order 0,2,1,3.
  return _mm256_permute4x64_epi64(_mm256_hadd_epi32(q0, q1), 0xD8);
}

// Round-to-nearest-even fp32 -> bf16 for 8 lanes (same formula as ref.cpp), NaN quieted.
inline __m128i f32_to_bf16_8(__m256 f) {
  const __m256i b = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  // |b| > 0x7f800000 as signed compare: both sides are non-negative int32.
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40)), nan);
  // Values are in [0, 0xffff], so the unsigned-saturating pack is exact.
  const __m256i p = _mm256_packus_epi32(r, r);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(p, 0x08));
}

// Epilogue for 8 columns [n0, n0+nv) of row m (nv in 1..8): y = ((float)acc
// * xs) * ws (+ bias), no FMA (asm barrier), stored as dt. Tails go through
// zero-padded stack copies: AVX2 has no masked 16-bit store, and the
// vmaskmov loads keep ws / bias reads inside their N entries.
inline void store8(const PackedArgs& a, __m256i acc, int64_t m, int64_t n0, int nv) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mk = _mm256_cmpgt_epi32(_mm256_set1_epi32(nv), lanes);
  const __m256 ws = nv >= 8 ? _mm256_loadu_ps(a.ws + n0) : _mm256_maskload_ps(a.ws + n0, mk);
  __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(a.xs[m]));
  f = _mm256_mul_ps(f, ws);
  if (a.bias) {
    const __m256 bs = nv >= 8 ? _mm256_loadu_ps(a.bias + n0) : _mm256_maskload_ps(a.bias + n0, mk);
    __asm__("" : "+x"(f));
    f = _mm256_add_ps(f, bs);
  }
  const int64_t o = m * a.N + n0;
  if (a.dt == kBF16) {
    const __m128i h = f32_to_bf16_8(f);
    uint16_t* d = static_cast<uint16_t*>(a.y) + o;
    if (nv >= 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d), h);
    } else {
      alignas(16) uint16_t buf[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(buf), h);
      std::memcpy(d, buf, size_t(nv) * 2);
    }
  } else if (nv >= 8) {
    _mm256_storeu_ps(static_cast<float*>(a.y) + o, f);
  } else {
    _mm256_maskstore_ps(static_cast<float*>(a.y) + o, mk, f);
  }
}

template <int MR, int NP>
void packed_tile(const PackedArgs& a, int64_t m, int64_t n) {
  static_assert(MR >= 1 && NP >= 1 && MR * NP * 4 + MR + 2 <= 16, "registers must fit the ymm file");
  const int64_t Kp = a.Kp, KG = Kp / 4, ps = 16 * Kp;  // ps: bytes per panel
  const int16_t* A = static_cast<const int16_t*>(a.a) + m * Kp;
  const int8_t* W = a.wp + (n / 16 - a.panel0) * ps;
  __m256i acc[MR][NP * 4];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NP * 4; ++j) acc[r][j] = _mm256_setzero_si256();
  for (int64_t kg = 0; kg < KG; ++kg) {
    __m256i xb[MR];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      long long x4;  // 4 int16 activations = k 4kg..4kg+3 of row r
      std::memcpy(&x4, A + r * Kp + kg * 4, 8);
      xb[r] = _mm256_set1_epi64x(x4);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NP * 4; ++j) {
      const int8_t* wq = W + (j / 4) * ps + kg * 64 + (j % 4) * 16;
      // Once per 64-byte line: prefetch the panel stream 2 KiB ahead into L2
      // (as on the VNNI path; lifts the weight-streaming shapes). The address
      // may pass the end of the buffer near the end: prefetches never fault,
      // and it is formed in integer arithmetic, so no out-of-range pointer.
      if (j % 4 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(wq) + 2048), _MM_HINT_T1);
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wq)));
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(wv, xb[r]));
    }
  }
  const int64_t N = a.N;
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int h = 0; h < NP * 2; ++h) {  // 8-column halves of the panels
      const int64_t n0 = n + h * 8;
      if (n0 >= N) break;
      store8(a, fold8(acc[r][2 * h], acc[r][2 * h + 1]), m + r, n0, N - n0 >= 8 ? 8 : int(N - n0));
    }
}

}  // namespace

int64_t quantize_rows_avx2(const void* x, DType dt, int64_t K, int64_t m0, int64_t m1,
                           int8_t* q, float* scale, int32_t* rowsum) {
  return quant_rows<false>(x, dt, K, K, m0, m1, q, scale, rowsum);
}

int64_t quantize_rows_s16_avx2(const void* x, DType dt, int64_t K, int64_t Kp, int64_t m0, int64_t m1,
                               int16_t* out, float* scale) {
  return quant_rows<true>(x, dt, K, Kp, m0, m1, out, scale, nullptr);
}

void gemm_block_avx2(const GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  // An 8-column panel of w is swept over all rows of the block with 4x2
  // tiles; row tails use 3x2 (6 accumulators), 2x4 and 1x8 (GEMV) tiles.
  for (int64_t n = n0; n < n1; n += 8) {
    const int nv = n1 - n < 8 ? int(n1 - n) : 8;
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) run_rows<4, 2>(a, m, 4, n, nv);
    const int rem = int(m1 - m);
    if (rem == 3) run_rows<3, 2>(a, m, 3, n, nv);
    else if (rem == 2) run_rows<2, 4>(a, m, 2, n, nv);
    else if (rem == 1) run_rows<1, 8>(a, m, 1, n, nv);
  }
}

void gemm_packed_block_avx2(const PackedArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  // Each 16-column panel (16*Kp bytes, cache resident after its first use)
  // is swept over all rows of the block 2 rows at a time; a single row (the
  // GEMV shape) takes 2 panels per pass instead so that each broadcast
  // still feeds 8 accumulators (3 panels = 12 accumulators spill: measured
  // 3x slower).
  if (m1 - m0 == 1) {
    int64_t n = n0;
    for (; n + 16 < n1; n += 32) packed_tile<1, 2>(a, m0, n);
    if (n < n1) packed_tile<1, 1>(a, m0, n);
    return;
  }
  for (int64_t n = n0; n < n1; n += 16) {
    int64_t m = m0;
    for (; m + 2 <= m1; m += 2) packed_tile<2, 1>(a, m, n);
    if (m < m1) packed_tile<1, 1>(a, m, n);
  }
}

void dense_f32_block_avx2(const Sparse24FArgs& a, const float* wd, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  // Expand fallback of the 2:4 float path: wd holds the dense columns
  // [n0, n0 + 16*panels) as [panel][K][16] fp32. Per row and k one broadcast
  // of x feeds the two 8-column FMAs of a panel; 4 rows per pass (8
  // accumulators + 2 weight vectors + broadcast).
  const int64_t K = a.K, N = a.N;
  for (int64_t n = n0; n < n1; n += 16) {
    const float* W = wd + ((n - n0) / 16) * K * 16;
    const int nv = n1 - n < 16 ? int(n1 - n) : 16;
    for (int64_t m = m0; m < m1; m += 4) {
      const int mr = m1 - m < 4 ? int(m1 - m) : 4;
      __m256 acc[4][2];
      for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      for (int64_t k = 0; k < K; ++k) {
        const __m256 w0 = _mm256_loadu_ps(W + k * 16), w1 = _mm256_loadu_ps(W + k * 16 + 8);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          if (r >= mr) break;
          const int64_t i = (m + r) * K + k;
          float xv;
          if (a.dt == kBF16) {
            const uint32_t b = uint32_t(static_cast<const uint16_t*>(a.x)[i]) << 16;
            std::memcpy(&xv, &b, 4);
          } else {
            xv = static_cast<const float*>(a.x)[i];
          }
          const __m256 xb = _mm256_set1_ps(xv);
          acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
        }
      }
      for (int r = 0; r < mr; ++r) {
        alignas(32) float out[16];
        _mm256_store_ps(out, acc[r][0]);
        _mm256_store_ps(out + 8, acc[r][1]);
        for (int c = 0; c < nv; ++c) {
          float f = out[c];
          if (a.bias) f += a.bias[n + c];
          const int64_t o = (m + r) * N + n + c;
          if (a.dt == kBF16) {
            uint32_t b;
            std::memcpy(&b, &f, 4);
            // round to nearest even; NaN stays a quiet NaN (as ref.cpp)
            const uint16_t h = (b & 0x7fffffffu) > 0x7f800000u ? uint16_t((b >> 16) | 0x40u)
                                                               : uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
            static_cast<uint16_t*>(a.y)[o] = h;
          } else {
            static_cast<float*>(a.y)[o] = f;
          }
        }
      }
    }
  }
}

int64_t peak_loop_avx2(int64_t iters) {
  // 6 independent vpmaddubsw -> vpmaddwd(ones) -> vpaddd chains (32 u8 x s8
  // MACs each; the classic AVX2 int8 sequence). Written as asm tied to its
  // accumulator (as intrinsics GCC computes the loop-invariant product
  // once), with named accumulators (GCC keeps an array of them in memory).
  __m256i a0 = _mm256_set1_epi32(0), a1 = _mm256_set1_epi32(1), a2 = _mm256_set1_epi32(2);
  __m256i a3 = _mm256_set1_epi32(3), a4 = _mm256_set1_epi32(4), a5 = _mm256_set1_epi32(5);
  const __m256i x = _mm256_set1_epi8(3), w = _mm256_set1_epi8(-5), ones = _mm256_set1_epi16(1);
#define PYSPARSE_CHAIN(acc)                           \
  do {                                                \
    __m256i t;                                        \
    __asm__("vpmaddubsw {%3, %2, %1|%1, %2, %3}\n\t" \
            "vpmaddwd {%4, %1, %1|%1, %1, %4}\n\t"   \
            "vpaddd {%1, %0, %0|%0, %0, %1}"          \
            : "+x"(acc), "=&x"(t)                     \
            : "x"(x), "x"(w), "x"(ones));             \
  } while (0)
  for (int64_t it = 0; it < iters; ++it) {
    PYSPARSE_CHAIN(a0); PYSPARSE_CHAIN(a1); PYSPARSE_CHAIN(a2);
    PYSPARSE_CHAIN(a3); PYSPARSE_CHAIN(a4); PYSPARSE_CHAIN(a5);
  }
#undef PYSPARSE_CHAIN
  const __m256i s = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)),
                                     _mm256_add_epi32(a4, a5));
  __asm__ volatile("" : : "x"(s));  // keep the chains alive
  return iters * 6 * 32;
}

namespace {
#include "attention_generic.inc"
}  // namespace

void attn_rows_avx2(const AttnJob& j) { attn_rows_generic(j); }

}}}  // namespace pysparse::cpu::detail
