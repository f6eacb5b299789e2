// Standalone test for the pysparse CPU kernels (plain main(), no framework).
//
// NOT part of the library: the extension build compiles csrc/cpu/*.cpp EXCEPT
// files whose name starts with `test_`.
//
// Build & run:   g++ -O2 -std=c++17 csrc/cpu/*.cpp -o /tmp/tk -pthread && /tmp/tk
// Sanitizers:    add -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all
// Valgrind:      valgrind --error-exitcode=99 /tmp/tk --small   (sees no AVX-512:
//                covers ref + avx2; the guard pages below cover AVX-512)
//   /tmp/tk --small      small shapes only (for valgrind)
//   /tmp/tk --bench      timings of int8_linear, then the packed-path table
//                        (median, GOP/s, GB/s, fraction of the measured
//                        peak, ratio to the bandwidth floor; serial and
//                        2 threads); --bench-packed [isa]: only the latter
//   /tmp/tk --print-isa  prints "<active> <detected> |<isa_error>|" (for the env test)
//
// What it checks, for every ISA path the CPU supports (ref, avx2,
// avx512_vnni, and amx, which falls down to avx512_vnni):
//   * quantize_per_token: q and scale bitwise equal to the ref path (fp32 and
//     bf16 input), ref itself against an independent naive implementation;
//   * int8_gemm_s32: int32 exactly equal to a naive int64 GEMM, with xq and
//     w drawn from the full int8 range (-128 included);
//   * int8_linear: y vs the ref path (fp32: rel 1e-5, bf16: <= 1 ulp; bitwise
//     mismatches are counted and reported, expected 0), ref vs naive;
//   * pack_int8_vnni16: every entry (padding included) and colsum against
//     the index formula packed[nb][kg][j][t] = w[nb*16+j][kg*4+t];
//   * int8_linear_packed: y bitwise equal to the ref int8_linear on the
//     canonical weight (fp32 and bf16, with and without bias) on every path,
//     with garbage written into the packing's padding and colsum passed in a
//     buffer of exactly N entries (neither may be read into a result);
//     the bf16/fp32 corner cases; M, K or N <= 0 as no-ops;
//   * int8_peak_gops returns a plausible number on every path;
//   * the first NaN/Inf row index is returned (NaN in the K tail, Inf later),
//     by the packed path too, which then leaves y untouched;
//   * every input/output buffer ends right at a PROT_NONE page, so any read or
//     write past the end crashes (this covers AVX-512 code that valgrind
//     cannot run);
//   * splitting through ParallelFor: serial, many small chunks in reverse and
//     in forward order, and two real threads;
//   * PYSPARSE_CPU_ISA parsing (in child processes).
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>  // baseline on x86-64: the bandwidth probe only
#endif

#include "kernels.h"

using namespace pysparse::cpu;

