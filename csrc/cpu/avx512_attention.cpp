#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
// Flash-attention row kernels for AVX-512: fp32 (FMA) and bf16 (vdpbf16ps,
// AVX512-BF16: Cooper Lake, Sapphire Rapids, Zen 4). Driver, packing and
// threading are in dispatch.cpp; packed layouts in impl.h.
//
// One job = up to kAttnBq query rows of one head. Per key block of kAttnBc
// (128) keys:
//   1. S = Q K^T: register tiles of R query rows x NV <= 4 vectors of 16
//      keys, R * NV <= 24 accumulators (R <= 12). bf16: per pair of d one 32-bit broadcast of
//      (q[d], q[d+1]) meets the packed key pairs (kp[..][d/2][16][2]) in
//      vdpbf16ps; fp32: one broadcast q[d] per FMA with kp[..][d][16].
//   2. Online softmax per row in fp32 (x = s*scale + bias; running max m and
//      sum l; p = 2^((x - m) log2 e) by a degree-6 polynomial and vscalefps,
//      exact 0 for masked keys), p stored as bf16 (bf16 path) or fp32.
//   3. O = alpha * O + P V: tiles of R rows x NV vectors of 16 output dims;
//      bf16: a broadcast (p[j], p[j+1]) meets vp[j/2][d][2] in vdpbf16ps.
// The work per score is 2*D multiply-adds in each matmul against ~15
// instructions of softmax per 16 scores, so at D = 64 the two matmuls own
// ~80% of the instructions; K and V blocks (16 KB each at D = 64) stay in L1/L2
// across the row tiles of a job.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "impl.h"
#include "avx512_common.h"

