// Run-time ISA detection, the PYSPARSE_CPU_ISA cap, and the public entry
// points of kernels.h. No `#pragma GCC target`: this file is baseline x86-64
// and must run on any CPU; it only calls into a per-ISA file after checking
// (cpuid + XCR0) that the CPU and OS support that ISA.
//
// Work splitting is done here, once for all ISAs: the per-ISA files only
// implement "quantize rows [m0,m1)" and "GEMM output block [m0,m1)x[n0,n1)",
// and each RangeFn call handed to ParallelFor owns disjoint rows / blocks.
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "impl.h"
#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#define PYSPARSE_X86 1
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pysparse { namespace cpu {

namespace {

struct CpuInfo {
  Isa detected = kRef;
  std::string features;
  std::string amx_error;  // why AMX hardware is present but unusable
};

#if PYSPARSE_X86
inline bool bit(unsigned v, int b) { return (v >> b) & 1u; }

uint64_t read_xcr0() {
  uint32_t eax, edx;
  // Raw opcode is not needed: every assembler that builds this knows xgetbv.
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}
#endif

CpuInfo probe() {
  CpuInfo ci;
#if PYSPARSE_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return ci;
  const unsigned max_leaf = a;
  unsigned c1 = 0, b7 = 0, c7 = 0, d7 = 0, a71 = 0;
  if (__get_cpuid(1, &a, &b, &c, &d)) c1 = c;
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    b7 = b; c7 = c; d7 = d;
    const unsigned sub_max = a;
    if (sub_max >= 1) {
      __cpuid_count(7, 1, a, b, c, d);
      a71 = a;
    }
  }
  const bool osxsave = bit(c1, 27);
  const uint64_t xcr0 = osxsave ? read_xcr0() : 0;
  // XCR0: 1 SSE, 2 AVX (YMM upper); 5 opmask, 6 ZMM_Hi256, 7 Hi16_ZMM; 17 XTILECFG, 18 XTILEDATA.
  const bool os_ymm = (xcr0 & 0x6) == 0x6;
  const bool os_zmm = os_ymm && (xcr0 & 0xE0) == 0xE0;
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;

  const bool fma = bit(c1, 12), f16c = bit(c1, 29), avx = bit(c1, 28);
  const bool avx2 = bit(b7, 5), avx512f = bit(b7, 16), avx512dq = bit(b7, 17);
  const bool avx512bw = bit(b7, 30), avx512vl = bit(b7, 31);
  const bool vnni = bit(c7, 11), vbmi2 = bit(c7, 6), bf16 = bit(a71, 5);
  const bool amx_bf16 = bit(d7, 22), amx_tile = bit(d7, 24), amx_int8 = bit(d7, 25);

  struct { bool on; const char* name; } flags[] = {
      {avx, "avx"}, {avx2, "avx2"}, {fma, "fma"}, {f16c, "f16c"},
      {avx512f, "avx512f"}, {avx512dq, "avx512dq"}, {avx512bw, "avx512bw"}, {avx512vl, "avx512vl"},
      {vnni, "avx512_vnni"}, {bf16, "avx512_bf16"}, {vbmi2, "avx512_vbmi2"},
      {amx_tile, "amx_tile"}, {amx_int8, "amx_int8"}, {amx_bf16, "amx_bf16"}};
  for (const auto& f : flags) {
    if (!f.on) continue;
    if (!ci.features.empty()) ci.features += ' ';
    ci.features += f.name;
  }
  // CPU flags whose register state the OS does not enable are unusable.
  if (avx2 && !os_ymm) ci.features += " (os:no_ymm_state)";
  if (avx512f && !os_zmm) ci.features += " (os:no_zmm_state)";
  if (amx_tile && !os_amx) ci.features += " (os:no_amx_state)";

  if (avx && avx2 && fma && f16c && os_ymm) ci.detected = kAvx2;
  if (ci.detected == kAvx2 && avx512f && avx512bw && avx512vl && avx512dq && vnni && os_zmm)
    ci.detected = kAvx512Vnni;
  if (ci.detected == kAvx512Vnni && amx_tile && amx_int8) {
    if (!os_amx) {
      ci.amx_error = "AMX present but the OS does not enable tile state (XCR0 bits 17/18)";
    } else {
#if defined(__linux__) && defined(SYS_arch_prctl)
      // Linux hands out the 8 KiB tile-data state only on request, once per
      // process (ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18).
      if (syscall(SYS_arch_prctl, 0x1023, 18) == 0)
        ci.detected = kAmx;
      else
        ci.amx_error = std::string("AMX permission refused: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) failed: ") +
                       std::strerror(errno);
#else
      ci.amx_error = "AMX present but no way to request tile permission on this OS";
#endif
    }
  }
#endif
  return ci;
}

const CpuInfo& cpu_info() {
  static const CpuInfo ci = probe();  // thread-safe static init (C++11)
  return ci;
}

struct Cap {
  Isa active;
  std::string error;
};

Cap compute_cap() {
  Cap cap{detected_isa(), cpu_info().amx_error};
  const char* env = std::getenv("PYSPARSE_CPU_ISA");
  if (env && *env) {
    std::string v;
    for (const char* p = env; *p; ++p)
      if (!std::isspace(static_cast<unsigned char>(*p))) v += char(std::tolower(static_cast<unsigned char>(*p)));
    int req = -1;
    for (int i = kRef; i <= kAmx; ++i)
      if (v == isa_name(Isa(i))) req = i;
    if (req < 0) {
      if (!cap.error.empty()) cap.error += "; ";
      cap.error += std::string("PYSPARSE_CPU_ISA='") + env +
                   "' not understood (expected ref|avx2|avx512_vnni|amx); not capping, using " +
                   isa_name(cap.active);
    } else if (req < cap.active) {
      cap.active = Isa(req);
    }
  }
  return cap;
}

const Cap& cap_info() {
  static const Cap c = compute_cap();
  return c;
}

// The path that really runs: never above what the CPU supports (so a wrong
// caller cannot trigger SIGILL), and AMX (not implemented yet) -> VNNI.
Isa effective(Isa isa) {
  const Isa d = detected_isa();
  if (isa > d) isa = d;
  if (isa < kRef) isa = kRef;
  if (isa == kAmx) isa = kAvx512Vnni;
  return isa;
}

void run_pf(ParallelFor pf, int64_t n, int64_t grain, void* ctx, RangeFn fn) {
  if (n <= 0) return;
  if (pf) pf(n, grain < 1 ? 1 : grain, ctx, fn);
  else fn(ctx, 0, n);
}

// ---------------------------------------------------------------- quantize
struct QuantCtx {
  Isa isa;
  const void* x;
  DType dt;
  int64_t K;
  int8_t* q;
  float* scale;
  int32_t* rowsum;
  std::atomic<int64_t> bad{INT64_MAX};  // smallest bad row over all chunks
};

void quant_range(void* p, int64_t b, int64_t e) {
  auto* c = static_cast<QuantCtx*>(p);
  int64_t r;
  switch (c->isa) {
    case kAvx512Vnni: case kAmx:
      r = detail::quantize_rows_avx512_vnni(c->x, c->dt, c->K, b, e, c->q, c->scale, c->rowsum); break;
    case kAvx2:
      r = detail::quantize_rows_avx2(c->x, c->dt, c->K, b, e, c->q, c->scale, c->rowsum); break;
    default:
      r = detail::quantize_rows_ref(c->x, c->dt, c->K, b, e, c->q, c->scale, c->rowsum); break;
  }
  if (r < 0) return;
  // Each chunk reports the first bad row of its own range; keep the global min.
  int64_t cur = c->bad.load(std::memory_order_relaxed);
  while (r < cur && !c->bad.compare_exchange_weak(cur, r, std::memory_order_relaxed)) {}
}

int64_t quantize_impl(Isa isa, const void* x, DType dt, int64_t M, int64_t K, int8_t* q, float* scale,
                      int32_t* rowsum, ParallelFor pf) {
  QuantCtx c;
  c.isa = isa; c.x = x; c.dt = dt; c.K = K; c.q = q; c.scale = scale; c.rowsum = rowsum;
  // ~16K elements per chunk: large enough to amortize a task, small enough
  // to spread a big activation over the threads.
  const int64_t grain = (16384 + K - 1) / K;
  run_pf(pf, M, grain, &c, quant_range);
  const int64_t bad = c.bad.load();
  return bad == INT64_MAX ? -1 : bad;
}

// ---------------------------------------------------------------- row sums
struct RowSumCtx {
  const int8_t* xq;
  int64_t K;
  int32_t* rowsum;
};

void rowsum_range(void* p, int64_t b, int64_t e) {
  auto* c = static_cast<RowSumCtx*>(p);
  detail::row_sums_avx512_vnni(c->xq, c->K, b, e, c->rowsum);
}

// ---------------------------------------------------------------- GEMM
struct GemmCtx {
  Isa isa;
  detail::GemmArgs a;
  int64_t mc, nc, tiles_m;
};

void gemm_range(void* p, int64_t b, int64_t e) {
  const auto* c = static_cast<const GemmCtx*>(p);
  for (int64_t t = b; t < e; ++t) {
    // n-major task order: consecutive tasks (usually the same thread) share
    // one w panel, so w is streamed from memory about once overall.
    const int64_t ni = t / c->tiles_m, mi = t % c->tiles_m;
    const int64_t m0 = mi * c->mc, m1 = m0 + c->mc < c->a.M ? m0 + c->mc : c->a.M;
    const int64_t n0 = ni * c->nc, n1 = n0 + c->nc < c->a.N ? n0 + c->nc : c->a.N;
    switch (c->isa) {
      case kAvx512Vnni: case kAmx: detail::gemm_block_avx512_vnni(c->a, m0, m1, n0, n1); break;
      case kAvx2: detail::gemm_block_avx2(c->a, m0, m1, n0, n1); break;
      default: detail::gemm_block_ref(c->a, m0, m1, n0, n1); break;
    }
  }
}

void gemm_impl(Isa isa, const detail::GemmArgs& a, ParallelFor pf) {
  GemmCtx c;
  c.isa = isa;
  c.a = a;
  // Output blocks of 64 columns (a multiple of every path's 8/16-column
  // panel) by mc rows, with mc*K bytes of x (re-read once per 16-column
  // panel) kept around 256 KiB so it stays in L2; mc is a multiple of 4 (the
  // row tile), at least 4 and at most 256.
  c.nc = 64;
  int64_t mc = (int64_t(256) << 10) / a.K;
  mc = mc < 4 ? 4 : (mc > 256 ? 256 : mc);
  mc &= ~int64_t(3);
  const int64_t tiles_n = (a.N + c.nc - 1) / c.nc;
  // Few column blocks (small N): cut rows finer so all threads get work.
  while (tiles_n * ((a.M + mc - 1) / mc) < 16 && mc > 16) mc = (mc / 2) & ~int64_t(3);
  c.mc = mc < a.M ? mc : a.M;
  c.tiles_m = (a.M + c.mc - 1) / c.mc;
  const int64_t tasks = tiles_n * c.tiles_m;
  // Grain: tasks below ~256K MACs in total are not worth a thread hand-off.
  const int64_t task_macs = c.mc * c.nc * a.K;
  const int64_t grain = (int64_t(1) << 18) / (task_macs > 0 ? task_macs : 1) + 1;
  run_pf(pf, tasks, grain, &c, gemm_range);
}

// ---------------------------------------------------------------- packed path
// 64-byte aligned scratch (activation rows are read as 4/8-byte broadcasts;
// the alignment only keeps a row start from splitting a cache line).
struct AlignedBuf {
  std::unique_ptr<unsigned char[]> raw;
  void* p = nullptr;
  explicit AlignedBuf(size_t bytes) : raw(new unsigned char[bytes + 64]) {
    const uintptr_t u = reinterpret_cast<uintptr_t>(raw.get());
    p = raw.get() + ((64 - (u & 63)) & 63);
  }
};

struct PackedQuantCtx {
  Isa isa;
  const void* x;
  DType dt;
  int64_t K, Kp;
  void* out;
  float* scale;
  std::atomic<int64_t> bad{INT64_MAX};
};

void packed_quant_range(void* p, int64_t b, int64_t e) {
  auto* c = static_cast<PackedQuantCtx*>(p);
  int64_t r;
  switch (c->isa) {
    case kAvx512Vnni: case kAmx:
      r = detail::quantize_rows_u8_avx512_vnni(c->x, c->dt, c->K, c->Kp, b, e, static_cast<uint8_t*>(c->out),
                                               c->scale);
      break;
    case kAvx2:
      r = detail::quantize_rows_s16_avx2(c->x, c->dt, c->K, c->Kp, b, e, static_cast<int16_t*>(c->out), c->scale);
      break;
    default:
      r = detail::quantize_rows_ref(c->x, c->dt, c->K, b, e, static_cast<int8_t*>(c->out), c->scale, nullptr);
      break;
  }
  if (r < 0) return;
  int64_t cur = c->bad.load(std::memory_order_relaxed);
  while (r < cur && !c->bad.compare_exchange_weak(cur, r, std::memory_order_relaxed)) {}
}

struct PackedCtx {
  Isa isa;
  detail::PackedArgs a;
  int64_t mc, nc, tiles_m;
};

void packed_range(void* p, int64_t b, int64_t e) {
  const auto* c = static_cast<const PackedCtx*>(p);
  for (int64_t t = b; t < e; ++t) {
    // n-major task order: the tasks of one ParallelFor chunk share column
    // blocks, so each thread streams its part of w from memory once.
    const int64_t ni = t / c->tiles_m, mi = t % c->tiles_m;
    const int64_t m0 = mi * c->mc, m1 = m0 + c->mc < c->a.M ? m0 + c->mc : c->a.M;
    const int64_t n0 = ni * c->nc, n1 = n0 + c->nc < c->a.N ? n0 + c->nc : c->a.N;
    switch (c->isa) {
      case kAvx512Vnni: case kAmx: detail::gemm_packed_block_avx512_vnni(c->a, m0, m1, n0, n1); break;
      case kAvx2: detail::gemm_packed_block_avx2(c->a, m0, m1, n0, n1); break;
      default: detail::gemm_packed_block_ref(c->a, m0, m1, n0, n1); break;
    }
  }
}

void packed_gemm_impl(Isa isa, const detail::PackedArgs& a, ParallelFor pf) {
  PackedCtx c;
  c.isa = isa;
  c.a = a;
  // Column blocks are multiples of 48 = the VNNI micro-kernel width (3
  // panels), so no chunk boundary leaves a narrower block behind (16, the
  // AVX2 width, divides it too); row blocks are multiples of 8 (its height).
  // Small M (decode, short queries): one row block holding all of M and
  // 48-column tasks, so each weight byte is read from memory exactly once
  // and the threads split the weight between them; the block functions keep
  // a 48-column w block cache-resident while they sweep the rows over it.
  // Large M: tiles of mc rows x nc columns sized so that the x rows (mc*Kp)
  // and the w columns (nc*Kp) of one tile fit in L2 together; consecutive
  // tasks share the column block, which then also stays in L2.
  const int64_t abytes = isa == kAvx2 ? 2 : 1;
  int64_t mc = a.M, nc = 48;
  if (a.M > 32) {
    mc = (int64_t(256) << 10) / (a.Kp * abytes);
    mc = mc < 32 ? 32 : (mc > 256 ? 256 : mc);
    mc &= ~int64_t(7);
    if (mc > a.M) mc = a.M;
    nc = (int64_t(256) << 10) / a.Kp / 48 * 48;
    nc = nc < 48 ? 48 : (nc > 480 ? 480 : nc);
  }
  // At least 8 tasks where the shape allows, so that every thread gets
  // work and the contiguous chunks a ParallelFor hands out stay balanced:
  // first narrow the column blocks (threads then read disjoint weights),
  // then the row blocks.
  auto tiles = [&](int64_t m, int64_t n) { return ((a.M + m - 1) / m) * ((a.N + n - 1) / n); };
  while (tiles(mc, nc) < 8) {
    if (nc > 48) {
      nc = nc / 2 / 48 * 48;
      if (nc < 48) nc = 48;
      continue;
    }
    // Halve the row block, rounded up to the micro-kernel height 8; stop
    // once that no longer shrinks it (mc <= 8), so mc stays >= 1.
    const int64_t half = (mc / 2 + 7) / 8 * 8;
    if (half < 8 || half >= mc) break;
    mc = half;
  }
  c.mc = mc;
  c.nc = nc;
  c.tiles_m = (a.M + mc - 1) / mc;
  const int64_t tiles_n = (a.N + nc - 1) / nc;
  // Grain: tasks below ~256K MACs in total are not worth a thread hand-off.
  const int64_t task_macs = mc * nc * a.K;
  const int64_t grain = (int64_t(1) << 18) / (task_macs > 0 ? task_macs : 1) + 1;
  run_pf(pf, tiles_n * c.tiles_m, grain, &c, packed_range);
}

}  // namespace

Isa detected_isa() { return cpu_info().detected; }
Isa active_isa() { return cap_info().active; }
std::string cpu_features() { return cpu_info().features; }
std::string isa_error() { return cap_info().error; }

const char* isa_name(Isa isa) {
  switch (isa) {
    case kRef: return "ref";
    case kAvx2: return "avx2";
    case kAvx512Vnni: return "avx512_vnni";
    case kAmx: return "amx";
  }
  return "?";
}

int64_t quantize_per_token(Isa isa, const void* x, DType dt, int64_t M, int64_t K, int8_t* q, float* scale,
                           ParallelFor pf) {
  if (M <= 0 || K <= 0) return -1;
  return quantize_impl(effective(isa), x, dt, M, K, q, scale, nullptr, pf);
}

int64_t int8_linear(Isa isa, const void* x, DType dt, int64_t M, int64_t K, const int8_t* w_q,
                    const float* w_scale, const float* bias, int64_t N, void* y, ParallelFor pf) {
  if (M <= 0 || K <= 0 || N <= 0) return -1;
  isa = effective(isa);
  // Quantize all of x once up front (parallel over rows), then the GEMM
  // reads the int8 copy; the VNNI path also needs the row sums of xq.
  std::unique_ptr<int8_t[]> xq(new int8_t[size_t(M * K)]);
  std::unique_ptr<float[]> xs(new float[size_t(M)]);
  std::unique_ptr<int32_t[]> xsum(new int32_t[size_t(M)]);
  const int64_t bad = quantize_impl(isa, x, dt, M, K, xq.get(), xs.get(), xsum.get(), pf);
  if (bad >= 0) return bad;
  detail::GemmArgs a{};
  a.xq = xq.get(); a.xsum = xsum.get(); a.w = w_q; a.M = M; a.K = K; a.N = N;
  a.acc = nullptr; a.xs = xs.get(); a.ws = w_scale; a.bias = bias; a.y = y; a.dt = dt;
  gemm_impl(isa, a, pf);
  return -1;
}

void int8_gemm_s32(Isa isa, const int8_t* xq, int64_t M, int64_t K, const int8_t* w_q, int64_t N,
                   int32_t* acc, ParallelFor pf) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // empty sum
    for (int64_t i = 0; i < M * N; ++i) acc[i] = 0;
    return;
  }
  isa = effective(isa);
  std::unique_ptr<int32_t[]> xsum;
  if (isa == kAvx512Vnni) {
    xsum.reset(new int32_t[size_t(M)]);
    RowSumCtx rc{xq, K, xsum.get()};
    run_pf(pf, M, (65536 + K - 1) / K, &rc, rowsum_range);
  }
  detail::GemmArgs a{};
  a.xq = xq; a.xsum = xsum.get(); a.w = w_q; a.M = M; a.K = K; a.N = N; a.acc = acc;
  gemm_impl(isa, a, pf);
}

