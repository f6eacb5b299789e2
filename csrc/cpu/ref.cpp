// Scalar reference path: the last-resort fallback and the C++ oracle the SIMD
// paths are tested against. Deliberately no `#pragma GCC target`: this file is
// compiled for baseline x86-64 (or any other CPU) so it runs everywhere.
//
// Rounding: division and nearbyint use the current FP environment; torch
// never leaves it anything but round-to-nearest-even, which is what the SIMD
// paths hard-code (_MM_FROUND_TO_NEAREST_INT), so the paths agree bitwise.
#include <cmath>
#include <cstring>

#include "impl.h"

namespace pysparse { namespace cpu { namespace detail {

namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t b = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline float load_f32(const void* x, DType dt, int64_t i) {
  if (dt == kBF16) return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
  return static_cast<const float*>(x)[i];
}

// Round-to-nearest-even fp32 -> bf16; NaN is kept a NaN (quieted) instead of
// being rounded into Inf or a different payload class.
inline uint16_t f32_to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40u);
  return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// Hides v from the optimizer so `opaque(a*b) + c` is never contracted into an
// FMA (GCC contracts by default even with -std=c++17, and would if this file
// were ever built with FMA enabled); the contract fixes the rounding order.
inline float opaque(float v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(v));
#elif defined(__GNUC__)
  __asm__("" : "+r"(v));
#endif
  return v;
}

// The W8A8 epilogue for one output, shared by both ref GEMMs so the rounding
// sequence of the contract is written exactly once.
inline void store_y(int32_t v, float xs, float ws, const float* bias, DType dt, void* y, int64_t o) {
  float f = static_cast<float>(v) * xs;
  f = f * ws;
  if (bias) f = opaque(f) + *bias;
  if (dt == kBF16)
    static_cast<uint16_t*>(y)[o] = f32_to_bf16(f);
  else
    static_cast<float*>(y)[o] = f;
}

}  // namespace

int64_t quantize_rows_ref(const void* x, DType dt, int64_t K, int64_t m0, int64_t m1,
                          int8_t* q, float* scale, int32_t* rowsum) {
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t base = m * K;
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float v = load_f32(x, dt, base + k);
      if (!std::isfinite(v)) return m;
      const float a = std::fabs(v);
      if (a > amax) amax = a;
    }
    const float s = (amax > 1e-12f ? amax : 1e-12f) / 127.0f;
    scale[m] = s;
    uint32_t sum = 0;  // unsigned: wraps instead of UB (cannot overflow for K < 2^24 anyway)
    for (int64_t k = 0; k < K; ++k) {
      float r = std::nearbyint(load_f32(x, dt, base + k) / s);
      if (r > 127.0f) r = 127.0f;
      if (r < -127.0f) r = -127.0f;
      const int8_t qi = static_cast<int8_t>(static_cast<int>(r));
      q[base + k] = qi;
      sum += static_cast<uint32_t>(static_cast<int32_t>(qi));
    }
    if (rowsum) rowsum[m] = static_cast<int32_t>(sum);
  }
  return -1;
}

void gemm_block_ref(const GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K = a.K, N = a.N;
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xr = a.xq + m * K;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wr = a.w + n * K;
      uint32_t acc = 0;  // wrapping int32 arithmetic, same as the SIMD paths
      for (int64_t k = 0; k < K; ++k)
        acc += static_cast<uint32_t>(int32_t(xr[k]) * int32_t(wr[k]));
      const int32_t v = static_cast<int32_t>(acc);
      const int64_t o = m * N + n;
      if (a.acc) {
        a.acc[o] = v;
        continue;
      }
      store_y(v, a.xs[m], a.ws[n], a.bias ? a.bias + n : nullptr, a.dt, a.y, o);
    }
  }
}

// The oracle for the packed path: reads w through the vnni16 index formula
// (packed[nb][kg][j][t] = w[nb*16+j][kg*4+t]) and multiplies the signed q
// directly, so it depends on neither colsum nor the padding, and checks the
// u8/colsum correction of the SIMD paths instead of repeating it.
void gemm_packed_block_ref(const PackedArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K = a.K, N = a.N, Kp = a.Kp;
  const int8_t* q = static_cast<const int8_t*>(a.a);
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xr = q + m * K;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* col = a.wp + (n / 16 - a.panel0) * 16 * Kp + (n % 16) * 4;
      uint32_t acc = 0;  // wrapping int32 arithmetic, same as the SIMD paths
      for (int64_t k = 0; k < K; ++k)
        acc += static_cast<uint32_t>(int32_t(xr[k]) * int32_t(col[(k / 4) * 64 + (k % 4)]));
      store_y(static_cast<int32_t>(acc), a.xs[m], a.ws[n], a.bias ? a.bias + n : nullptr, a.dt, a.y, m * N + n);
    }
  }
}