namespace pysparse { namespace cpu { namespace detail {

namespace {

constexpr int BQ = kAttnBq, BC = kAttnBc;
constexpr float kLog2e = 1.4426950408889634f;

// 2^x for x <= 0 or NaN: x = n + f (|f| <= 1/2), 2^f by a degree-6 Taylor
// polynomial (relative error ~1.2e-7), then vscalefps by n. x <= -1e4
// (including -inf, a masked key) gives exactly +0; NaN stays NaN (vmaxps
// returns its second operand when one is NaN).
inline __m512 exp2_16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-1.0e4f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.540353e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.333356e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550411e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline void dpbf16(__m512& acc, __m512i a, __m512i b) {
  // asm for the reason given at dpbusd (avx512_common.h)
  __asm__("vdpbf16ps {%2, %1, %0|%0, %1, %2}" : "+v"(acc) : "v"(a), "v"(b));
}

inline __m512i bcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// The one register-tile micro-kernel behind both matmuls:
//   C[r][16c .. 16c+16) = init + sum over steps s of  bcast(A[r], s) * B[c, s]
// for R rows and NV vectors of 16 columns, R * NV accumulators held in zmm.
//   fp32 (BF16 = false): bcast = A[r * ars + s] as 16 copies, one FMA per (r, c, s);
//   bf16: bcast = the pair A[r * ars + 2s], A[r * ars + 2s + 1] as 16 copies, one
//         vdpbf16ps per (r, c, s) (B vectors hold [16][2] pairs).
// B[c, s] is the 64-byte vector at B + c * bvec + s * bstep (elements of B's type).
// init = 0 (alpha == null) or alpha[r] * C[r] (the online-softmax rescale of O).
//   S = Q K^T:  A = Q rows, B = a packed K block (bvec = one 16-key vector, bstep = one d
//               or d pair), steps over D;  C = S.
//   O += P V:   A = P rows, B = V at this key block (bvec = 16 output dims, bstep = one key
//               or key pair), steps over the block's keys;  C = O.
template <int R, int NV, bool BF16>
void tile(const void* A, int64_t ars, const void* B, int64_t bvec, int64_t bstep, int64_t steps, float* C,
          int64_t crs, const float* alpha) {
  typedef typename std::conditional<BF16, uint16_t, float>::type T;
  const T* a = static_cast<const T*>(A);
  const T* b = static_cast<const T*>(B);
  __m512 acc[R][NV];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m512 al = _mm512_set1_ps(alpha ? alpha[r] : 0.0f);
    #pragma GCC unroll 16
    for (int c = 0; c < NV; ++c)
      acc[r][c] = alpha ? _mm512_mul_ps(al, _mm512_loadu_ps(C + r * crs + c * 16)) : _mm512_setzero_ps();
  }
  for (int64_t s = 0; s < steps; ++s) {
    __m512 bv[NV];
    #pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) bv[c] = _mm512_loadu_ps(b + c * bvec + s * bstep);
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      if constexpr (BF16) {
        const __m512i ab = bcast32(a + r * ars + 2 * s);
        #pragma GCC unroll 16
        for (int c = 0; c < NV; ++c) dpbf16(acc[r][c], ab, _mm512_castps_si512(bv[c]));
      } else {
        const __m512 ab = _mm512_set1_ps(a[r * ars + s]);
        #pragma GCC unroll 16
        for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(ab, bv[c], acc[r][c]);
      }
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(C + r * crs + c * 16, acc[r][c]);
}

// Run F<R, NV> with the run-time R in [1, 12] and NV in [1, 4], R * NV <= 24
// (the accumulators of a tile; rows_for(NV) gives the largest R).
constexpr int rows_for(int nv) { return nv <= 2 ? 12 : 6; }
template <template <int, int> class F, int NV, int R, typename... A>
void run_if(A... args) {
  if constexpr (R * NV <= 24) F<R, NV>::run(args...);
}
template <template <int, int> class F, int NV, typename... A>
void by_r(int r, A... args) {
  switch (r) {
    case 1: run_if<F, NV, 1>(args...); break;
    case 2: run_if<F, NV, 2>(args...); break;
    case 3: run_if<F, NV, 3>(args...); break;
    case 4: run_if<F, NV, 4>(args...); break;
    case 5: run_if<F, NV, 5>(args...); break;
    case 6: run_if<F, NV, 6>(args...); break;
    case 7: run_if<F, NV, 7>(args...); break;
    case 8: run_if<F, NV, 8>(args...); break;
    case 9: run_if<F, NV, 9>(args...); break;
    case 10: run_if<F, NV, 10>(args...); break;
    case 11: run_if<F, NV, 11>(args...); break;
    default: run_if<F, NV, 12>(args...); break;
  }
}
template <template <int, int> class F, typename... A>
void by_r_nv(int r, int nv, A... args) {
  switch (nv) {
    case 1: by_r<F, 1>(r, args...); break;
    case 2: by_r<F, 2>(r, args...); break;
    case 3: by_r<F, 3>(r, args...); break;
    default: by_r<F, 4>(r, args...); break;
  }
}
template <int R, int NV> struct TileBf16 { template <typename... A> static void run(A... a) { tile<R, NV, true>(a...); } };
template <int R, int NV> struct TileF32 { template <typename... A> static void run(A... a) { tile<R, NV, false>(a...); } };

// Online-softmax update of one row over one key block: s holds the raw
// scores of keys [j0, j0+nk), of which the first nvalid are visible (the
// causal limit); brow the bias row at j0 or null. Writes p (16*ceil(nk/16)
// entries, zero where masked) as bf16 or fp32; updates m, l; sets alpha.
template <bool BF16>
void softmax_row(const float* s, int64_t nk, int64_t nvalid, const float* brow, float scale, float& m, float& l,
                 float& alpha, void* prow) {
  const int nv = int((nk + 15) / 16);
  const __m512 vscale = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
  __m512 x[BC / 16];
  __m512 mx = ninf;
  __mmask16 nan = 0;
  for (int c = 0; c < nv; ++c) {
    const __mmask16 vis = mask16(nvalid - 16 * c < 0 ? 0 : nvalid - 16 * c);
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(s + 16 * c), vscale);
    if (brow) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(vis, brow + 16 * c));
    v = _mm512_mask_mov_ps(ninf, vis, v);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    x[c] = v;
    mx = _mm512_max_ps(mx, v);
  }
  const float bm = _mm512_reduce_max_ps(mx);
  const float mnew = bm > m ? bm : m;
  if (nan) {  // a NaN score: the whole row is NaN, as in the dense formula
    l = NAN;
    alpha = 1.0f;
  }
  if (mnew == -INFINITY || nan) {  // nothing visible yet (or NaN): p = 0
    alpha = 1.0f;
    for (int c = 0; c < nv; ++c) {
      if (BF16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(prow) + 16 * c), _mm256_setzero_si256());
      else _mm512_storeu_ps(static_cast<float*>(prow) + 16 * c, _mm512_setzero_ps());
    }
    return;
  }
  alpha = m == -INFINITY ? 0.0f : __builtin_exp2f((m - mnew) * kLog2e);
  const __m512 vm = _mm512_set1_ps(mnew), l2e = _mm512_set1_ps(kLog2e);
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < nv; ++c) {
    const __m512 p = exp2_16(_mm512_mul_ps(_mm512_sub_ps(x[c], vm), l2e));
    sum = _mm512_add_ps(sum, p);
    if (BF16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(prow) + 16 * c),
                          (__m256i)_mm512_cvtneps_pbh(p));
    else
      _mm512_storeu_ps(static_cast<float*>(prow) + 16 * c, p);
  }
  m = mnew;
  l = l * alpha + _mm512_reduce_add_ps(sum);
}