void pack_int8_vnni16(const int8_t* w, int64_t N, int64_t K, int8_t* packed, int32_t* colsum) {
  if (N <= 0 || K <= 0) return;
  const int64_t KG = (K + 3) / 4, NB = (N + 15) / 16, Kfull = K / 4 * 4;
  // Row by row: each source row is read sequentially (and summed in the
  // same pass) and scattered in 4-byte groups with a 64-byte stride into
  // its panel, which stays cache resident while its 16 rows are written.
  for (int64_t n = 0; n < NB * 16; ++n) {
    int8_t* dst = packed + (n / 16) * KG * 64 + (n % 16) * 4;
    if (n >= N) {  // padded column: zeros, colsum 0
      for (int64_t kg = 0; kg < KG; ++kg) std::memset(dst + kg * 64, 0, 4);
      colsum[n] = 0;
      continue;
    }
    const int8_t* src = w + n * K;
    uint32_t sum = 0;  // wrapping, like every int32 sum of the contract
    for (int64_t k = 0; k < K; ++k) sum += uint32_t(int32_t(src[k]));
    colsum[n] = int32_t(sum);
    for (int64_t k = 0; k < Kfull; k += 4) std::memcpy(dst + k * 16, src + k, 4);
    if (Kfull < K) {  // K tail: the last group is zero-padded
      int8_t t[4] = {0, 0, 0, 0};
      std::memcpy(t, src + Kfull, size_t(K - Kfull));
      std::memcpy(dst + Kfull * 16, t, 4);
    }
  }
}