namespace {

int g_fail = 0;
long g_checks = 0;
long g_bitwise_mismatch = 0;

#define CHECK(cond, ...)                                    \
  do {                                                      \
    ++g_checks;                                             \
    if (!(cond)) {                                          \
      if (++g_fail <= 30) {                                 \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
        std::printf(__VA_ARGS__);                           \
        std::printf("\n");                                  \
      }                                                     \
    }                                                       \
  } while (0)

// Buffer whose last byte is followed by a PROT_NONE page (and one precedes
// the first page): out-of-bounds accesses past the end fault immediately.
class GuardBuf {
 public:
  explicit GuardBuf(size_t bytes) : bytes_(bytes) {
    const size_t pg = size_t(sysconf(_SC_PAGESIZE));
    const size_t data_pages = (bytes + pg - 1) / pg + (bytes == 0);
    total_ = (data_pages + 2) * pg;
    void* p = mmap(nullptr, total_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { std::perror("mmap"); std::exit(2); }
    base_ = static_cast<char*>(p);
    mprotect(base_, pg, PROT_NONE);
    mprotect(base_ + (data_pages + 1) * pg, pg, PROT_NONE);
    data_ = base_ + (data_pages + 1) * pg - bytes;
  }
  ~GuardBuf() { munmap(base_, total_); }
  GuardBuf(const GuardBuf&) = delete;
  GuardBuf& operator=(const GuardBuf&) = delete;
  template <class T> T* as() { return reinterpret_cast<T*>(data_); }
  size_t size() const { return bytes_; }

 private:
  char* base_;
  char* data_;
  size_t total_, bytes_;
};

// ------------------------------------------------------------ ParallelFor variants
void pf_serial(int64_t n, int64_t, void* ctx, RangeFn fn) { fn(ctx, 0, n); }

// Many small chunks, last chunk first (ignores grain on purpose: the kernels
// must be correct for any split).
void pf_chunks(int64_t n, int64_t, void* ctx, RangeFn fn) {
  const int64_t c = 1 + n / 7;
  int64_t starts = (n + c - 1) / c;
  for (int64_t i = starts - 1; i >= 0; --i) fn(ctx, i * c, std::min(n, (i + 1) * c));
}

// Same chunks in forward order (a "last writer wins" bug in the first-bad-row
// reduction shows up with one of the two orders).
void pf_chunks_fwd(int64_t n, int64_t, void* ctx, RangeFn fn) {
  const int64_t c = 1 + n / 7;
  for (int64_t b = 0; b < n; b += c) fn(ctx, b, std::min(n, b + c));
}

// Two real threads, like at::parallel_for on this 2-core box.
void pf_threads(int64_t n, int64_t grain, void* ctx, RangeFn fn) {
  if (n <= grain || n < 2) { fn(ctx, 0, n); return; }
  const int64_t h = n / 2;
  std::thread t([&] { fn(ctx, h, n); });
  fn(ctx, 0, h);
  t.join();
}

const ParallelFor kPfs[] = {pf_serial, pf_chunks, pf_threads, pf_chunks_fwd};
const char* kPfNames[] = {"serial", "chunks", "threads", "chunks_fwd"};
constexpr int kNumPfs = 4;

// ------------------------------------------------------------ helpers
uint32_t fbits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }
float bitsf(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
float bf16_to_f32(uint16_t h) { return bitsf(uint32_t(h) << 16); }
uint16_t f32_to_bf16_rne(float f) {
  uint32_t b = fbits(f);
  if (std::isnan(f)) return uint16_t((b >> 16) | 0x40);
  return uint16_t((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

// Independent naive oracle for quantization (checks ref itself).
void naive_quant(const float* x, int64_t M, int64_t K, int8_t* q, float* s) {
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[m * K + k]));
    s[m] = std::max(amax, 1e-12f) / 127.0f;
    for (int64_t k = 0; k < K; ++k) {
      float v = std::nearbyint(x[m * K + k] / s[m]);
      v = std::min(127.0f, std::max(-127.0f, v));
      q[m * K + k] = int8_t(std::lrint(v));
    }
  }
}

std::vector<Isa> isas_to_test() {
  std::vector<Isa> v;
  for (int i = kRef; i <= detected_isa(); ++i) v.push_back(Isa(i));
  return v;
}

// Fills x [M,K] with rows of different character.
void fill_x(std::mt19937_64& rng, float* x, int64_t M, int64_t K) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_int_distribution<int> kind(0, 7);
  for (int64_t m = 0; m < M; ++m) {
    float* r = x + m * K;
    int t = (m == 0) ? 0 : kind(rng);
    if (M > 2 && m == 1) t = 1;  // always one all-zero row
    switch (t) {
      case 1:  // all zeros -> scale = 1e-12/127, q = 0
        for (int64_t k = 0; k < K; ++k) r[k] = 0.f;
        break;
      case 2:  // amax below the 1e-12 floor
        for (int64_t k = 0; k < K; ++k) r[k] = nd(rng) * 3e-13f;
        break;
      case 3:  // ties: amax = 127 -> scale = 1.0 exactly, values x.5 round to even
        for (int64_t k = 0; k < K; ++k) r[k] = float(int(k % 61) - 30) + 0.5f;
        r[0] = 127.f;
        break;
      case 4:  // huge values
        for (int64_t k = 0; k < K; ++k) r[k] = nd(rng) * 1e30f;
        break;
      case 5:  // denormals mixed with normal values
        for (int64_t k = 0; k < K; ++k) r[k] = (k % 3 == 0) ? nd(rng) * 1e-40f : nd(rng) * 1e-3f;
        break;
      case 6:  // one outlier: most q round to 0 / +-1
        for (int64_t k = 0; k < K; ++k) r[k] = nd(rng);
        r[K / 2] = 500.f;
        break;
      default:
        for (int64_t k = 0; k < K; ++k) r[k] = nd(rng) * (t == 7 ? 10.f : 1.f);
    }
  }
}

struct Stats { long q = 0, g = 0, y = 0, nan = 0, p = 0; };

// Index of w[n][k] in the vnni16 layout, written out independently of the
// library: packed[nb][kg][j][t] with nb = n/16, j = n%16, kg = k/4, t = k%4.
int64_t vnni16_index(int64_t n, int64_t k, int64_t Kp) {
  return (((n / 16) * (Kp / 4) + k / 4) * 16 + n % 16) * 4 + k % 4;
}

void test_shape(std::mt19937_64& rng, int64_t M, int64_t K, int64_t N, int iter, Stats& st) {
  const std::vector<Isa> isas = isas_to_test();
  const ParallelFor pf = kPfs[iter % kNumPfs];

  GuardBuf xf(size_t(M * K) * 4), xb(size_t(M * K) * 2);
  float* x = xf.as<float>();
  uint16_t* xh = xb.as<uint16_t>();
  fill_x(rng, x, M, K);
  for (int64_t i = 0; i < M * K; ++i) xh[i] = f32_to_bf16_rne(x[i]);
  std::vector<float> xh_f(size_t(M * K));
  for (int64_t i = 0; i < M * K; ++i) xh_f[i] = bf16_to_f32(xh[i]);

  GuardBuf wb(size_t(N * K)), wsb(size_t(N) * 4), bb(size_t(N) * 4), xqb(size_t(M * K));
  int8_t* w = wb.as<int8_t>();
  float* ws = wsb.as<float>();
  float* bias = bb.as<float>();
  int8_t* xq = xqb.as<int8_t>();
  std::uniform_int_distribution<int> i8(-128, 127);
  std::uniform_real_distribution<float> ud(1e-3f, 0.1f), ub(-5.f, 5.f);
  for (int64_t i = 0; i < N * K; ++i) w[i] = int8_t(i8(rng));
  for (int64_t i = 0; i < M * K; ++i) xq[i] = int8_t(i8(rng));
  if (K >= 2) { w[0] = -128; xq[0] = -128; }  // extreme corner: (-128)*(-128)
  for (int64_t n = 0; n < N; ++n) { ws[n] = ud(rng); bias[n] = ub(rng); }

  // --- naive oracles
  std::vector<int8_t> q_naive(size_t(M * K)), qh_naive(size_t(M * K));
  std::vector<float> s_naive((size_t)M), sh_naive((size_t)M);
  naive_quant(x, M, K, q_naive.data(), s_naive.data());
  naive_quant(xh_f.data(), M, K, qh_naive.data(), sh_naive.data());
  std::vector<int32_t> acc_naive(size_t(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int64_t a = 0;
      for (int64_t k = 0; k < K; ++k) a += int64_t(xq[m * K + k]) * w[n * K + k];
      acc_naive[size_t(m * N + n)] = int32_t(a);
    }

  GuardBuf qb(size_t(M * K)), sb(size_t(M) * 4), accb(size_t(M * N) * 4);
  GuardBuf yfb(size_t(M * N) * 4), yhb(size_t(M * N) * 2);
  std::vector<float> y_ref(size_t(M * N));
  std::vector<uint16_t> yh_ref(size_t(M * N));
  const float* bias_arg = (iter % 2 == 0) ? bias : nullptr;

  for (Isa isa : isas) {
    const char* nm = isa_name(isa);
    // ---- quantize fp32 / bf16
    for (int d = 0; d < 2; ++d) {
      const DType dt = d ? kBF16 : kF32;
      const std::vector<int8_t>& qn = d ? qh_naive : q_naive;
      const std::vector<float>& sn = d ? sh_naive : s_naive;
      std::memset(qb.as<int8_t>(), 0x55, qb.size());
      int64_t r = quantize_per_token(isa, d ? static_cast<const void*>(xh) : x, dt, M, K, qb.as<int8_t>(),
                                     sb.as<float>(), pf);
      CHECK(r == -1, "quantize %s dt=%d M=%ld K=%ld returned %ld", nm, d, long(M), long(K), long(r));
      long bad = 0;
      for (int64_t i = 0; i < M * K; ++i) bad += qb.as<int8_t>()[i] != qn[size_t(i)];
      for (int64_t m = 0; m < M; ++m) bad += fbits(sb.as<float>()[m]) != fbits(sn[size_t(m)]);
      CHECK(bad == 0, "quantize %s dt=%d M=%ld K=%ld: %ld mismatches", nm, d, long(M), long(K), bad);
      ++st.q;
    }
    // ---- raw int32 GEMM
    std::memset(accb.as<int32_t>(), 0x55, accb.size());
    int8_gemm_s32(isa, xq, M, K, w, N, accb.as<int32_t>(), pf);
    long bad = 0;
    for (int64_t i = 0; i < M * N; ++i) bad += accb.as<int32_t>()[i] != acc_naive[size_t(i)];
    CHECK(bad == 0, "gemm_s32 %s M=%ld K=%ld N=%ld: %ld mismatches", nm, long(M), long(K), long(N), bad);
    ++st.g;
    // ---- fused linear fp32 / bf16
    for (int d = 0; d < 2; ++d) {
      const DType dt = d ? kBF16 : kF32;
      void* y = d ? static_cast<void*>(yhb.as<uint16_t>()) : static_cast<void*>(yfb.as<float>());
      std::memset(y, 0x55, d ? yhb.size() : yfb.size());
      int64_t r = int8_linear(isa, d ? static_cast<const void*>(xh) : x, dt, M, K, w, ws, bias_arg, N, y, pf);
      CHECK(r == -1, "linear %s dt=%d returned %ld", nm, d, long(r));
      if (isa == kRef) {
        // ref against the naive formula built on the naive quantization.
        const std::vector<int8_t>& qn = d ? qh_naive : q_naive;
        const std::vector<float>& sn = d ? sh_naive : s_naive;
        long badn = 0;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            int64_t a = 0;
            for (int64_t k = 0; k < K; ++k) a += int64_t(qn[size_t(m * K + k)]) * w[n * K + k];
            volatile float f = float(int32_t(a)) * sn[size_t(m)];
            f = f * ws[n];
            float yn = bias_arg ? f + bias_arg[n] : float(f);
            const int64_t o = m * N + n;
            if (d) {
              yh_ref[size_t(o)] = yhb.as<uint16_t>()[o];
              badn += yh_ref[size_t(o)] != f32_to_bf16_rne(yn);
            } else {
              y_ref[size_t(o)] = yfb.as<float>()[o];
              badn += fbits(y_ref[size_t(o)]) != fbits(yn);
            }
          }
        CHECK(badn == 0, "linear ref vs naive dt=%d M=%ld K=%ld N=%ld: %ld mismatches", d, long(M), long(K),
              long(N), badn);
      } else {
        long tol_bad = 0, bitwise = 0;
        for (int64_t o = 0; o < M * N; ++o) {
          if (d) {
            const uint16_t a = yhb.as<uint16_t>()[o], b = yh_ref[size_t(o)];
            bitwise += a != b;
            tol_bad += std::abs(int(a) - int(b)) > 1 || ((a ^ b) & 0x8000);
          } else {
            const float a = yfb.as<float>()[o], b = y_ref[size_t(o)];
            bitwise += fbits(a) != fbits(b);
            tol_bad += !(std::fabs(a - b) <= 1e-5f * std::max(std::fabs(b), 1e-30f));
          }
        }
        g_bitwise_mismatch += bitwise;
        CHECK(tol_bad == 0, "linear %s dt=%d M=%ld K=%ld N=%ld bias=%d: %ld outside tolerance", nm, d, long(M),
              long(K), long(N), bias_arg != nullptr, tol_bad);
      }
      ++st.y;
    }
  }

  // ---- packed-weight path. pack_int8_vnni16 is checked entry by entry
  // against the index formula; then the padding is overwritten with garbage
  // (the kernels must never let it reach a result) and colsum is handed over
  // in a buffer of exactly N entries (only [0,N) may be read). Every path
  // must reproduce the ref int8_linear output bitwise.
  const int64_t Kp = (K + 3) / 4 * 4, Np = (N + 15) / 16 * 16;
  GuardBuf pkb(size_t(Np * Kp)), csfb(size_t(Np) * 4), csb(size_t(N) * 4);
  int8_t* pk = pkb.as<int8_t>();
  std::memset(pk, 0x5a, pkb.size());
  pack_int8_vnni16(w, N, K, pk, csfb.as<int32_t>());
  {
    long bad = 0;
    for (int64_t n = 0; n < Np; ++n) {
      int64_t cs = 0;
      for (int64_t k = 0; k < Kp; ++k) {
        const int8_t want = (n < N && k < K) ? w[n * K + k] : int8_t(0);
        bad += pk[vnni16_index(n, k, Kp)] != want;
        cs += want;
      }
      bad += csfb.as<int32_t>()[n] != int32_t(cs);
    }
    CHECK(bad == 0, "pack_int8_vnni16 N=%ld K=%ld: %ld wrong entries", long(N), long(K), bad);
    for (int64_t n = 0; n < Np; ++n)
      for (int64_t k = 0; k < Kp; ++k)
        if (n >= N || k >= K) pk[vnni16_index(n, k, Kp)] = int8_t(i8(rng) | 1);  // nonzero garbage
    std::memcpy(csb.as<int32_t>(), csfb.as<int32_t>(), size_t(N) * 4);
  }
  for (Isa isa : isas)
    for (int d = 0; d < 2; ++d) {
      void* y = d ? static_cast<void*>(yhb.as<uint16_t>()) : static_cast<void*>(yfb.as<float>());
      std::memset(y, 0x55, d ? yhb.size() : yfb.size());
      const int64_t r = int8_linear_packed(isa, d ? static_cast<const void*>(xh) : x, d ? kBF16 : kF32, M, K, pk,
                                           csb.as<int32_t>(), ws, bias_arg, N, y, pf);
      long bitwise = 0;
      for (int64_t o = 0; o < M * N; ++o)
        bitwise += d ? yhb.as<uint16_t>()[o] != yh_ref[size_t(o)] : fbits(yfb.as<float>()[o]) != fbits(y_ref[size_t(o)]);
      CHECK(r == -1 && bitwise == 0, "linear_packed %s dt=%d pf=%s M=%ld K=%ld N=%ld bias=%d: ret %ld, %ld outputs "
            "not bitwise equal to ref int8_linear", isa_name(isa), d, kPfNames[iter % kNumPfs], long(M), long(K),
            long(N), bias_arg != nullptr, long(r), bitwise);
      ++st.p;
    }

  // ---- NaN / Inf detection: NaN in row M/2 (last element: the K tail),
  // Inf in row M-1; the first of them must be reported.
  const int64_t rn = M / 2;
  x[rn * K + K - 1] = NAN;
  xh[rn * K + K - 1] = 0x7fc0;
  if (M - 1 > rn) { x[(M - 1) * K] = -INFINITY; xh[(M - 1) * K] = 0xff80; }
  for (Isa isa : isas)
    for (int d = 0; d < 2; ++d) {
      const void* xin = d ? static_cast<const void*>(xh) : x;
      const DType dt = d ? kBF16 : kF32;
      for (int p = 0; p < kNumPfs; ++p) {
        int64_t r = quantize_per_token(isa, xin, dt, M, K, qb.as<int8_t>(), sb.as<float>(), kPfs[p]);
        CHECK(r == rn, "NaN quantize %s dt=%d pf=%s M=%ld K=%ld: got %ld want %ld", isa_name(isa), d,
              kPfNames[p], long(M), long(K), long(r), long(rn));
        r = int8_linear(isa, xin, dt, M, K, w, ws, bias_arg, N, d ? static_cast<void*>(yhb.as<uint16_t>())
                                                                   : static_cast<void*>(yfb.as<float>()), kPfs[p]);
        CHECK(r == rn, "NaN linear %s dt=%d pf=%s: got %ld want %ld", isa_name(isa), d, kPfNames[p], long(r),
              long(rn));
        // The packed path reports the same row and leaves y untouched.
        void* y = d ? static_cast<void*>(yhb.as<uint16_t>()) : static_cast<void*>(yfb.as<float>());
        const size_t ybytes = d ? yhb.size() : yfb.size();
        std::memset(y, 0x33, ybytes);
        r = int8_linear_packed(isa, xin, dt, M, K, pk, csb.as<int32_t>(), ws, bias_arg, N, y, kPfs[p]);
        long touched = 0;
        for (size_t i = 0; i < ybytes; ++i) touched += static_cast<unsigned char*>(y)[i] != 0x33;
        CHECK(r == rn && touched == 0, "NaN linear_packed %s dt=%d pf=%s: got %ld want %ld, %ld y bytes written",
              isa_name(isa), d, kPfNames[p], long(r), long(rn), touched);
        ++st.nan;
      }
    }
}

// Single Inf (no NaN) in the first row, and Inf-only rows.
void test_inf_only() {
  for (Isa isa : isas_to_test()) {
    for (int64_t K : {1, 5, 16, 17, 70}) {
      std::vector<float> x(size_t(3 * K), 1.0f);
      x[size_t(K + K - 1)] = INFINITY;  // row 1, last element
      std::vector<int8_t> q(size_t(3 * K));
      std::vector<float> s(3);
      int64_t r = quantize_per_token(isa, x.data(), kF32, 3, K, q.data(), s.data(), pf_serial);
      CHECK(r == 1, "Inf %s K=%ld got %ld", isa_name(isa), long(K), long(r));
      x[0] = -NAN;
      r = quantize_per_token(isa, x.data(), kF32, 3, K, q.data(), s.data(), pf_chunks);
      CHECK(r == 0, "NaN row0 %s K=%ld got %ld", isa_name(isa), long(K), long(r));
    }
  }
}

// bf16 output rounding corner cases through the whole linear: ws / bias that
// produce NaN, Inf, huge values and exact ties.
void test_bf16_corners() {
  const int64_t M = 2, K = 3, N = 21;
  // Exact in bf16, so the bf16-input run quantizes exactly like the fp32 one
  // (output dtype follows the input dtype). Row 0: scale 1, q = 127,0,0.
  std::vector<float> x = {127.f, 0.f, 0.f, 1.f, -2.f, 0.5f};
  std::vector<uint16_t> xh;
  for (float v : x) xh.push_back(f32_to_bf16_rne(v));
  std::vector<int8_t> w(size_t(N * K), 0);
  std::vector<float> ws((size_t)N), bias((size_t)N);
  for (int64_t n = 0; n < N; ++n) {
    w[size_t(n * K)] = 1;
    w[size_t(n * K + 1)] = int8_t(n - 10);
    ws[size_t(n)] = bitsf(0x3f800000u + uint32_t(n) * 0x4000u);  // mantissa bits near the rounding point
    bias[size_t(n)] = (n % 3 == 0) ? 0.0f : bitsf(0x00008000u + uint32_t(n));  // denormals
  }
  ws[3] = NAN; ws[4] = INFINITY; ws[5] = -INFINITY; ws[6] = 3.4e38f; ws[7] = -0.0f; bias[8] = NAN;
  std::vector<uint16_t> yr(size_t(M * N)), yi(size_t(M * N));
  std::vector<float> fr(size_t(M * N)), fi(size_t(M * N));
  int64_t r0 = int8_linear(kRef, xh.data(), kBF16, M, K, w.data(), ws.data(), bias.data(), N, yr.data(), pf_serial);
  int8_linear(kRef, x.data(), kF32, M, K, w.data(), ws.data(), bias.data(), N, fr.data(), pf_serial);
  CHECK(r0 == -1, "bf16 corners ref returned %ld", long(r0));
  for (int64_t o = 0; o < M * N; ++o) {
    const uint16_t want = f32_to_bf16_rne(fr[size_t(o)]);
    const bool both_nan = std::isnan(fr[size_t(o)]) && std::isnan(bf16_to_f32(yr[size_t(o)]));
    CHECK(yr[size_t(o)] == want || both_nan, "bf16 corner ref o=%ld %04x vs %04x", long(o), yr[size_t(o)], want);
  }
  for (Isa isa : isas_to_test()) {
    int8_linear(isa, xh.data(), kBF16, M, K, w.data(), ws.data(), bias.data(), N, yi.data(), pf_serial);
    int8_linear(isa, x.data(), kF32, M, K, w.data(), ws.data(), bias.data(), N, fi.data(), pf_serial);
    long bad = 0;
    for (int64_t o = 0; o < M * N; ++o) {
      bad += yi[size_t(o)] != yr[size_t(o)];
      bad += fbits(fi[size_t(o)]) != fbits(fr[size_t(o)]);
    }
    CHECK(bad == 0, "bf16/fp32 corners %s: %ld bitwise mismatches", isa_name(isa), bad);
    // Same corners through the packed path (NaN/Inf/huge scales, denormal bias).
    const int64_t Kp = (K + 3) / 4 * 4, Np = (N + 15) / 16 * 16;
    std::vector<int8_t> pk(size_t(Np * Kp));
    std::vector<int32_t> cs((size_t)Np);
    pack_int8_vnni16(w.data(), N, K, pk.data(), cs.data());
    int8_linear_packed(isa, xh.data(), kBF16, M, K, pk.data(), cs.data(), ws.data(), bias.data(), N, yi.data(),
                       pf_serial);
    int8_linear_packed(isa, x.data(), kF32, M, K, pk.data(), cs.data(), ws.data(), bias.data(), N, fi.data(),
                       pf_chunks);
    bad = 0;
    for (int64_t o = 0; o < M * N; ++o) {
      bad += yi[size_t(o)] != yr[size_t(o)];
      bad += fbits(fi[size_t(o)]) != fbits(fr[size_t(o)]);
    }
    CHECK(bad == 0, "bf16/fp32 corners packed %s: %ld bitwise mismatches", isa_name(isa), bad);
  }
}

// The peak measurement runs and returns something plausible on every path.
void test_peak() {
  for (Isa isa : isas_to_test()) {
    const double g = int8_peak_gops(isa, 0.01);
    CHECK(g > 0.1 && g < 1e5, "int8_peak_gops(%s) = %g", isa_name(isa), g);
  }
}

// Sizes <= 0 are no-ops for the new entry points too.
void test_empty() {
  float x = 1.f, ws = 1.f, y = 7.f;
  int8_t w = 1, pk[64] = {0};
  int32_t cs[16] = {0};
  for (Isa isa : isas_to_test()) {
    CHECK(int8_linear_packed(isa, &x, kF32, 0, 1, pk, cs, &ws, nullptr, 1, &y, pf_serial) == -1 && y == 7.f,
          "packed M=0 %s", isa_name(isa));
    CHECK(int8_linear_packed(isa, &x, kF32, 1, 1, pk, cs, &ws, nullptr, 0, &y, pf_serial) == -1 && y == 7.f,
          "packed N=0 %s", isa_name(isa));
  }
  pk[0] = 9;
  pack_int8_vnni16(&w, 0, 1, pk, cs);
  pack_int8_vnni16(&w, 1, 0, pk, cs);
  CHECK(pk[0] == 9, "pack with N or K = 0 wrote");
}

Isa isa_from_name(const std::string& n) {
  for (int i = kRef; i <= kAmx; ++i)
    if (n == isa_name(Isa(i))) return Isa(i);
  return Isa(-1);
}

// Runs this binary with PYSPARSE_CPU_ISA set; the child prints
// "<active> <detected> |<isa_error>|". The expectation uses the child's own
// detected ISA (under valgrind the child runs natively and sees more ISAs).
void test_env_cap(const char* self) {
  struct Case { const char* val; Isa req; bool err; };
  const Case cases[] = {{"ref", kRef, false},
                        {"avx2", kAvx2, false},
                        {" AVX512_VNNI", kAvx512Vnni, false},
                        {"amx", kAmx, false},
                        {"bogus", kAmx, true}};  // unknown: no cap
  for (const Case& c : cases) {
    std::string cmd = std::string("PYSPARSE_CPU_ISA='") + c.val + "' '" + self + "' --print-isa";
    FILE* p = popen(cmd.c_str(), "r");
    char buf[512] = {0};
    size_t n = p ? std::fread(buf, 1, sizeof buf - 1, p) : 0;
    if (p) pclose(p);
    const std::string out(buf, n);
    char a[64] = {0}, d[64] = {0};
    std::sscanf(out.c_str(), "%63s %63s", a, d);
    const Isa active = isa_from_name(a), det = isa_from_name(d);
    const Isa want = c.req < det ? c.req : det;
    const size_t b = out.find('|'), e = out.rfind('|');
    const std::string err = (b != std::string::npos && e > b) ? out.substr(b + 1, e - b - 1) : "?";
    // An AMX permission refusal may also appear in isa_error; only "bogus"
    // must mention the variable.
    const bool has_env_err = err.find("PYSPARSE_CPU_ISA") != std::string::npos;
    CHECK(det >= kRef && active == want && has_env_err == c.err,
          "env '%s': child printed '%s', want active=%s env_err=%d", c.val, out.c_str(), isa_name(want), c.err);
  }
}

// ------------------------------------------------------------ bench
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void bench() {
  std::mt19937_64 rng(7);
  std::printf("detected=%s active=%s\n", isa_name(detected_isa()), isa_name(active_isa()));
  struct S { int64_t M, K, N; } shapes[] = {{1, 384, 384}, {128, 384, 384}, {1, 4096, 4096}, {128, 4096, 4096}};
  for (Isa isa : isas_to_test()) {
    if (isa == kAmx) continue;  // falls down to avx512_vnni
    for (int p = 0; p < 3; p += 2) {
      for (const S& s : shapes) {
        if (isa == kRef && s.K * s.N * s.M > 1e8) continue;
        std::vector<float> x(size_t(s.M * s.K)), y(size_t(s.M * s.N)), ws(size_t(s.N), 0.01f), b(size_t(s.N), 0.f);
        std::vector<int8_t> w(size_t(s.N * s.K));
        fill_x(rng, x.data(), s.M, s.K);
        for (auto& v : w) v = int8_t(rng());
        const double macs = double(s.M) * s.K * s.N;
        int reps = int(std::max(3.0, std::min(2000.0, 3e9 / (macs * (isa == kRef ? 20 : 1) + 1e5))));
        std::vector<double> t;
        for (int i = 0; i < reps + 1; ++i) {
          const double t0 = now_s();
          int8_linear(isa, x.data(), kF32, s.M, s.K, w.data(), ws.data(), b.data(), s.N, y.data(), kPfs[p]);
          if (i) t.push_back(now_s() - t0);  // first call = warm-up
        }
        std::sort(t.begin(), t.end());
        const double med = t[t.size() / 2], best = t[0];
        std::printf("%-12s pf=%-7s int8_linear fp32 M=%-4ld K=%-5ld N=%-5ld  median %9.1f us  min %9.1f us  "
                    "(%6.1f GOPS at median)\n",
                    isa_name(isa), kPfNames[p], long(s.M), long(s.K), long(s.N), med * 1e6, best * 1e6,
                    2 * macs / med * 1e-9);
      }
    }
  }
}

// Streaming read of a 256 MiB buffer (far beyond the caches) with `threads`
// threads, each summing its contiguous part with 16-byte loads and 4
// independent partial sums (SSE2: baseline x86-64, enough to saturate DRAM;
// a plain scalar loop measured ~30% less here). Best of 7 runs in GB/s: the
// floor the small-M (weight-streaming) GEMM is judged by is the best the
// memory system delivers, not a noisy median.
void sum_range(const char* buf, size_t b, size_t e, uint64_t* out) {
#if defined(__SSE2__)
  __m128i s0 = _mm_setzero_si128(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t i = b; i + 64 <= e; i += 64) {
    s0 = _mm_add_epi64(s0, _mm_load_si128(reinterpret_cast<const __m128i*>(buf + i)));
    s1 = _mm_add_epi64(s1, _mm_load_si128(reinterpret_cast<const __m128i*>(buf + i + 16)));
    s2 = _mm_add_epi64(s2, _mm_load_si128(reinterpret_cast<const __m128i*>(buf + i + 32)));
    s3 = _mm_add_epi64(s3, _mm_load_si128(reinterpret_cast<const __m128i*>(buf + i + 48)));
  }
  const __m128i s = _mm_add_epi64(_mm_add_epi64(s0, s1), _mm_add_epi64(s2, s3));
  *out = uint64_t(_mm_cvtsi128_si64(s)) + uint64_t(_mm_cvtsi128_si64(_mm_unpackhi_epi64(s, s)));
#else
  uint64_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (size_t i = b; i + 64 <= e; i += 64)
    for (int j = 0; j < 8; ++j) {
      uint64_t v;
      std::memcpy(&v, buf + i + 8 * j, 8);
      s[j] += v;
    }
  *out = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
#endif
}

double measure_bw(int threads) {
  const size_t bytes = size_t(256) << 20;
  void* mem = nullptr;
  if (posix_memalign(&mem, 4096, bytes) != 0) return 0;
  char* buf = static_cast<char*>(mem);
  std::memset(buf, 1, bytes);  // touch every page first
  double best = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    std::vector<uint64_t> out(static_cast<size_t>(threads));
    std::vector<std::thread> th;
    const double t0 = now_s();
    for (int i = 1; i < threads; ++i)
      th.emplace_back(sum_range, buf, bytes * size_t(i) / size_t(threads), bytes * size_t(i + 1) / size_t(threads),
                      &out[size_t(i)]);
    sum_range(buf, 0, bytes / size_t(threads), &out[0]);
    for (auto& x : th) x.join();
    best = std::min(best, now_s() - t0);
    volatile uint64_t sink = out[0];
    (void)sink;
  }
  std::free(mem);
  return double(bytes) / best * 1e-9;
}

