// Launchers of the CUDA kernels (plain C++: no torch). Each returns the launch's cudaError_t, or
// cudaErrorInvalidValue when the arguments break the contract below (the torch binding checks
// first, so this is the second line of defence).
//
// Problem shape: x [M, K] (one token per row), weight [N, K], y [M, N]; y row stride ldy (in
// elements). Pointers 16-byte aligned, activation row strides multiples of 16 bytes.
// Alignment the kernels need (no padding in the weights): int8 GEMM K % 16 == 0; 2:4 f16/bf16
// K % 16 == 0; 2:4 int8 K % 32 == 0. Any M >= 1, N >= 1.
// Layouts: values are the canonical 2:4 `values` [N, K/2] (row-major, contiguous); meta is the
// mma.sp word layout of pysparse/formats/sparse24.py `pack_cuda_meta` (kind "f16" / "int8").
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace pysparse_cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Per-token symmetric int8 quantization (the reference's quantize_per_token): scale[m] =
// max(amax_m, 1e-12) / 127, q = clamp(rint(x / scale), -127, 127); q is [M, K] contiguous.
// A row holding NaN/Inf gets scale NaN (the caller raises).
cudaError_t quantize_per_token(const void* x, DType x_dtype, long long ldx, int M, int K,
                               int8_t* q, float* scale, cudaStream_t stream);

// y = (xq . w^T as exact int32) * x_scale[m] * w_scale[n] + bias[n] in fp32, cast to y_dtype.
// xq [M, K] contiguous int8, w [N, K] contiguous int8; bias may be null.
cudaError_t int8_gemm(const int8_t* xq, const float* x_scale, const int8_t* w,
                      const float* w_scale, const float* bias, int M, int N, int K, void* y,
                      DType y_dtype, long long ldy, cudaStream_t stream);

// y = x . decompress(values, meta)^T + bias (fp32 accumulate), x/values/y all `dtype`
// (kF16 or kBF16); x row stride ldx elements; meta from pack_cuda_meta(kind="f16").
cudaError_t sparse24_gemm(const void* x, long long ldx, const void* values,
                          const uint32_t* meta, const float* bias, int M, int N, int K,
                          DType dtype, void* y, long long ldy, cudaStream_t stream);

// As int8_gemm with the 2:4 int8 weight (values [N, K/2] int8, meta kind "int8").
cudaError_t sparse24_int8_gemm(const int8_t* xq, const float* x_scale, const int8_t* values,
                               const uint32_t* meta, const float* w_scale, const float* bias,
                               int M, int N, int K, void* y, DType y_dtype, long long ldy,
                               cudaStream_t stream);

}  // namespace pysparse_cuda
