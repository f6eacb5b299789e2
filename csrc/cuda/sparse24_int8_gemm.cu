// 2:4 sparse W8A8 GEMM on sparse integer tensor cores:
// mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.s8.s32 (SASS IMMA.SP), exact
// int32 accumulate, fp32 scale/bias epilogue (as int8_gemm). Activations come quantized per
// token (quantize_per_token in int8_gemm.cu). Weight: canonical values [N, K/2] int8 + metadata
// from formats.sparse24.pack_cuda_meta(kind="int8"). One k-stage = 128 dense columns (64 bytes
// of compressed weight row, 128 bytes of token row, 2 mma.sp k-steps). Needs K % 32 == 0.
#include "epilogue.cuh"
#include "gemm_sm80.cuh"

namespace pysparse_cuda {
namespace {

using SpI8Smem = Smem<128, 32>;

__device__ __forceinline__ void imma_sp(int (&d)[4], const uint32_t (&a)[4],
                                        const uint32_t (&b)[4], uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.s8.s32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
        "r"(e));
}

struct SpI8Mma {
  __device__ __forceinline__ static void step(SpI8Smem& sm, int slot, int ks, int warp, int lane,
                                              int (&acc)[4][4]) {
    uint32_t a[4];
    load_a(a, sm, slot, ks, warp, lane);
    const uint32_t e = sm.meta(slot)[(warp * 2 + ks) * 32 + meta_word<32>(lane)];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t b[4];
      load_b64(b, sm, slot, ks, j, lane);
      imma_sp(acc[j], a, b, e);
    }
  }
};

template <class Out>
__global__ void __launch_bounds__(kThreads)
    sparse24_int8_gemm_kernel(GemmArgs args, const float* __restrict__ x_scale,
                              const float* __restrict__ w_scale, const float* __restrict__ bias,
                              Out* __restrict__ y, long long ldy) {
  __shared__ SpI8Smem sm;
  const int n0 = blockIdx.x * kRows, t0 = blockIdx.y * kTokens;
  int acc[4][4] = {};
  mainloop<SpI8Mma>(sm, args, n0, t0, acc);
  epilogue(acc, n0, t0, args.N, args.M, [&](int n, int tok, int v) {
    store_int8_result(y, ldy, n, tok, v, x_scale, w_scale, bias);
  });
}

}  // namespace

cudaError_t sparse24_int8_gemm(const int8_t* xq, const float* x_scale, const int8_t* values,
                               const uint32_t* meta, const float* w_scale, const float* bias,
                               int M, int N, int K, void* y, DType y_dtype, long long ldy,
                               cudaStream_t stream) {
  if (M < 0 || N < 1 || K < 32 || K % 32 ||
      (reinterpret_cast<uintptr_t>(xq) | reinterpret_cast<uintptr_t>(values)) % 16)
    return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const int kt = 2 * ((K + 127) / 128);
  GemmArgs a{reinterpret_cast<const uint8_t*>(values), K / 2, K / 2,
             reinterpret_cast<const uint8_t*>(xq), K, K, meta, kt, N, M};
  const dim3 grid((N + kRows - 1) / kRows, (M + kTokens - 1) / kTokens);
  return PYSPARSE_DTYPE_SWITCH(y_dtype, Out, [&] {
    sparse24_int8_gemm_kernel<Out><<<grid, kThreads, 0, stream>>>(a, x_scale, w_scale, bias,
                                                                  static_cast<Out*>(y), ldy);
    return cudaGetLastError();
  });
}

}  // namespace pysparse_cuda