// A persistent 2-thread ParallelFor for the bench, like the thread pool
// behind at::parallel_for: pf_threads spawns a std::thread per call (fine
// for tests, but ~60-80 us here, which would swamp the small shapes). The
// worker spins briefly for the next job (as OpenMP workers do) and then
// blocks on a condition variable, so serial runs are not disturbed.
class Pool {
 public:
  Pool() : worker_([this] { loop(); }) {}
  ~Pool() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_one();
    worker_.join();
  }
  void run(int64_t n, int64_t grain, void* ctx, RangeFn fn) {
    if (n <= grain || n < 2) { fn(ctx, 0, n); return; }
    const int64_t h = n / 2;
    {
      std::lock_guard<std::mutex> l(mu_);
      fn_ = fn; ctx_ = ctx; b_ = h; e_ = n;
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_one();
    fn(ctx, 0, h);
    const uint64_t g = gen_.load();
    while (done_.load(std::memory_order_acquire) != g) std::this_thread::yield();
  }

 private:
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      uint64_t g = gen_.load(std::memory_order_acquire);
      for (int spin = 0; g == seen && spin < 20000; ++spin) {
        std::this_thread::yield();
        g = gen_.load(std::memory_order_acquire);
      }
      if (g == seen) {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return gen_.load() != seen; });
        g = gen_.load();
      }
      seen = g;
      RangeFn fn;
      void* ctx;
      int64_t b, e;
      {
        std::lock_guard<std::mutex> l(mu_);
        if (stop_) return;
        fn = fn_; ctx = ctx_; b = b_; e = e_;
      }
      fn(ctx, b, e);
      done_.store(g, std::memory_order_release);
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0}, done_{0};
  bool stop_ = false;
  RangeFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t b_ = 0, e_ = 0;
  std::thread worker_;  // last: starts after the members above exist
};

