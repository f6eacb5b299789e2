// 2:4 sparse f16/bf16 GEMM on sparse tensor cores:
// mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{f16,bf16}.{f16,bf16}.f32
// (SASS HMMA.SP), fp32 accumulate, bias epilogue. The weight streams in its canonical compressed
// form (values [N, K/2], half the bytes of the dense weight) plus 1/8 as much metadata, re-packed
// by formats.sparse24.pack_cuda_meta(kind="f16") into one 32-bit word per lane and k-step.
// Tiles and pipeline: gemm_sm80.cuh; one k-stage = 64 dense columns (64 bytes of compressed
// weight row, 128 bytes of token row, 2 mma.sp k-steps). Needs K % 16 == 0.
// ::ordered_metadata (PTX 8.5+, sm_80+): with plain `mma.sp` nvcc 13's ptxas prints, for
// sm_80, sm_90a and sm_100a alike, "Advisory: Modifier '.sp::ordered_metadata' should be used
// ... substantially reduced performance on some future architectures". It requires i0 < i1 in
// every chunk, which the canonical codes (and the 0b0100 padding) always satisfy.
#include <type_traits>

#include "epilogue.cuh"
#include "gemm_sm80.cuh"

namespace pysparse_cuda {
namespace {

using SpSmem = Smem<128, 16>;

template <class T>
__device__ __forceinline__ void hmma_sp(float (&d)[4], const uint32_t (&a)[4],
                                        const uint32_t (&b)[4], uint32_t e) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
          "r"(b[3]), "r"(e));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
          "r"(b[3]), "r"(e));
  }
}

template <class T>
struct SpMma {
  __device__ __forceinline__ static void step(SpSmem& sm, int slot, int ks, int warp, int lane,
                                              float (&acc)[4][4]) {
    uint32_t a[4];
    load_a(a, sm, slot, ks, warp, lane);
    const uint32_t e = sm.meta(slot)[(warp * 2 + ks) * 16 + meta_word<16>(lane)];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t b[4];
      load_b64(b, sm, slot, ks, j, lane);
      hmma_sp<T>(acc[j], a, b, e);
    }
  }
};

template <class T>
__global__ void __launch_bounds__(kThreads)
    sparse24_gemm_kernel(GemmArgs args, const float* __restrict__ bias, T* __restrict__ y,
                         long long ldy) {
  __shared__ SpSmem sm;
  const int n0 = blockIdx.x * kRows, t0 = blockIdx.y * kTokens;
  float acc[4][4] = {};
  mainloop<SpMma<T>>(sm, args, n0, t0, acc);
  epilogue(acc, n0, t0, args.N, args.M, [&](int n, int tok, float v) {
    if (bias != nullptr) v += bias[n];
    y[tok * ldy + n] = from_float<T>(v);
  });
}

}  // namespace

cudaError_t sparse24_gemm(const void* x, long long ldx, const void* values,
                          const uint32_t* meta, const float* bias, int M, int N, int K,
                          DType dtype, void* y, long long ldy, cudaStream_t stream) {
  if (M < 0 || N < 1 || K < 16 || K % 16 || ldx % 8 ||
      (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(values)) % 16 ||
      (dtype != kF16 && dtype != kBF16))
    return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const int kt = 2 * ((K + 63) / 64);
  GemmArgs a{static_cast<const uint8_t*>(values), K, K, static_cast<const uint8_t*>(x),
             2 * ldx, 2 * K, meta, kt, N, M};
  const dim3 grid((N + kRows - 1) / kRows, (M + kTokens - 1) / kTokens);
  if (dtype == kF16) {
    sparse24_gemm_kernel<__half><<<grid, kThreads, 0, stream>>>(a, bias, static_cast<__half*>(y),
                                                                ldy);
  } else {
    sparse24_gemm_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
        a, bias, static_cast<__nv_bfloat16*>(y), ldy);
  }
  return cudaGetLastError();
}

}  // namespace pysparse_cuda
