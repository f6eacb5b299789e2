// Flash-attention forward (FlashAttention-2 order) on tensor cores: the CUDA C++ kernel behind
// pysparse::attention. Contract: attention.h. Written for sm_80+ (mma.sync m16n8k16, ldmatrix,
// cp.async); sm_90 runs the same instructions (no wgmma/TMA here).
//
// One CTA computes kBlockM = 64 query rows of one (batch, query head); 4 warps, each owning 16
// rows (one m16 MMA row block) across all kBlockN keys of a tile and all D output columns, so
// the softmax row statistics never leave a warp (a quad of 4 lanes shares a row).
//
// Per key tile j (64 keys):  S = Q K_j^T (HMMA, fp32) -> scale (+ mask) -> online softmax in
// fp32 with ex2 -> P rounded to the input dtype, kept in registers as the A operand ->
// O += P V_j (HMMA, V read with ldmatrix.trans). 1/l is applied once at the end.
//
// Why these tiles:
//  * Shared memory per CTA = (kBlockM + 2 stages x 2 (K, V) x kBlockN) x D x 2 bytes
//    = 40 KB at D = 64 and 80 KB at D = 128. sm_80 gives a CTA at most 163 KB (164 KB per SM),
//    so 2 CTAs (8 warps) fit per SM at D = 128 and 4 at D = 64; sm_90 (227 KB) fits more.
//    kBlockN = 128 would double K/V and leave only one D = 128 CTA per A100 SM.
//  * Registers per thread: O accumulator 16 x D fp32 per warp = D/2 regs (64 at D = 128), S
//    16 x 64 fp32 = 32, plus one Q fragment (4) re-read from shared memory per k16 step (a first
//    version that kept all of Q in registers, D/4 more, spilled). ptxas: 255 regs at D = 128 (250 on
//    sm_90) and 188 at D = 64 (166), no spills, no stack (checked by the gpu_static test). At
//    D = 128 that is 32 K registers per CTA, 2 CTAs per SM: the same as the shared-memory limit.
//    A 128-row CTA (32 rows a warp) would double O and S, past 255 registers at D = 128.
//  * Double-buffered K/V (cp.async, 16 B per instruction, zero-filled past Sk) overlaps the
//    copy of tile j+1 with the MMAs of tile j. Rows of shared memory are D/8 16-byte chunks,
//    chunk c of row r stored at c ^ (r & 7): the 8 rows one ldmatrix reads hit 8 distinct
//    chunk slots, i.e. all 32 banks, so ldmatrix and the cp.async stores are conflict-free.
//  * Tiles entirely above the causal diagonal are never visited; only tiles that cross the
//    diagonal or Sk, or any tile when a mask is given, pay the per-element predicate
//    (key_tiles / key_visible in attention.h).
//  * Instantiations: {fp16, bf16} x D {64, 128} = 4 kernels, ~3.5 s of nvcc per arch, so one
//    file (no per-instantiation split needed for parallel builds).
// Not done: output staged through shared memory for 16-byte stores (each quad writes 16
// contiguous bytes per 8 columns instead), split-KV for decoding (Sq = 1 uses 1/64 of a CTA's
// rows; the Triton path picks a 16-row tile there), skipping fully masked key-padding tiles.
#include "attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace pysparse_attention {
namespace {

constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

// ---- 16-bit element types: packing two fp32 into the A operand of the P V product ----------
template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// d (16x8 fp32) += a (16x16, row) * b (16x8, col)
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte global -> shared copy; src_bytes = 0 writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ float ex2(float x) {  // 2^x on the SFU; ex2(-inf) = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][D] tile (XOR swizzle above).
template <int D>
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return static_cast<uint32_t>((row * (D / 8) + (chunk ^ (row & 7))) * 16);
}

// Copy rows [0, ROWS) of a [rows][D] global tile (row stride `stride` elements) into shared
// memory at `dst`; rows >= valid_rows are zero-filled (`safe` is a readable address used as the
// source of those, which read nothing). In-tile offsets are 32-bit (stride * ROWS < 2^31 is
// checked by attention_unsupported) so the per-thread offsets cost one register each.
template <int ROWS, int D, typename T>
__device__ __forceinline__ void load_tile(uint32_t dst, const T* src, int64_t stride,
                                          int valid_rows, const T* safe, int tid) {
  constexpr int kChunks = D / 8, kRowsPerPass = kThreads / kChunks;
  const int row = tid / kChunks, chunk = tid % kChunks;
  const int stride32 = static_cast<int>(stride);
#pragma unroll
  for (int i = 0; i < ROWS / kRowsPerPass; ++i) {
    const int r = row + i * kRowsPerPass;
    const bool ok = r < valid_rows;
    const T* g = ok ? src + (r * stride32 + chunk * 8) : safe;
    cp_async_16(dst + swz<D>(r, chunk), g, ok ? 16 : 0);
  }
}

// The mask's contribution to the score of key j in a row whose mask row starts at `row`
// (mask_stride_k == 1): 0 or -inf for a keep mask, the bias for an additive one.
template <AttnMaskKind KIND>
__device__ __forceinline__ float mask_term(const void* row, int j) {
  if constexpr (KIND == AttnMaskKind::kKeepBool) {
    return static_cast<const uint8_t*>(row)[j] ? 0.f : -INFINITY;
  } else if constexpr (KIND == AttnMaskKind::kAddF16) {
    return __half2float(static_cast<const __half*>(row)[j]);
  } else if constexpr (KIND == AttnMaskKind::kAddBF16) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(row)[j]);
  } else if constexpr (KIND == AttnMaskKind::kAddF32) {
    return static_cast<const float*>(row)[j];
  } else {
    return 0.f;
  }
}

