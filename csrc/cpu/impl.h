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
  int64_t panel0;         // index of the panel wp points at (0, or the first
                          // panel of an expanded column block of a sparse weight)
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

// ---------------------------------------------------------------- 2:4 sparse
// int8: the activation `a` is in the per-ISA form of PackedArgs (ref: int8
// [M][K]) with row stride `astride` (zero padded; the gather kernel reads
// 64-byte windows, so there astride = ceil(K/64)*64, elsewhere Kp);
// Kp = ceil(K/8)*8; sv/sc/colsum in the sp24i8 layout (kernels.h).
struct Sparse24I8Args {
  const void* a;
  const int8_t* sv;
  const uint8_t* sc;
  const int32_t* colsum;
  int64_t M, K, N, Kp, astride;
  const float* xs;
  const float* ws;
  const float* bias;
  void* y;
  DType dt;
};
// Output block [m0,m1) x [n0,n1), n0 a multiple of 16. The gather kernel
// (needs VBMI); ref reads the sp24i8 layout directly with exact int sums.
// scratch: at least sparse24_i8_scratch_bytes(Kp) bytes (gather indices of
// one 48-column block), allocated by the caller (dispatch.cpp) so that no
// std:: template is instantiated in the AVX-512 file.
void sparse24_i8_block_vbmi(const Sparse24I8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                            uint8_t* scratch);
int64_t sparse24_i8_scratch_bytes(int64_t Kp);
void sparse24_i8_block_ref(const Sparse24I8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

// float: x [M,K] of dt as given (no copy); values/codes in the sp24f layout.
struct Sparse24FArgs {
  const void* x;
  DType dt;
  const void* sv;
  DType vdt;
  const uint64_t* sc;
  int64_t M, K, N;
  const float* bias;
  void* y;
};
void sparse24_f_block_vbmi(const Sparse24FArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);  // fp32 FMA
// vdpbf16ps; scratch: sparse24_f_scratch_bytes(K) bytes, as for the int8 kernel
void sparse24_f_block_bf16(const Sparse24FArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                           uint8_t* scratch);
int64_t sparse24_f_scratch_bytes(int64_t K);
void sparse24_f_block_ref(const Sparse24FArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
// Dense fp32 panel GEMM for the expand fallback: wd [np][K][16] fp32 holds
// columns [n0, n0+16*np); output rows [m0,m1) x cols [n0,n1) of a.y.
void dense_f32_block_avx2(const Sparse24FArgs& a, const float* wd, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
// First row in [m0,m1) of x [*,K] (dt) holding a NaN/Inf, or -1.
int64_t first_nonfinite_row_avx512(const void* x, DType dt, int64_t K, int64_t m0, int64_t m1);

// ---------------------------------------------------------------- fused attention
// attention.cpp packs K and V of each (b, kv head) once per call and hands
// query blocks of at most kAttnBq rows to a per-ISA row kernel, which walks
// the keys in blocks of kAttnBc. Packed forms (D16 = ceil(D/16)*16,
// Dp = ceil(D/2)*2, zero padded):
//   f32:  kp float [ceil(Sk/16)][D][16]       (16 keys per vector, per d)
//         vp float [Sk][D16] (or fp32 V itself, rows vstride apart, when D % 16 == 0)
//   bf16: kp uint16 [ceil(Sk/16)][Dp/2][16][2] (vdpbf16ps: key pairs of d)
//         vp uint16 [ceil(Sk/2)][D16][2]      (vdpbf16ps: d x key pairs)
enum { kAttnBq = 64, kAttnBc = 128 };
struct AttnJob {
  const AttentionArgs* a;
  const void* kp;
  const void* vp;
  int64_t b, h, i0, i1;  // query rows [i0, i1) of head h of batch b
  int64_t j0, j1;        // keys to visit: j0 a multiple of 16; every key outside [j0, j1) is
                         // masked for every row of the job (causal limit, -inf key padding)
  int64_t vstride;       // f32 form: elements between the rows of vp (D16 when packed; the
                         // input's own row stride when fp32 V with D % 16 == 0 is read in place)
  float* scratch;        // see below
};
// Scratch (floats): Q [Bq][D16] | S [Bq][Bc] | P [Bq][Bc] | O [Bq][D16] | m, l, alpha [Bq]
void attn_rows_ref(const AttnJob& j);          // f32 packs, plain C++
void attn_rows_avx2(const AttnJob& j);         // f32 packs, the same C++ compiled for AVX2+FMA
void attn_rows_avx512_f32(const AttnJob& j);   // f32 packs, AVX-512 FMA micro-kernels
void attn_rows_avx512_bf16(const AttnJob& j);  // bf16 packs, vdpbf16ps micro-kernels

}}}  // namespace pysparse::cpu::detail