// ---------------------------------------------------------------- 2:4 sparse oracles
// Both read the packed layouts through their index formulas (kernels.h) and
// compute the plain sums: int8 exactly (wrapping int32, signed q, no colsum),
// float in fp32 in k order. They are what the SIMD paths are tested against.

// Position of column j's code byte within a block's 16 sp24i8 code bytes.
static int i8_code_pos(int j) {
  const int q = j / 2, e = j % 2;
  return (q % 2) * 8 + (q / 2) * 2 + e;
}

int64_t sparse24_i8_scratch_bytes(int64_t Kp) { return 3 * (Kp / 8) * 64 + 64; }
int64_t sparse24_f_scratch_bytes(int64_t K) { return 3 * (K / 4) * 64 + 64; }

void sparse24_i8_block_ref(const Sparse24I8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K = a.K, N = a.N, KB = a.Kp / 8;
  const int8_t* q = static_cast<const int8_t*>(a.a);  // int8 [M][K]
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xr = q + m * K;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t nb = n / 16;
      const int j = int(n % 16);
      uint32_t acc = 0;
      for (int64_t b = 0; b < KB; ++b) {
        const int8_t* v = a.sv + (nb * KB + b) * 64 + j * 4;
        const unsigned code = a.sc[(nb * KB + b) * 16 + i8_code_pos(j)];
        for (int t = 0; t < 4; ++t) {
          const int64_t k = 8 * b + (t / 2) * 4 + ((code >> (2 * t)) & 3u);
          if (k < K) acc += static_cast<uint32_t>(int32_t(xr[k]) * int32_t(v[t]));
        }
      }
      store_y(static_cast<int32_t>(acc), a.xs[m], a.ws[n], a.bias ? a.bias + n : nullptr, a.dt, a.y, m * N + n);
    }
  }
}

void sparse24_f_block_ref(const Sparse24FArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K = a.K, N = a.N, G = K / 4;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t nb = n / 16;
      const int j = int(n % 16);
      float acc = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t line = (nb * G + g) * 32;
        const unsigned code = unsigned(a.sc[nb * G + g] >> (4 * j)) & 0xFu;
        for (int t = 0; t < 2; ++t) {
          const float w = a.vdt == kBF16 ? bf16_to_f32(static_cast<const uint16_t*>(a.sv)[line + j * 2 + t])
                                         : static_cast<const float*>(a.sv)[line + j * 2 + t];
          acc += load_f32(a.x, a.dt, m * K + 4 * g + ((code >> (2 * t)) & 3u)) * w;
        }
      }
      if (a.bias) acc += a.bias[n];
      if (a.dt == kBF16)
        static_cast<uint16_t*>(a.y)[m * N + n] = f32_to_bf16(acc);
      else
        static_cast<float*>(a.y)[m * N + n] = acc;
    }
  }
}

int64_t peak_loop_ref(int64_t iters) {
  // 8 independent scalar multiply-add chains. The empty asm statements make
  // the multiplicands opaque every iteration, so the compiler can neither
  // hoist the products out of the loop nor vectorize it: this measures the
  // scalar path, which is what the ref kernels run.
  uint32_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  uint32_t x[8] = {3, 4, 5, 6, 7, 8, 9, 10};
  const uint32_t w = 5;
  for (int64_t i = 0; i < iters; ++i) {
    for (int j = 0; j < 8; ++j) {
      __asm__("" : "+r"(x[j]));
      acc[j] += x[j] * w;
    }
  }
  uint32_t s = 0;
  for (int j = 0; j < 8; ++j) s += acc[j];
  __asm__ volatile("" : : "r"(s));  // keep the result alive
  return iters * 8;
}

namespace {
#include "attention_generic.inc"
}  // namespace

void attn_rows_ref(const AttnJob& j) { attn_rows_generic(j); }

}}}  // namespace pysparse::cpu::detail