int64_t int8_linear_packed(Isa isa, const void* x, DType dt, int64_t M, int64_t K, const int8_t* w_packed,
                           const int32_t* w_colsum, const float* w_scale, const float* bias, int64_t N, void* y,
                           ParallelFor pf) {
  if (M <= 0 || K <= 0 || N <= 0) return -1;
  isa = effective(isa);
  const int64_t Kp = (K + 3) / 4 * 4;
  // x is quantized once, up front and in parallel, into the form the GEMM of
  // this path consumes (u8 q+128 for vpdpbusd, int16 q for vpmaddwd, plain
  // q for ref), rows padded to Kp with zeros so the 4-k broadcasts of the K
  // tail stay inside the buffer and contribute nothing.
  const int64_t row_bytes = isa == kAvx2 ? 2 * Kp : (isa == kRef ? K : Kp);
  AlignedBuf abuf(size_t(M * row_bytes));
  std::unique_ptr<float[]> xs(new float[size_t(M)]);
  PackedQuantCtx qc;
  qc.isa = isa; qc.x = x; qc.dt = dt; qc.K = K; qc.Kp = Kp; qc.out = abuf.p; qc.scale = xs.get();
  run_pf(pf, M, (16384 + K - 1) / K, &qc, packed_quant_range);
  const int64_t bad = qc.bad.load();
  if (bad != INT64_MAX) return bad;
  detail::PackedArgs a{};
  a.a = abuf.p; a.wp = w_packed; a.colsum = w_colsum; a.M = M; a.K = K; a.N = N; a.Kp = Kp;
  a.xs = xs.get(); a.ws = w_scale; a.bias = bias; a.y = y; a.dt = dt;
  packed_gemm_impl(isa, a, pf);
  return -1;
}

