// Output conversion shared by the kernels, and the dtype switch (STYLE 7: flags -> constexpr).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"

namespace pysparse_cuda {

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// The W8A8 epilogue of one int32 sum, in the reference's order without FMA contraction:
// y = (acc * x_scale) * w_scale + bias, rounded once to Out.
template <class Out>
__device__ __forceinline__ void store_int8_result(Out* y, long long ldy, int n, int tok, int v,
                                                  const float* x_scale, const float* w_scale,
                                                  const float* bias) {
  float r = __fmul_rn(__fmul_rn(static_cast<float>(v), x_scale[tok]), w_scale[n]);
  if (bias != nullptr) r = __fadd_rn(r, bias[n]);
  y[tok * ldy + n] = from_float<Out>(r);
}

// DTYPE_SWITCH(dt, T, ...): runs the body with T the C++ type of dt (float / __half / bf16).
#define PYSPARSE_DTYPE_SWITCH(DT, T, ...)                    \
  [&]() -> cudaError_t {                                     \
    switch (DT) {                                            \
      case kF32: { using T = float; return __VA_ARGS__(); }  \
      case kF16: { using T = __half; return __VA_ARGS__(); } \
      case kBF16: { using T = __nv_bfloat16; return __VA_ARGS__(); } \
    }                                                        \
    return cudaErrorInvalidValue;                            \
  }()

}  // namespace pysparse_cuda
