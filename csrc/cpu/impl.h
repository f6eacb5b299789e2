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

// rowsum[m] = sum_k xq[m,k] for m in [m0,m1) (used by int8_gemm_s32 on the VNNI path).
void row_sums_avx512_vnni(const int8_t* xq, int64_t K, int64_t m0, int64_t m1, int32_t* rowsum);

}}}  // namespace pysparse::cpu::detail