// The per-element predicate of one S tile (diagonal / Sk-tail / masked tiles): invisible keys
// (key_visible) become -inf, visible ones get the mask term. Rows are row_a and row_a + 8 of
// the thread's fragment, keys key0 + 8 n + 2 quad + {0, 1}; rows >= Sq read no mask.
template <AttnMaskKind KIND, int BN>
__device__ __forceinline__ void mask_tile(float (&s)[BN / 8][4], const void* mask_row_a,
                                          const void* mask_row_b, int row_a, int key0,
                                          const AttentionParams& p) {
#pragma unroll
  for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = row_a + (e >> 1) * 8;
      const int j = key0 + n * 8 + (e & 1);
      if (!key_visible(i, j, p.seq_q, p.seq_k, p.causal)) {
        s[n][e] = -INFINITY;
      } else if (KIND != AttnMaskKind::kNone && i < p.seq_q) {
        s[n][e] += mask_term<KIND>(e < 2 ? mask_row_a : mask_row_b, j);
      }
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttentionParams p) {
  constexpr int BM = kBlockM, BN = kBlockN;
  constexpr int kTileBytes = BN * D * 2;
  static_assert(D % 16 == 0 && BN % 16 == 0 && BM == 16 * kWarps, "tile shape");
  static_assert((BM * D / 8) % kThreads == 0 && (BN * D / 8) % kThreads == 0, "copy split");

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t s_q = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t s_k = s_q + BM * D * 2;     // 2 stages
  const uint32_t s_v = s_k + 2 * kTileBytes;  // 2 stages

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int q_blocks = cdiv(p.seq_q, BM);
  const BlockCoord bc = block_coord(blockIdx.x, q_blocks, p.heads_q);
  const int head_kv = bc.head / (p.heads_q / p.heads_kv);
  const int row0 = bc.q_block * BM;

  const T* q = static_cast<const T*>(p.q) + bc.batch * p.q_stride_b + bc.head * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + bc.batch * p.k_stride_b + head_kv * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + bc.batch * p.v_stride_b + head_kv * p.v_stride_h;
  T* o = static_cast<T*>(p.o) + bc.batch * p.o_stride_b + bc.head * p.o_stride_h;

  const KeyTiles tiles = key_tiles(bc.q_block, p.seq_q, p.seq_k, BM, BN, p.causal);

  // prologue: Q and the first K/V tile in one cp.async group
  const T* q_safe = static_cast<const T*>(p.q);
  load_tile<BM, D>(s_q, q + row0 * p.q_stride_s, p.q_stride_s, p.seq_q - row0, q_safe, tid);
  if (tiles.end > 0) {
    load_tile<BN, D>(s_k, k, p.k_stride_s, p.seq_k, static_cast<const T*>(p.k), tid);
    load_tile<BN, D>(s_v, v, p.v_stride_s, p.seq_k, static_cast<const T*>(p.v), tid);
  }
  cp_async_commit();

  // this thread's fragment rows: g and g + 8 of the warp's 16 rows; columns 2 * (lane % 4) + {0,1}
  const int g = lane / 4, quad = lane % 4;
  const int row_a = row0 + warp * 16 + g;  // row_b = row_a + 8
  const bool has_mask = p.mask_kind != AttnMaskKind::kNone;
  const void* mask_row[2] = {nullptr, nullptr};  // start of rows a, b of the mask (if any)
  if (has_mask) {
    const int elem = p.mask_kind == AttnMaskKind::kAddF32   ? 4
                     : p.mask_kind == AttnMaskKind::kKeepBool ? 1
                                                              : 2;
    const int64_t bh = bc.batch * p.mask_stride_b + bc.head * p.mask_stride_h;
    for (int h = 0; h < 2; ++h) {
      const int i = min(row_a + 8 * h, p.seq_q - 1);  // rows >= Sq read nothing
      mask_row[h] = static_cast<const char*>(p.mask) + (bh + i * p.mask_stride_q) * elem;
    }
  }

  float acc[D / 8][4];  // O, 16 x D per warp: n8 block d holds columns 8d + 2 quad + {0, 1}
#pragma unroll
  for (int d = 0; d < D / 8; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of rows a, b (natural units)
  float row_sum[2] = {0.f, 0.f};              // this thread's partial sums; quad-reduced at end

  for (int t = 0; t < tiles.end; ++t) {
    const int stage = t & 1;
    if (t + 1 < tiles.end) {  // prefetch tile t + 1 into the other stage
      const int key1 = (t + 1) * BN;
      load_tile<BN, D>(s_k + (stage ^ 1) * kTileBytes, k + key1 * p.k_stride_s, p.k_stride_s,
                       p.seq_k - key1, static_cast<const T*>(p.k), tid);
      load_tile<BN, D>(s_v + (stage ^ 1) * kTileBytes, v + key1 * p.v_stride_s, p.v_stride_s,
                       p.seq_k - key1, static_cast<const T*>(p.v), tid);
    }
    cp_async_commit();  // possibly empty: keeps "all but the newest group" = tile t
    cp_async_wait<1>();
    __syncthreads();

    // S = Q K^T: 16 x BN per warp, n8 block n holds keys 8n + 2 quad + {0, 1}
    float s[BN / 8][4];
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    const uint32_t k_tile = s_k + stage * kTileBytes;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      // Q is re-read from shared memory (one ldmatrix per k16 step) rather than kept in
      // registers for the whole loop: D/4 registers fewer, which is what keeps D = 128 unspilled
      uint32_t qf[4];
      ldmatrix_x4(qf, s_q + swz<D>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
      for (int n2 = 0; n2 < BN / 16; ++n2) {
        // matrices: (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15)
        uint32_t b[4];
        ldmatrix_x4(b, k_tile + swz<D>(n2 * 16 + (lane & 7) + ((lane >> 4) << 3),
                                       kk * 2 + ((lane >> 3) & 1)));
        mma16816<T>(s[2 * n2], qf, b[0], b[1]);
        mma16816<T>(s[2 * n2 + 1], qf, b[2], b[3]);
      }
    }

    // scale, then the causal / Sk-tail / mask predicate on the tiles that need it
#pragma unroll
    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] *= p.scale;
    if (has_mask || t >= tiles.first_masked) {
      const int key0 = t * BN + 2 * quad;
      switch (p.mask_kind) {
        case AttnMaskKind::kKeepBool:
          mask_tile<AttnMaskKind::kKeepBool, BN>(s, mask_row[0], mask_row[1], row_a, key0, p);
          break;
        case AttnMaskKind::kAddF16:
          mask_tile<AttnMaskKind::kAddF16, BN>(s, mask_row[0], mask_row[1], row_a, key0, p);
          break;
        case AttnMaskKind::kAddBF16:
          mask_tile<AttnMaskKind::kAddBF16, BN>(s, mask_row[0], mask_row[1], row_a, key0, p);
          break;
        case AttnMaskKind::kAddF32:
          mask_tile<AttnMaskKind::kAddF32, BN>(s, mask_row[0], mask_row[1], row_a, key0, p);
          break;
        default:
          mask_tile<AttnMaskKind::kNone, BN>(s, nullptr, nullptr, row_a, key0, p);
          break;
      }
    }

    // online softmax, rows a (e = 0, 1) and b (e = 2, 3). Scores stay in natural units and are
    // multiplied by log2(e) only after subtracting the max, so an additive finfo.min mask does
    // not overflow to -inf (a row all at finfo.min averages v, as in the reference).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = row_max[h];
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.f : mx;  // nothing seen yet: avoid -inf - -inf
      const float alpha = ex2((row_max[h] - base) * kLog2e);
      row_max[h] = mx;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
        s[n][2 * h] = ex2((s[n][2 * h] - base) * kLog2e);
        s[n][2 * h + 1] = ex2((s[n][2 * h + 1] - base) * kLog2e);
        sum += s[n][2 * h] + s[n][2 * h + 1];
      }
      row_sum[h] = row_sum[h] * alpha + sum;
#pragma unroll
      for (int d = 0; d < D / 8; ++d) {
        acc[d][2 * h] *= alpha;
        acc[d][2 * h + 1] *= alpha;
      }
    }

    // O += P V: P's C fragments of n8 blocks 2kk, 2kk+1 are exactly the A operand of k16 step kk
    const uint32_t v_tile = s_v + stage * kTileBytes;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t a[4] = {Elem<T>::pack(s[2 * kk][0], s[2 * kk][1]),
                             Elem<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                             Elem<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Elem<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int d2 = 0; d2 < D / 16; ++d2) {
        // transposed matrices: (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), ...
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_tile + swz<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                             d2 * 2 + (lane >> 4)));
        mma16816<T>(acc[2 * d2], a, b[0], b[1]);
        mma16816<T>(acc[2 * d2 + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // end == 0: the Q copy is still in flight; never exit with one pending

  // epilogue: O / l; a row that saw no key has l == 0 and gives 0 (a NaN l stays NaN)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = row_sum[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l == 0.f ? 0.f : 1.f / l;
    const int i = row_a + h * 8;
    if (i < p.seq_q) {
      T* out = o + i * p.o_stride_s + 2 * quad;
#pragma unroll
      for (int d = 0; d < D / 8; ++d)
        *reinterpret_cast<uint32_t*>(out + d * 8) =
            Elem<T>::pack(acc[d][2 * h] * inv, acc[d][2 * h + 1] * inv);
    }
  }
}

template <typename T, int D>
cudaError_t launch(const AttentionParams& p, cudaStream_t stream) {
  const int smem = (kBlockM + 4 * kBlockN) * D * 2;
  auto kernel = attention_fwd_kernel<T, D>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const int64_t ctas = num_ctas(p.batch, p.heads_q, p.seq_q, kBlockM);
  kernel<<<static_cast<unsigned>(ctas), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// dtype and head dim become constexpr template arguments (the static-switch habit)
template <typename T>
cudaError_t dispatch_head_dim(const AttentionParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64:
      return launch<T, 64>(p, stream);
    case 128:
      return launch<T, 128>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace pysparse_attention

cudaError_t pysparse_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  using namespace pysparse_attention;
  if (attention_unsupported(p) != nullptr) return cudaErrorInvalidValue;
  if (num_ctas(p.batch, p.heads_q, p.seq_q, kBlockM) == 0) return cudaSuccess;
  switch (p.dtype) {
    case AttnDType::kFloat16:
      return dispatch_head_dim<__half>(p, stream);
    case AttnDType::kBFloat16:
      return dispatch_head_dim<__nv_bfloat16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