template <bool BF16>
void rows(const AttnJob& t) {
  const AttentionArgs& a = *t.a;
  const int64_t D = a.D, D16 = (D + 15) / 16 * 16, Dp = (D + 1) / 2 * 2, nr = t.i1 - t.i0;
  float* Qf = t.scratch;       // [BQ][D16] fp32, or uint16 [BQ][Dp] (bf16)
  float* S = Qf + BQ * D16;    // [BQ][BC]
  float* P = S + BQ * BC;      // [BQ][BC] fp32, or uint16 (bf16)
  float* O = P + BQ * BC;      // [BQ][D16]
  float* m = O + BQ * D16;
  float* l = m + BQ;
  float* alpha = l + BQ;
  uint16_t* Qh = reinterpret_cast<uint16_t*>(Qf);
  uint16_t* Ph = reinterpret_cast<uint16_t*>(P);

  for (int64_t r = 0; r < nr; ++r) {
    const int64_t qo = t.b * a.qs[0] + t.h * a.qs[1] + (t.i0 + r) * a.qs[2];
    if (BF16) {
      const uint16_t* q = static_cast<const uint16_t*>(a.q) + qo;
      for (int64_t d = 0; d < D; ++d) Qh[r * Dp + d] = q[d];
      if (Dp > D) Qh[r * Dp + D] = 0;
    } else {
      for (int64_t d = 0; d < D; d += 16)
        _mm512_storeu_ps(Qf + r * D16 + d, load16(a.q, a.dt, qo + d, mask16(D - d)));
    }
    for (int64_t d = 0; d < D16; d += 16) _mm512_storeu_ps(O + r * D16 + d, _mm512_setzero_ps());
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  const int64_t off = a.Sk - a.Sq;
  const int64_t jend = t.j1;
  const int64_t kblk = BF16 ? Dp * 16 : D * 16;  // elements per 16-key vector of kp
  for (int64_t j0 = t.j0; j0 < jend; j0 += BC) {
    const int64_t nk = jend - j0 < BC ? jend - j0 : BC;
    const int nv = int((nk + 15) / 16);
    // causal: rows before this one see no key of the block; skip their matmuls
    int64_t rs = 0;
    if (a.causal) {
      rs = j0 - off - t.i0;
      rs = rs < 0 ? 0 : (rs > nr ? nr : rs);
    }
    for (int c0 = 0; c0 < nv; c0 += 4) {  // 16-key vectors in groups of <= 4 per tile
      const int nvc = nv - c0 < 4 ? nv - c0 : 4, rq = rows_for(nvc);
      for (int64_t r = rs; r < nr; r += rq) {
        const int rr = int(nr - r < rq ? nr - r : rq);
        const float* none = nullptr;
        if (BF16)
          by_r_nv<TileBf16>(rr, nvc, static_cast<const void*>(Qh + r * Dp), Dp,
                            static_cast<const void*>(static_cast<const uint16_t*>(t.kp) + (j0 / 16 + c0) * kblk),
                            kblk, int64_t(32), Dp / 2, S + r * BC + c0 * 16, int64_t(BC), none);
        else
          by_r_nv<TileF32>(rr, nvc, static_cast<const void*>(Qf + r * D16), D16,
                           static_cast<const void*>(static_cast<const float*>(t.kp) + (j0 / 16 + c0) * kblk),
                           kblk, int64_t(16), D, S + r * BC + c0 * 16, int64_t(BC), none);
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t qi = t.i0 + r;
      int64_t nvalid = nk;
      if (a.causal) {
        nvalid = qi + off - j0 + 1;
        nvalid = nvalid < 0 ? 0 : (nvalid > nk ? nk : nvalid);
      }
      if (r < rs) {  // no visible key in this block: nothing changes
        alpha[r] = 1.0f;
        continue;
      }
      const float* brow = a.bias ? a.bias + t.b * a.bs[0] + t.h * a.bs[1] + qi * a.bs[2] + j0 : nullptr;
      void* prow = BF16 ? static_cast<void*>(Ph + r * BC) : static_cast<void*>(P + r * BC);
      softmax_row<BF16>(S + r * BC, nk, nvalid, brow, a.scale, m[r], l[r], alpha[r], prow);
    }
    for (int64_t d0 = 0; d0 < D16; d0 += 64) {
      const int dv = int((D16 - d0) / 16 < 4 ? (D16 - d0) / 16 : 4);
      const int rv = rows_for(dv);
      for (int64_t r = rs; r < nr; r += rv) {
        const int rr = int(nr - r < rv ? nr - r : rv);
        if (BF16)  // bf16 P: key pairs; a half pair past nk meets p = 0
          by_r_nv<TileBf16>(rr, dv, static_cast<const void*>(Ph + r * BC), int64_t(BC),
                            static_cast<const void*>(static_cast<const uint16_t*>(t.vp) + (j0 / 2) * D16 * 2 + d0 * 2),
                            int64_t(32), D16 * 2, (nk + 1) / 2, O + r * D16 + d0, D16,
                            static_cast<const float*>(alpha + r));
        else
          by_r_nv<TileF32>(rr, dv, static_cast<const void*>(P + r * BC), int64_t(BC),
                           static_cast<const void*>(static_cast<const float*>(t.vp) + j0 * t.vstride + d0),
                           int64_t(16), t.vstride, nk, O + r * D16 + d0, D16, static_cast<const float*>(alpha + r));
      }
    }
  }
  for (int64_t r = 0; r < nr; ++r) {
    const float lr = l[r];
    const __m512 inv = _mm512_set1_ps(lr != lr ? NAN : (lr > 0.0f ? 1.0f / lr : 0.0f));
    const int64_t oo = ((t.b * a.Hq + t.h) * a.Sq + t.i0 + r) * D;
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 k = mask16(D - d);
      const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(O + r * D16 + d), inv);
      if (a.dt == kBF16)
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.out) + oo + d, k, f32_to_bf16_16(o));
      else
        _mm512_mask_storeu_ps(static_cast<float*>(a.out) + oo + d, k, o);
    }
  }
}

}  // namespace

void attn_rows_avx512_f32(const AttnJob& j) { rows<false>(j); }
void attn_rows_avx512_bf16(const AttnJob& j) { rows<true>(j); }

}}}  // namespace pysparse::cpu::detail
