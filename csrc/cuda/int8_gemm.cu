// W8A8: per-token activation quantization + int8 GEMM on IMMA
// (mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32), fp32 scale/bias epilogue.
// Tiles and pipeline: gemm_sm80.cuh (64 weight rows x 32 tokens x 64 bytes of K per stage,
// 4-stage cp.async ring, ldmatrix fragments). Needs K % 16 == 0 (16-byte rows); the K tail of
// the last stage is zero-filled by the predicated copies.
#include "epilogue.cuh"
#include "gemm_sm80.cuh"

namespace pysparse_cuda {
namespace {

using Int8Smem = Smem<kWBytes, 0>;

__device__ __forceinline__ void imma(int (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                     uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct Int8Mma {
  __device__ __forceinline__ static void step(Int8Smem& sm, int slot, int ks, int warp, int lane,
                                              int (&acc)[4][4]) {
    uint32_t a[4];
    load_a(a, sm, slot, ks, warp, lane);
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      // two n8 tiles at once: blocks (tile 2jj, k 0-15), (2jj, 16-31), (2jj+1, 0-15), (2jj+1, 16-31)
      uint32_t b[4];
      const uint8_t* p = sm.x(slot) + (8 * (2 * jj + lane / 16) + lane % 8) * Int8Smem::kXStride +
                         ks * 32 + ((lane / 8) % 2) * 16;
      ldmatrix_x4(b, p);
      imma(acc[2 * jj], a, b[0], b[1]);
      imma(acc[2 * jj + 1], a, b[2], b[3]);
    }
  }
};

template <class Out>
__global__ void __launch_bounds__(kThreads)
    int8_gemm_kernel(GemmArgs args, const float* __restrict__ x_scale,
                     const float* __restrict__ w_scale, const float* __restrict__ bias,
                     Out* __restrict__ y, long long ldy) {
  __shared__ Int8Smem sm;
  const int n0 = blockIdx.x * kRows, t0 = blockIdx.y * kTokens;
  int acc[4][4] = {};
  mainloop<Int8Mma>(sm, args, n0, t0, acc);
  epilogue(acc, n0, t0, args.N, args.M, [&](int n, int tok, int v) {
    store_int8_result(y, ldy, n, tok, v, x_scale, w_scale, bias);
  });
}

template <class T>
__global__ void __launch_bounds__(256)
    quantize_kernel(const T* __restrict__ x, long long ldx, int M, int K, int8_t* __restrict__ q,
                    float* __restrict__ scale) {
  // one warp per token row: amax by warp shuffle, then x / scale rounded half-to-even
  const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= M) return;
  const T* xr = x + row * ldx;
  float amax = 0.f;
  bool bad = false;
  for (int k = lane; k < K; k += 32) {
    const float v = fabsf(to_float(xr[k]));
    bad |= !isfinite(v);
    amax = fmaxf(amax, v);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    bad |= __shfl_xor_sync(0xffffffffu, static_cast<int>(bad), o) != 0;
  }
  const float s = __fdiv_rn(fmaxf(amax, 1e-12f), 127.f);
  int8_t* qr = q + static_cast<long long>(row) * K;
  for (int k = lane; k < K; k += 32) {
    const float v = fminf(fmaxf(rintf(__fdiv_rn(to_float(xr[k]), s)), -127.f), 127.f);
    qr[k] = static_cast<int8_t>(v);
  }
  if (lane == 0) scale[row] = bad ? __int_as_float(0x7fc00000) : s;
}

}  // namespace

cudaError_t quantize_per_token(const void* x, DType x_dtype, long long ldx, int M, int K,
                               int8_t* q, float* scale, cudaStream_t stream) {
  if (M < 0 || K < 1) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  return PYSPARSE_DTYPE_SWITCH(x_dtype, T, [&] {
    quantize_kernel<T><<<(M + 7) / 8, 256, 0, stream>>>(static_cast<const T*>(x), ldx, M, K, q,
                                                         scale);
    return cudaGetLastError();
  });
}

cudaError_t int8_gemm(const int8_t* xq, const float* x_scale, const int8_t* w,
                      const float* w_scale, const float* bias, int M, int N, int K, void* y,
                      DType y_dtype, long long ldy, cudaStream_t stream) {
  if (M < 0 || N < 1 || K < 16 || K % 16 || (reinterpret_cast<uintptr_t>(xq) |
                                               reinterpret_cast<uintptr_t>(w)) % 16)
    return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  GemmArgs a{reinterpret_cast<const uint8_t*>(w), K, K, reinterpret_cast<const uint8_t*>(xq), K,
             K, nullptr, 0, N, M};
  const dim3 grid((N + kRows - 1) / kRows, (M + kTokens - 1) / kTokens);
  return PYSPARSE_DTYPE_SWITCH(y_dtype, Out, [&] {
    int8_gemm_kernel<Out><<<grid, kThreads, 0, stream>>>(a, x_scale, w_scale, bias,
                                                         static_cast<Out*>(y), ldy);
    return cudaGetLastError();
  });
}

}  // namespace pysparse_cuda
