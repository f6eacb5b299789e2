#pragma once
// Public C++ API of the pysparse CPU kernels (no torch dependency).
//
// Build contract: every csrc/cpu/*.cpp except files named test_* belongs to
// the library. Each per-ISA file enables its instruction set with its own
// `#pragma GCC target(...)`; nothing may be compiled with global -m flags or
// -march=native, so the library loads and runs (on the ref path) on any x86-64.
//
// Threading contract: the kernels never create threads. All parallelism goes
// through the ParallelFor callback; each RangeFn call writes a disjoint part of
// the outputs. pf may be nullptr, which means "run serially on the caller".
//
// Exactness contract: for a given input every ISA path returns bitwise the
// same q, scale, int32 acc and y as the ref path (int32 sums wrap modulo 2^32
// identically on all paths; they are the exact sum whenever it fits in int32,
// which is guaranteed for K <= 133152 when xq is in [-127, 127]).
#include <cstdint>
#include <string>

namespace pysparse { namespace cpu {

enum Isa : int { kRef = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };

// Best ISA this CPU + OS support (cached, thread-safe). kAvx2 needs
// AVX2+FMA+F16C and OS YMM state; kAvx512Vnni needs AVX512F/BW/VL/DQ/VNNI and
// OS ZMM/opmask state; kAmx additionally AMX-TILE/INT8, XCR0 bits 17/18 and a
// successful arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
Isa detected_isa();
// detected_isa() capped by env PYSPARSE_CPU_ISA=ref|avx2|avx512_vnni|amx
// (read once). An unknown value means "no cap" and isa_error() explains.
Isa active_isa();
const char* isa_name(Isa);   // "ref", "avx2", "avx512_vnni", "amx" ("?" otherwise)
// Space-separated CPU/OS features found, e.g. "avx2 fma f16c avx512f avx512bw
// avx512vl avx512_vnni avx512_bf16 avx512_vbmi2 amx_tile amx_int8 amx_bf16".
std::string cpu_features();
// "" or why PYSPARSE_CPU_ISA was not understood / AMX permission was refused.
std::string isa_error();

enum DType : int { kF32 = 0, kBF16 = 1 };   // bf16 = upper 16 bits of an fp32, stored as uint16_t

typedef void (*RangeFn)(void* ctx, int64_t begin, int64_t end);
// Calls fn(ctx,b,e) over [0,n) in chunks, possibly concurrently.
typedef void (*ParallelFor)(int64_t n, int64_t grain, void* ctx, RangeFn fn);

// All functions below: `isa` is the (already capped) path to use. A path that
// is not implemented (kAmx today) or not supported by this CPU falls down to
// the next lower implemented and supported one. Any M, K, N >= 1 is accepted;
// M, K or N <= 0 is a no-op (returns -1). No alignment is required.

// Per-token symmetric int8 quantization of x [M,K] (row-major, dtype dt):
//   amax = max_k |x[m,k]| (computed in fp32);  scale[m] = max(amax, 1e-12f) / 127.0f;
//   q[m,k] = (int8) clamp(nearbyint(x[m,k] / scale[m]), -127, 127)    (IEEE division, round-half-to-even)
// Returns -1 on success, or the index of the first row that contains a NaN or Inf (outputs then unspecified).
int64_t quantize_per_token(Isa isa, const void* x, DType dt, int64_t M, int64_t K, int8_t* q, float* scale, ParallelFor pf);

// W8A8 linear with dynamic per-token activation quantization fused in:
//   quantize x as above -> (xq, xs);   acc[m,n] = sum_k int32(xq[m,k]) * int32(w_q[n,k])   (exact int32)
//   y[m,n] = (float)acc[m,n] * xs[m] * w_scale[n] (+ bias[n] if bias != nullptr), computed in fp32 in
//   that left-to-right order (never fused into an FMA), then stored as dt (bf16: round-to-nearest-even
//   of the fp32 value; NaN stays a (quiet) NaN).
// w_q is int8 [N,K] row-major (canonical layout, NOT packed), w_scale fp32 [N], bias fp32 [N] or null.
// y is [M,N] row-major of dtype dt and must not alias the inputs.
// Returns -1 on success or the first row index with NaN/Inf in x (y is then left untouched).
int64_t int8_linear(Isa isa, const void* x, DType dt, int64_t M, int64_t K, const int8_t* w_q, const float* w_scale, const float* bias, int64_t N, void* y, ParallelFor pf);

// ---------------------------------------------------------------- packed weights ("vnni16")
// Layout of a weight w_q int8 [N,K] packed for the packed-weight path, with
// Kp = ceil(K/4)*4 and Np = ceil(N/16)*16:
//   packed int8 [Np/16][Kp/4][16][4],  packed[nb][kg][j][t] = w[nb*16+j][kg*4+t]  (0 where out of range)
//   colsum int32 [Np],                 colsum[n] = sum_k w[n][k]                     (0 for n >= N)
// One 16-column panel nb is 16*Kp contiguous bytes whose K loop walks 64-byte
// lines (16 columns x 4 consecutive k): exactly one zmm operand of vpdpbusd,
// so the GEMM streams each weight byte once with no horizontal reductions.
// colsum lets the VNNI path feed the activation as u8 = q + 128 (vpdpbusd is
// u8 x s8) and correct exactly: dot(q+128, w) - 128*colsum = dot(q, w).
// Padding entries of `packed` are never read into a result (k >= K meets a
// zero activation, n >= N is not stored), but pack_int8_vnni16 zeroes them.
// (No inline size helpers here on purpose: this header is included by the
// per-ISA files, and an inline function emitted out of line in an AVX-512 TU
// could be the copy the linker keeps; see impl.h.)

// Packs w int8 [N,K] row-major into `packed` (Np*Kp bytes) and `colsum` (Np
// int32) as above. Plain C++ (no SIMD, no threads); N, K <= 0 is a no-op.
void pack_int8_vnni16(const int8_t* w, int64_t N, int64_t K, int8_t* packed, int32_t* colsum);

// W8A8 linear on a vnni16-packed weight: the same math and output contract as
// int8_linear on the canonical weight it was packed from (y bitwise identical
// to int8_linear on every path, same NaN/Inf row return value, y untouched
// then). w_packed: Np*Kp bytes; w_colsum: at least N int32 (only [0,N) is
// read) and must equal the column sums of that weight (the ref path ignores
// it and computes dot(q, w) directly, which is what makes it the oracle);
// w_scale fp32 [N]; bias fp32 [N] or null; y [M,N] of dt, not aliasing inputs.
// Internally allocates the quantized activation (about M*Kp bytes, twice that
// on the AVX2 path); no other per-call work is O(N*K).
int64_t int8_linear_packed(Isa isa, const void* x, DType dt, int64_t M, int64_t K, const int8_t* w_packed,
                           const int32_t* w_colsum, const float* w_scale, const float* bias, int64_t N, void* y,
                           ParallelFor pf);

// Measured single-thread int8 multiply-accumulate peak of a path (after the
// usual fall-down): a register-only loop of independent vpdpbusd zmm (VNNI)
// or vpmaddubsw+vpmaddwd+vpaddd ymm (AVX2, 32 MACs per triple) run for about
// `seconds` (clamped to [1e-3, 10]) on the calling thread; returns GOP/s
// (2 ops per MAC). The ref path returns the same measure for a scalar
// int32 multiply-add loop.
double int8_peak_gops(Isa isa, double seconds);

// Exposed for tests: the raw int32 GEMM acc[M,N] = xq[M,K] * w_q[N,K]^T on the given ISA path.
// Any int8 values are allowed in both operands (including -128).
void int8_gemm_s32(Isa isa, const int8_t* xq, int64_t M, int64_t K, const int8_t* w_q, int64_t N, int32_t* acc, ParallelFor pf);


// ---------------------------------------------------------------- 2:4 sparse weights
// Canonical input (formats/sparse24.py): K a multiple of 4; values [N, K/2]
// (the two kept entries of every group of 4 along K, in order) and meta
// uint8 [N, ceil(K/8)] (per group a 4-bit code i0 | i1 << 2, i0 < i1; two
// groups per byte, the earlier one in the low nibble).
//
// Packed int8 layout "sp24i8", Kb = ceil(K/8) 8-k blocks, Np = ceil(N/16)*16:
//   values int8 [Np/16][Kb][16][4]:  [nb][b][j][t] = values[nb*16+j][4b+t]
//                                    (groups 2b and 2b+1 of column nb*16+j)
//   codes uint8 [Np/16][Kb][16]:     the meta byte meta[nb*16+j][b] of each
//                                    column, in the order j = 0,1,4,5,8,9,12,13,
//                                    2,3,6,7,10,11,14,15 (a 128-bit broadcast
//                                    then puts the codes of columns 2q, 2q+1 in
//                                    qword q, where vpmultishiftqb can reach them)
//   colsum int32 [Np]:               sum of the values of each column (0 past N)
// Pad columns (n >= N) and a missing last group (K % 8 == 4) are zero values
// with code 0. The AVX-512 path needs VBMI (vpermb/vpmultishiftqb): per 8-k
// block it gathers, per row, the activation bytes the kept weights meet
// (vpermb of an 8-byte broadcast) and multiplies them with the 64 value
// bytes in one vpdpbusd: half the multiply work of the dense kernel and
// 62.5% of its weight bytes. Other paths expand column blocks to vnni16
// (once per block, reused by all rows) and run the dense kernel.
void pack_sparse24_int8(const int8_t* values, const uint8_t* meta, int64_t N, int64_t K, int8_t* packed_values,
                        uint8_t* packed_codes, int32_t* colsum);

// 2:4 W8A8 on an sp24i8-packed weight: same math and output contract as
// int8_linear on the dense weight decompress(values, meta) (y bitwise equal
// to int8_linear on it, same NaN/Inf row return value; y untouched then).
int64_t sparse24_int8_linear_packed(Isa isa, const void* x, DType dt, int64_t M, int64_t K,
                                    const int8_t* packed_values, const uint8_t* packed_codes, const int32_t* colsum,
                                    const float* w_scale, const float* bias, int64_t N, void* y, ParallelFor pf);

// Packed float layout "sp24f", G = K/4 groups, Np = ceil(N/16)*16:
//   values [Np/16][G][16][2] of vdt: [nb][g][j][t] = value t of group g of
//                                  column nb*16+j (the vdpbf16ps operand order;
//                                  the same for f32, so casting the buffer's
//                                  dtype keeps it a valid layout)
//   codes uint64 [Np/16][G]:       bits 4j..4j+3 = the group's code of column j
// The AVX-512 path gathers, per row and group, the activation each kept
// weight meets (vpermw / vpermps of a 4-element broadcast; indices from the
// codes by vpmultishiftqb, needs VBMI) and runs vdpbf16ps (bf16 x and bf16
// values on a CPU with AVX512-BF16) or fp32 FMAs (every other combination:
// both operands are widened to fp32 exactly).
void pack_sparse24_float(const void* values, DType vdt, const uint8_t* meta, int64_t N, int64_t K,
                         void* packed_values, uint64_t* packed_codes);

// y[M,N] = x[M,K] @ decompress(values, meta)^T (+ bias), fp32 accumulation,
// stored as dt (bf16: round to nearest even). The sum order is unspecified
// (float tolerance, not bitwise). x entries that meet a pruned weight are
// never read into a product, so x must be finite: returns the first row of x
// holding a NaN/Inf (y untouched) or -1 on success.
int64_t sparse24_linear_packed(Isa isa, const void* x, DType dt, int64_t M, int64_t K, const void* packed_values,
                               DType vdt, const uint64_t* packed_codes, const float* bias, int64_t N, void* y,
                               ParallelFor pf);

// True when this CPU has what the AVX-512 sparse gather kernels need
// (AVX512-VBMI on top of kAvx512Vnni), and AVX512-BF16 for vdpbf16ps.
bool has_sparse_gather();
bool has_avx512_bf16();

// ---------------------------------------------------------------- fused attention
// Flash-attention forward (blocked online softmax; the [Sq, Sk] score matrix
// is never materialised, only one 64 x 128 block per thread):
//   out[b,h,i,:] = sum_j softmax_j(q[b,h,i,:] . k[b,g,j,:] * scale + bias[b,h,i,j]) v[b,g,j,:]
// with g = h / (Hq / Hkv) (grouped-query heads share k/v; Hq % Hkv == 0).
// causal: key j is visible to query i iff j <= i + (Sk - Sq) (bottom-right
// aligned). A query with no visible key (or only -inf bias) gives 0.
// q, k, v: dtype dt (all the same), element strides of dims (b, h, s) in
// qs/ks/vs, unit stride along D. bias: additive fp32 mask (a bool mask is
// 0 / -inf) or null, element strides (b, h, i) in bs (0 = broadcast), unit
// stride along keys. out: [B, Hq, Sq, D] contiguous of dt, not aliasing inputs.
// Softmax and accumulation in fp32. bf16 inputs on a CPU with AVX512-BF16 run
// both matmuls on vdpbf16ps (probabilities rounded to bf16 for the second);
// every other case computes in fp32 (AVX-512 FMA, AVX2 or plain C++).
// NaN in q/k/v propagates to the rows it reaches, as in the dense formula,
// except from keys that are masked for the whole job: beyond the causal limit
// of its last row, or in a -inf margin at either end of a key-padding bias
// (bs[2] == 0) are never read.
// Any B, H, S, D >= 1. K and V are re-packed once per call (O(Sk*D) per kv head).
struct AttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  DType dt;
  int64_t B, Hq, Hkv, Sq, Sk, D;
  int64_t qs[3], ks[3], vs[3];
  const float* bias;
  int64_t bs[3];
  bool causal;
  float scale;
  void* out;
};
void attention_fwd(Isa isa, const AttentionArgs& a, ParallelFor pf);
// Name of the kernel attention_fwd runs for (isa, dt), e.g. "avx512_bf16 (vdpbf16ps)".
const char* attention_kernel_name(Isa isa, DType dt);

}}  // namespace pysparse::cpu
