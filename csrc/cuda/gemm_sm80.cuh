// Shared pieces of the sm_80+ tensor-core GEMMs: cp.async / ldmatrix wrappers and the
// multi-stage main loop all three kernels (int8 IMMA, 2:4 f16/bf16 mma.sp, 2:4 int8 mma.sp) run.
//
// Problem: Y^T = W . X^T. The weight W [N, K] is the A operand (rows = output features), the
// activations X [M, K] (row-major, one token per row) are the "col" B operand, so small batches
// (M = 1..32) fill one n8-wide MMA per 8 tokens and the CTA streams weight bytes, which is what
// bounds decoding. CTA tile: 64 weight rows (4 warps x 16 rows, one m16 MMA row each) x 32 tokens
// (4 n8 MMAs per warp) x one k-stage (64 bytes of every weight row: 2 MMA k-steps).
//
// Pipeline: STAGES-deep cp.async ring (Ampere LDGSTS, 16-byte transfers, zero-fill for the K
// tail, tokens >= M and rows >= N), one __syncthreads per k-stage. Shared rows are padded by 16
// bytes (80 / 144-byte strides) so the 8 row addresses of every ldmatrix phase hit 8 distinct
// 16-byte bank groups (no conflicts) without an XOR swizzle.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace pysparse_cuda {

constexpr int kRows = 64;     // weight rows per CTA
constexpr int kTokens = 32;   // tokens per CTA
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kStages = 4;
constexpr int kWBytes = 64;   // bytes of each weight row per k-stage

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// Geometry of one main loop. XBytes: bytes of each token row per k-stage (128 for the 2:4
// kernels, whose k-stage covers twice the weight's compressed width; 64 for dense int8).
// MetaWords: metadata words per 16-row tile per MMA k-step (0 dense, 16 f16, 32 int8).
template <int XBytes, int MetaWords>
struct Smem {
  static constexpr int kWStride = kWBytes + 16;
  static constexpr int kXStride = XBytes + 16;
  static constexpr int kMetaBytes = kWarps * 2 * MetaWords * 4;
  static constexpr int kStageBytes = kRows * kWStride + kTokens * kXStride + kMetaBytes;
  static constexpr int kBytes = kStages * kStageBytes;
  static_assert(kBytes <= 48 * 1024, "static shared memory limit");
  alignas(16) uint8_t buf[kBytes];

  __device__ uint8_t* w(int s) { return buf + s * kStageBytes; }
  __device__ uint8_t* x(int s) { return w(s) + kRows * kWStride; }
  __device__ uint32_t* meta(int s) {
    return reinterpret_cast<uint32_t*>(x(s) + kTokens * kXStride);
  }
};

struct GemmArgs {
  const uint8_t* w;        // weight rows (values), 16-byte aligned
  long long ldw;           // bytes between weight rows (multiple of 16)
  int w_row_bytes;         // bytes of one weight row (multiple of 16)
  const uint8_t* x;        // activation rows, 16-byte aligned
  long long ldx;           // bytes between token rows (multiple of 16)
  int x_row_bytes;         // bytes of one token row (multiple of 16)
  const uint32_t* meta;    // mma.sp metadata words [NT, KT, MetaWords] (2:4 kernels)
  int meta_kt;             // KT
  int N, M;
};

// Issue the cp.async copies of k-stage `kt` into ring slot `s`.
template <int XBytes, int MetaWords>
__device__ __forceinline__ void load_stage(Smem<XBytes, MetaWords>& sm, int s, int kt,
                                           const GemmArgs& a, int n0, int t0) {
  using S = Smem<XBytes, MetaWords>;
  const int tid = threadIdx.x;
  // weight: 64 rows x 4 chunks of 16 bytes = 256 chunks, 2 per thread
#pragma unroll
  for (int i = 0; i < kRows * (kWBytes / 16) / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c / (kWBytes / 16), col = (c % (kWBytes / 16)) * 16;
    const int kb = kt * kWBytes + col;
    const bool ok = (n0 + row < a.N) && (kb < a.w_row_bytes);
    const uint8_t* src = ok ? a.w + (long long)(n0 + row) * a.ldw + kb : a.w;
    cp_async16(sm.w(s) + row * S::kWStride + col, src, ok);
  }
  // activations: 32 tokens x XBytes/16 chunks
#pragma unroll
  for (int i = 0; i < kTokens * (XBytes / 16) / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c / (XBytes / 16), col = (c % (XBytes / 16)) * 16;
    const int kb = kt * XBytes + col;
    const bool ok = (t0 + row < a.M) && (kb < a.x_row_bytes);
    const uint8_t* src = ok ? a.x + (long long)(t0 + row) * a.ldx + kb : a.x;
    cp_async16(sm.x(s) + row * S::kXStride + col, src, ok);
  }
  if constexpr (MetaWords > 0) {
    // per 16-row tile: 2 k-steps x MetaWords words, contiguous in global (padded: always valid)
    constexpr int kChunksPerTile = 2 * MetaWords * 4 / 16;
    for (int c = tid; c < kWarps * kChunksPerTile; c += kThreads) {
      const int tile = c / kChunksPerTile, part = c % kChunksPerTile;
      const long long word =
          ((long long)(n0 / 16 + tile) * a.meta_kt + 2 * kt) * MetaWords + part * 4;
      cp_async16(sm.meta(s) + tile * 2 * MetaWords + part * 4, a.meta + word, true);
    }
  }
}

