#pragma once
// Small helpers shared by the AVX-512 translation units (avx512_vnni.cpp,
// avx512_sparse.cpp, avx512_bf16.cpp). Include it only after the file's own
// `#pragma GCC target(...)` and <immintrin.h>. Everything here is in an
// anonymous namespace, so each TU gets its own internal copy compiled for
// its own target: nothing with AVX-512 instructions is ever shared through
// the linker with a baseline TU (the ODR rule of impl.h).
#include <cstdint>

#include "kernels.h"

namespace pysparse { namespace cpu { namespace detail {
namespace {

inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
}
inline __mmask64 mask64(int64_t n) {
  return n >= 64 ? ~__mmask64(0) : __mmask64((1ull << n) - 1ull);
}

// 16 fp32 values of x starting at element i (fp32 or bf16), zero-masked: the
// masked-out lanes are not read (no fault past the end) and become +0.0f,
// which changes neither amax nor the finiteness test.
inline __m512 load16(const void* x, DType dt, int64_t i, __mmask16 m) {
  if (dt == kBF16) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_maskz_loadu_ps(m, static_cast<const float*>(x) + i);
}

// Round-to-nearest-even fp32 -> bf16 (same formula as ref.cpp), NaN quieted.
inline __m256i f32_to_bf16_16(__m512 f) {
  const __m512i b = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

// acc += dot4(a as u8, b as s8) per int32 lane. Written as asm because GCC
// 12 register-allocates the _mm512_dpbusd_epi32 intrinsic badly in the
// micro-kernel loop (it copied every accumulator each step and spilled 3 of
// 16 to the stack); "+v" keeps each accumulator in place in its own zmm.
// The {att|intel} alternatives keep it building with -masm=intel.
inline void dpbusd(__m512i& acc, __m512i a, __m512i b) {
  __asm__("vpdpbusd {%2, %1, %0|%0, %1, %2}" : "+v"(acc) : "v"(a), "v"(b));
}

// The W8A8 epilogue of one 16-column vector (contract in kernels.h):
// y = ((float)acc * xs) * ws (+ bias) in that order, the asm barrier keeping
// GCC from contracting the multiply and the add into an FMA; columns outside
// `mk` are not stored.
inline void store_w8a8_16(__m512i acc, float xs, __m512 ws, const __m512* bias, DType dt, void* y, int64_t o,
                          __mmask16 mk) {
  __m512 f = _mm512_cvtepi32_ps(acc);
  f = _mm512_mul_ps(f, _mm512_set1_ps(xs));
  f = _mm512_mul_ps(f, ws);
  if (bias) {
    __asm__("" : "+v"(f));
    f = _mm512_add_ps(f, *bias);
  }
  if (dt == kBF16)
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + o, mk, f32_to_bf16_16(f));
  else
    _mm512_mask_storeu_ps(static_cast<float*>(y) + o, mk, f);
}

// Epilogue of an MR-row x NP-panel W8A8 tile of a packed kernel (u8 activations): per panel
// acc - 128*colsum undoes the +128 of the activation (exact, wrapping), then the scales and
// bias; loads of colsum/ws/bias are masked to the columns < N.
template <int MR, int NP>
inline void store_w8a8_tile(const __m512i (&acc)[MR][NP], const int32_t* colsum, const float* ws_, const float* bias,
                            const float* xs, int64_t m, int64_t n, int64_t N, DType dt, void* y) {
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p) {
    const int64_t n0 = n + p * 16;
    const __mmask16 mk = mask16(N - n0);
    const __m512i cs = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mk, colsum + n0), 7);
    const __m512 ws = _mm512_maskz_loadu_ps(mk, ws_ + n0);
    const __m512 bs = bias ? _mm512_maskz_loadu_ps(mk, bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      store_w8a8_16(_mm512_sub_epi32(acc[r][p], cs), xs[m + r], ws, bias ? &bs : nullptr, dt, y, (m + r) * N + n0,
                    mk);
  }
}

// Epilogue of an MR x NP float tile: y = acc (+ bias) stored as dt, columns < N only.
template <int MR, int NP>
inline void store_f32_tile(const __m512 (&acc)[MR][NP], const float* bias, int64_t m, int64_t n, int64_t N, DType dt,
                           void* y) {
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p) {
    const int64_t n0 = n + p * 16;
    const __mmask16 mk = mask16(N - n0);
    const __m512 bs = bias ? _mm512_maskz_loadu_ps(mk, bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 f = bias ? _mm512_add_ps(acc[r][p], bs) : acc[r][p];
      const int64_t o = (m + r) * N + n0;
      if (dt == kBF16)
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + o, mk, f32_to_bf16_16(f));
      else
        _mm512_mask_storeu_ps(static_cast<float*>(y) + o, mk, f);
    }
  }
}

}  // namespace
}}}  // namespace pysparse::cpu::detail