Pool* g_pool = nullptr;
void pf_pool(int64_t n, int64_t grain, void* ctx, RangeFn fn) { g_pool->run(n, grain, ctx, fn); }

// Packed-path table: for each shape the median time, GOP/s, GB/s (weight +
// x + y bytes), the fraction of the measured int8 peak (x thread count) and
// the ratio of the median to the bandwidth floor (bytes / measured
// bandwidth; 1.00 = streaming at full memory speed). The weight is rotated
// over enough packed copies (>= 96 MiB together) that consecutive calls do
// not find it in the 32 MiB L3: these are cold-weight numbers, as in a model
// whose layers take turns. "canon" is int8_linear on the canonical weight.
void bench_packed(const char* only_isa) {
  std::mt19937_64 rng(11);
  Pool pool;
  g_pool = &pool;
  const double bw1 = measure_bw(1), bw2 = measure_bw(2);
  std::printf("\nstreaming read 256 MiB (best of 7): 1 thread %.1f GB/s, 2 threads %.1f GB/s\n", bw1, bw2);
  const int64_t Ms[] = {1, 8, 32, 128, 512};
  const int64_t KNs[][2] = {{384, 384}, {384, 1536}, {1536, 384}, {4096, 4096}, {4096, 11008}, {11008, 4096}};
  for (Isa isa : isas_to_test()) {
    if (isa == kRef || isa == kAmx) continue;
    if (only_isa && std::strcmp(only_isa, isa_name(isa)) != 0) continue;
    const double peak = int8_peak_gops(isa, 0.5);
    std::printf("\n%s: measured int8 peak %.1f GOP/s per thread\n", isa_name(isa), peak);
    const ParallelFor bpf[2] = {pf_serial, pf_pool};
    const char* bpf_name[2] = {"serial", "2thr"};
    for (int p = 0; p < 2; ++p) {
      const int nth = p + 1;
      const double bw = nth == 2 ? bw2 : bw1;
      std::printf("%-11s %-7s %5s %6s %6s %11s %11s %8s %7s %6s %8s\n", "isa", "pf", "M", "K", "N", "median_us",
                  "canon_us", "GOP/s", "GB/s", "%peak", "x_floor");
      for (const auto& kn : KNs)
        for (int64_t M : Ms) {
          const int64_t K = kn[0], N = kn[1], Kp = (K + 3) / 4 * 4, Np = (N + 15) / 16 * 16;
          const double wbytes = double(Np * Kp);
          const int copies = int(std::max(1.0, std::min(8.0, std::ceil(96.0 * (1 << 20) / wbytes))));
          std::vector<float> x(size_t(M * K)), y(size_t(M * N)), ws(size_t(N), 0.01f), b(size_t(N), 0.f);
          fill_x(rng, x.data(), M, K);
          std::vector<std::vector<int8_t>> w(static_cast<size_t>(copies)), pk(static_cast<size_t>(copies));
          std::vector<std::vector<int32_t>> cs(static_cast<size_t>(copies));
          for (int c = 0; c < copies; ++c) {
            w[size_t(c)].resize(size_t(N * K));
            for (auto& v : w[size_t(c)]) v = int8_t(rng());
            pk[size_t(c)].resize(size_t(Np * Kp));
            cs[size_t(c)].resize(size_t(Np));
            pack_int8_vnni16(w[size_t(c)].data(), N, K, pk[size_t(c)].data(), cs[size_t(c)].data());
          }
          const double macs = double(M) * K * N;
          auto time_it = [&](bool packed) {
            std::vector<double> t;
            double spent = 0;
            for (int i = 0; i < 400 && (i < 6 || spent < 0.25); ++i) {
              const int c = i % copies;
              const double t0 = now_s();
              if (packed)
                int8_linear_packed(isa, x.data(), kF32, M, K, pk[size_t(c)].data(), cs[size_t(c)].data(), ws.data(),
                                   b.data(), N, y.data(), bpf[p]);
              else
                int8_linear(isa, x.data(), kF32, M, K, w[size_t(c)].data(), ws.data(), b.data(), N, y.data(), bpf[p]);
              const double dt = now_s() - t0;
              if (i) t.push_back(dt);  // first call = warm-up
              spent += dt;
            }
            std::sort(t.begin(), t.end());
            return t[t.size() / 2];
          };
          const double med = time_it(true), canon = time_it(false);
          const double bytes = wbytes + double(M * K) * 4 + double(M * N) * 4;
          const double gops = 2 * macs / med * 1e-9;
          std::printf("%-11s %-7s %5ld %6ld %6ld %11.1f %11.1f %8.1f %7.1f %5.1f%% %8.2f\n", isa_name(isa),
                      bpf_name[p], long(M), long(K), long(N), med * 1e6, canon * 1e6, gops, bytes / med * 1e-9,
                      100 * gops / (peak * nth), med / (bytes / (bw * 1e9)));
          std::fflush(stdout);
        }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool small = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--print-isa")) {
      std::printf("%s %s |%s|\n", isa_name(active_isa()), isa_name(detected_isa()), isa_error().c_str());
      return 0;
    }
    if (!std::strcmp(argv[i], "--bench")) { bench(); bench_packed(nullptr); return 0; }
    if (!std::strcmp(argv[i], "--bench-packed")) { bench_packed(i + 1 < argc ? argv[i + 1] : nullptr); return 0; }
    if (!std::strcmp(argv[i], "--small")) small = true;
  }
  std::printf("cpu_features: %s\ndetected=%s active=%s isa_error='%s'\n", cpu_features().c_str(),
              isa_name(detected_isa()), isa_name(active_isa()), isa_error().c_str());
  std::printf("testing paths:");
  for (Isa i : isas_to_test()) std::printf(" %s", isa_name(i));
  std::printf("\n");

  std::vector<int64_t> Ms = {1, 2, 3, 13, 31, 32, 33, 67, 128, 300}, Ks = {1, 3, 4, 17, 64, 100, 384, 1536},
                       Ns = {1, 5, 16, 17, 33, 48, 384};
  if (small) { Ms = {1, 2, 3, 5, 9}; Ks = {1, 3, 17, 64, 100}; Ns = {1, 5, 16, 17, 33, 48}; }
  std::mt19937_64 rng(12345);
  Stats st;
  int iter = 0, shapes = 0;
  for (int64_t M : Ms)
    for (int64_t K : Ks)
      for (int64_t N : Ns) {
        test_shape(rng, M, K, N, iter++, st);
        ++shapes;
      }
  test_inf_only();
  test_bf16_corners();
  test_peak();
  test_empty();
  char self[4096] = {0};
  if (!small && readlink("/proc/self/exe", self, sizeof self - 1) > 0) test_env_cap(self);

  std::printf("shapes=%d quant_cases=%ld gemm_cases=%ld linear_cases=%ld packed_cases=%ld nan_cases=%ld checks=%ld\n",
              shapes, st.q, st.g, st.y, st.p, st.nan, g_checks);
  std::printf("linear outputs not bitwise equal to ref (within tolerance): %ld\n", g_bitwise_mismatch);
  if (g_fail) {
    std::printf("FAILED: %d check(s)\n", g_fail);
    return 1;
  }
  std::printf("ALL OK\n");
  return 0;
}