// The multi-stage main loop. Mma::step(sm, slot, ks, warp, lane, acc) runs one MMA k-step.
template <class Mma, int XBytes, int MetaWords, class Acc>
__device__ __forceinline__ void mainloop(Smem<XBytes, MetaWords>& sm, const GemmArgs& a,
                                         int n0, int t0, Acc (&acc)[4][4]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nk = (a.w_row_bytes + kWBytes - 1) / kWBytes;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nk) load_stage(sm, s, s, a, n0, t0);
    cp_async_commit();
  }
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed for every thread; slot (kt-1) % kStages is free
    const int pre = kt + kStages - 1;
    if (pre < nk) load_stage(sm, pre % kStages, pre, a, n0, t0);
    cp_async_commit();
    const int slot = kt % kStages;
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) Mma::step(sm, slot, ks, warp, lane, acc);
  }
  cp_async_wait<0>();
}

// A fragment of one m16 x (32 bytes) k-step from the weight slot: ldmatrix.x4 of the four
// 8x16-byte blocks (rows 0-7 | 8-15) x (bytes 0-15 | 16-31) gives, in PTX register order,
// a0 (row g), a1 (row g+8), a2 (row g, upper 16 bytes), a3 (row g+8, upper) -- the dense
// m16n8k16 f16 / m16n8k32 s8 A layout and, on compressed values, the sparse m16n8k32 f16 /
// m16n8k64 s8 A layout.
template <class S>
__device__ __forceinline__ void load_a(uint32_t (&r)[4], S& sm, int slot, int ks, int warp,
                                       int lane) {
  const uint8_t* p = sm.w(slot) + (warp * 16 + (lane % 16)) * S::kWStride + ks * 32 +
                     (lane / 16) * 16;
  ldmatrix_x4(r, p);
}

// B fragment of one n8 x (64 bytes) k-step (2:4 kernels): four 8x16-byte blocks along K.
template <class S>
__device__ __forceinline__ void load_b64(uint32_t (&r)[4], S& sm, int slot, int ks, int j,
                                         int lane) {
  const uint8_t* p = sm.x(slot) + (8 * j + (lane % 8)) * S::kXStride + ks * 64 + (lane / 8) * 16;
  ldmatrix_x4(r, p);
}

// The metadata word a lane passes to mma.sp: f16 (selector 0): lanes 4g+j, j in {0,1}, read word
// 2g+j (lanes with j in {2,3} are not read by the hardware; they load a harmless duplicate);
// int8: lane l reads word l. Layout: pysparse/formats/sparse24.py, pack_cuda_meta.
template <int MetaWords>
__device__ __forceinline__ int meta_word(int lane) {
  return MetaWords == 16 ? 2 * (lane >> 2) + (lane & 1) : lane;
}

// Apply `store(n, token, acc)` to every accumulator a warp holds (C fragment: c0/c1 row g,
// columns 2t, 2t+1; c2/c3 row g+8), guarding n < N and token < M.
template <class Acc, class Store>
__device__ __forceinline__ void epilogue(Acc (&acc)[4][4], int n0, int t0, int N, int M,
                                         Store store) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int n = n0 + warp * 16 + g + (e >= 2 ? 8 : 0);
      const int tok = t0 + 8 * j + 2 * t + (e & 1);
      if (n < N && tok < M) store(n, tok, acc[j][e]);
    }
  }
}

}  // namespace pysparse_cuda