double int8_peak_gops(Isa isa, double seconds) {
  isa = effective(isa);
  if (!(seconds >= 1e-3)) seconds = 1e-3;  // also catches NaN
  if (seconds > 10) seconds = 10;
  auto run = [isa](int64_t iters) -> int64_t {
    switch (isa) {
      case kAvx512Vnni: case kAmx: return detail::peak_loop_avx512_vnni(iters);
      case kAvx2: return detail::peak_loop_avx2(iters);
      default: return detail::peak_loop_ref(iters);
    }
  };
  typedef std::chrono::steady_clock clk;
  auto since = [](clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); };
  // Grow the batch until it takes >= 1/8 of the budget (this also warms the
  // core up to its vector clock), then time batches until the budget is
  // spent and keep the best rate: the peak is a property of the core, and on
  // a shared machine the best batch is the one least disturbed.
  const clk::time_point start = clk::now();
  int64_t iters = 1024;
  double best = 0;
  for (;;) {
    const clk::time_point t0 = clk::now();
    const int64_t macs = run(iters);
    const double dt = since(t0);
    if (dt > 0) {
      const double rate = 2.0 * double(macs) / dt * 1e-9;
      if (dt >= seconds / 8 && rate > best) best = rate;
    }
    if (dt < seconds / 8) {
      iters *= 2;
      continue;
    }
    if (since(start) >= seconds) break;
  }
  return best;
}

}}  // namespace pysparse::cpu
