#pragma once
// Internal interface between dispatch.cpp and the per-ISA translation units.
//
// ODR rule for this header: it must contain only declarations and plain
// structs. The per-ISA files are compiled with different `#pragma GCC target`
// settings; an inline function (or an std:: template instantiation) defined
// here would be emitted in several of them with different instruction sets
// and the linker could keep the AVX-512 copy for the baseline code path.
// For the same reason the per-ISA files keep all helpers `static` /
// in anonymous namespaces and use no out-of-line std:: templates.
#include <cstdint>
#include "kernels.h"

namespace pysparse { namespace cpu { namespace detail {

// Everything a GEMM block needs. Output is either the raw int32 acc (acc !=
// nullptr) or the fused W8A8 epilogue into y (acc == nullptr):
//   y[m,n] = ((float)acc * xs[m]) * ws[n] (+ bias[n]) stored as dt.
struct GemmArgs {
  const int8_t* xq;      // [M,K] row-major
  const int32_t* xsum;   // [M] sum_k xq[m,k] (wrapping); needed by the VNNI path only
  const int8_t* w;       // [N,K] row-major
  int64_t M, K, N;
  int32_t* acc;          // [M,N] or nullptr
  const float* xs;       // [M]
  const float* ws;       // [N]
  const float* bias;     // [N] or nullptr
  void* y;               // [M,N] of dt
  DType dt;
};

// GEMM over the output block rows [m0,m1) x cols [n0,n1); writes only that block.
void gemm_block_ref(const GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void gemm_block_avx2(const GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void gemm_block_avx512_vnni(const GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

// Quantize rows [m0,m1) of x [*,K]. If rowsum != nullptr it receives
// sum_k q[m,k]. Returns the first row in [m0,m1) holding a NaN/Inf (rows after
// it are not processed) or -1.
int64_t quantize_rows_ref(const void* x, DType dt, int64_t K, int64_t m0, int64_t m1,
                          int8_t* q, float* scale, int32_t* rowsum);
int64_t quantize_rows_avx2(const void* x, DType dt, int64_t K, int64_t m0, int64_t m1,
                           int8_t* q, float* scale, int32_t* rowsum);
int64_t quantize_rows_avx512_vnni(const void* x, DType dt, int64_t K, int64_t m0, int64_t m1,
                                  int8_t* q, float* scale, int32_t* rowsum);

// ---------------------------------------------------------------- packed-weight path
// Everything a packed GEMM block needs. The quantized activation `a` is in
// the per-ISA form that ISA's quantizer produced (see below); w is vnni16.
struct PackedArgs {
  const void* a;          // VNNI: uint8 [M][Kp] = q+128, zero in k >= K;
                          // AVX2: int16 [M][Kp] = q, zero in k >= K;  ref: int8 [M][K] = q
  const int8_t* wp;       // vnni16 [Np/16][Kp/4][16][4]
  const int32_t* colsum;  // [N] (VNNI only)
  int64_t M, K, N, Kp;
  const float* xs;        // [M]
  const float* ws;        // [N]
  const float* bias;      // [N] or nullptr
  void* y;                // [M,N] of dt
  DType dt;
};

// Output block rows [m0,m1) x cols [n0,n1), n0 a multiple of 16 (a panel
// start); writes only that block of y.
void gemm_packed_block_ref(const PackedArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void gemm_packed_block_avx2(const PackedArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void gemm_packed_block_avx512_vnni(const PackedArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

// Quantize rows [m0,m1) exactly like quantize_rows_* (same q, same scale),
// but store row m at out + m*Kp as u8 = q+128 (VNNI) / int16 q (AVX2), with
// the pad k in [K,Kp) set to 0. Same return value as quantize_rows_*.
int64_t quantize_rows_u8_avx512_vnni(const void* x, DType dt, int64_t K, int64_t Kp, int64_t m0, int64_t m1,
                                     uint8_t* out, float* scale);
int64_t quantize_rows_s16_avx2(const void* x, DType dt, int64_t K, int64_t Kp, int64_t m0, int64_t m1,
                               int16_t* out, float* scale);

// Register-only multiply-accumulate loops for int8_peak_gops: run `iters`
// iterations and return the number of int8 MACs performed.
int64_t peak_loop_avx512_vnni(int64_t iters);
int64_t peak_loop_avx2(int64_t iters);
int64_t peak_loop_ref(int64_t iters);

// rowsum[m] = sum_k xq[m,k] for m in [m0,m1) (used by int8_gemm_s32 on the VNNI path).
void row_sums_avx512_vnni(const int8_t* xq, int64_t K, int64_t m0, int64_t m1, int32_t* rowsum);

}}}  // namespace pysparse::cpu::detail
