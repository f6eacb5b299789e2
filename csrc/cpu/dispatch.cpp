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
#include <cmath>
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
  bool vbmi = false, bf16 = false;  // AVX512-VBMI / AVX512-BF16 usable (needs kAvx512Vnni)
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
  const bool vnni = bit(c7, 11), vbmi = bit(c7, 1), vbmi2 = bit(c7, 6), bf16 = bit(a71, 5);
  const bool amx_bf16 = bit(d7, 22), amx_tile = bit(d7, 24), amx_int8 = bit(d7, 25);

  struct { bool on; const char* name; } flags[] = {
      {avx, "avx"}, {avx2, "avx2"}, {fma, "fma"}, {f16c, "f16c"},
      {avx512f, "avx512f"}, {avx512dq, "avx512dq"}, {avx512bw, "avx512bw"}, {avx512vl, "avx512vl"},
      {vnni, "avx512_vnni"}, {bf16, "avx512_bf16"}, {vbmi, "avx512_vbmi"}, {vbmi2, "avx512_vbmi2"},
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
  if (ci.detected == kAvx512Vnni) {
    ci.vbmi = vbmi;
    ci.bf16 = bf16;
  }
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

// Each parallel chunk reports the first bad row of its own range; keep the global min.
void keep_min(std::atomic<int64_t>& bad, int64_t r) {
  int64_t cur = bad.load(std::memory_order_relaxed);
  while (r < cur && !bad.compare_exchange_weak(cur, r, std::memory_order_relaxed)) {}
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
  if (r >= 0) keep_min(c->bad, r);
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
  if (r >= 0) keep_min(c->bad, r);
}

// Task grid shared by the packed-weight GEMMs (dense and 2:4): output tiles
// of mc rows x nc columns, n-major (consecutive tasks share a column block).
struct Tiling {
  int64_t M, N, mc, nc, tiles_m, tiles_n, grain;
  void block(int64_t t, int64_t& m0, int64_t& m1, int64_t& n0, int64_t& n1) const {
    const int64_t ni = t / tiles_m, mi = t % tiles_m;
    m0 = mi * mc; m1 = m0 + mc < M ? m0 + mc : M;
    n0 = ni * nc; n1 = n0 + nc < N ? n0 + nc : N;
  }
};

// xrow_bytes: activation bytes per row; wcol_bytes: weight bytes per output
// column; macs_per_col_row: multiply work per output (for the grain).
Tiling plan_tiles(int64_t M, int64_t N, int64_t xrow_bytes, int64_t wcol_bytes, int64_t macs_per_out) {
  // Column blocks are multiples of 48 = the VNNI micro-kernel width (3
  // panels), so no chunk boundary leaves a narrower block behind (16, the
  // AVX2 width, divides it too); row blocks are multiples of 8 (its height).
  // Small M (decode, short queries): one row block holding all of M and
  // 48-column tasks, so each weight byte is read from memory exactly once
  // and the threads split the weight between them; the block functions keep
  // a 48-column w block cache-resident while they sweep the rows over it.
  // Large M: tiles of mc rows x nc columns sized so that the x rows and the
  // w columns of one tile fit in L2 together; consecutive tasks share the
  // column block, which then also stays in L2.
  int64_t mc = M, nc = 48;
  if (M > 32) {
    mc = (int64_t(256) << 10) / xrow_bytes;
    mc = mc < 32 ? 32 : (mc > 256 ? 256 : mc);
    mc &= ~int64_t(7);
    if (mc > M) mc = M;
    nc = (int64_t(256) << 10) / wcol_bytes / 48 * 48;
    nc = nc < 48 ? 48 : (nc > 480 ? 480 : nc);
  }
  // At least 8 tasks where the shape allows, so that every thread gets
  // work and the contiguous chunks a ParallelFor hands out stay balanced:
  // first narrow the column blocks (threads then read disjoint weights),
  // then the row blocks.
  auto tiles = [&](int64_t m, int64_t n) { return ((M + m - 1) / m) * ((N + n - 1) / n); };
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
  Tiling t;
  t.M = M; t.N = N; t.mc = mc; t.nc = nc;
  t.tiles_m = (M + mc - 1) / mc;
  t.tiles_n = (N + nc - 1) / nc;
  // Grain: tasks below ~256K MACs in total are not worth a thread hand-off.
  const int64_t task_macs = mc * nc * macs_per_out;
  t.grain = (int64_t(1) << 18) / (task_macs > 0 ? task_macs : 1) + 1;
  return t;
}

struct PackedCtx {
  Isa isa;
  detail::PackedArgs a;
  Tiling t;
};

void packed_range(void* p, int64_t b, int64_t e) {
  const auto* c = static_cast<const PackedCtx*>(p);
  for (int64_t t = b; t < e; ++t) {
    int64_t m0, m1, n0, n1;
    c->t.block(t, m0, m1, n0, n1);
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
  c.t = plan_tiles(a.M, a.N, a.Kp * (isa == kAvx2 ? 2 : 1), a.Kp, a.K);
  run_pf(pf, c.t.tiles_n * c.t.tiles_m, c.t.grain, &c, packed_range);
}

// ---------------------------------------------------------------- 2:4 sparse
bool gather_disabled() {
  // Test hook: PYSPARSE_CPU_NO_VBMI=1 makes the 2:4 kernels take the
  // expand fallback a VNNI-but-no-VBMI CPU (Cascade Lake) would take.
  static const bool off = [] {
    const char* e = std::getenv("PYSPARSE_CPU_NO_VBMI");
    return e && *e && std::strcmp(e, "0") != 0;
  }();
  return off;
}

// sp24i8: position of column j's meta byte among a block's 16 code bytes (kernels.h).
const int kCodePos[16] = {0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15};

bool gather_ok(Isa isa) { return isa >= kAvx512Vnni && cpu_info().vbmi && !gather_disabled(); }

// Expand the sp24i8 columns [n0, n1) (n0 a multiple of 16) into vnni16
// panels with the same Kp (a multiple of 8, so of 4 too): the fallback for
// paths without the gather kernel, once per column block and reused by all
// rows of the block.
void expand_i8_vnni16(const int8_t* sv, const uint8_t* sc, int64_t Kp, int64_t n0, int64_t n1, int8_t* out) {
  const int64_t KB = Kp / 8, KG = Kp / 4;
  for (int64_t nb = n0 / 16; nb * 16 < n1; ++nb) {
    int8_t* dst = out + (nb - n0 / 16) * KG * 64;
    std::memset(dst, 0, size_t(KG * 64));
    for (int64_t b = 0; b < KB; ++b) {
      const int8_t* v = sv + (nb * KB + b) * 64;
      const uint8_t* c = sc + (nb * KB + b) * 16;
      for (int j = 0; j < 16; ++j) {
        const unsigned code = c[kCodePos[j]];
        for (int t = 0; t < 4; ++t) {
          const int64_t kg = 2 * b + t / 2;  // 4-k group within the panel
          dst[kg * 64 + j * 4 + ((code >> (2 * t)) & 3u)] = v[j * 4 + t];
        }
      }
    }
  }
}

struct Sp24I8Ctx {
  Isa isa;
  bool gather;
  detail::Sparse24I8Args a;
  Tiling t;
};

void sp24_i8_range(void* p, int64_t b, int64_t e) {
  const auto* c = static_cast<const Sp24I8Ctx*>(p);
  std::unique_ptr<int8_t[]> tmp;
  std::unique_ptr<uint8_t[]> scratch;
  int64_t tmp_n0 = -1, tmp_n1 = -1;
  for (int64_t t = b; t < e; ++t) {
    int64_t m0, m1, n0, n1;
    c->t.block(t, m0, m1, n0, n1);
    if (c->gather) {
      if (!scratch) scratch.reset(new uint8_t[size_t(detail::sparse24_i8_scratch_bytes(c->a.Kp))]);
      detail::sparse24_i8_block_vbmi(c->a, m0, m1, n0, n1, scratch.get());
      continue;
    }
    if (c->isa == kRef) {
      detail::sparse24_i8_block_ref(c->a, m0, m1, n0, n1);
      continue;
    }
    // Expand fallback (consecutive tasks of one column block reuse it).
    const int64_t Kp = c->a.Kp;
    if (!tmp) tmp.reset(new int8_t[size_t(c->t.nc / 16 + 1) * 16 * Kp]);
    if (n0 != tmp_n0 || n1 != tmp_n1) {
      expand_i8_vnni16(c->a.sv, c->a.sc, Kp, n0, n1, tmp.get());
      tmp_n0 = n0; tmp_n1 = n1;
    }
    detail::PackedArgs pa{};
    pa.a = c->a.a; pa.wp = tmp.get(); pa.colsum = c->a.colsum; pa.M = c->a.M; pa.K = c->a.K; pa.N = c->a.N;
    pa.Kp = Kp; pa.xs = c->a.xs; pa.ws = c->a.ws; pa.bias = c->a.bias; pa.y = c->a.y; pa.dt = c->a.dt;
    pa.panel0 = n0 / 16;
    if (c->isa == kAvx2) detail::gemm_packed_block_avx2(pa, m0, m1, n0, n1);
    else detail::gemm_packed_block_avx512_vnni(pa, m0, m1, n0, n1);
  }
}

struct NonFiniteCtx {
  Isa isa;
  const void* x;
  DType dt;
  int64_t K;
  std::atomic<int64_t> bad{INT64_MAX};
};

void nonfinite_range(void* p, int64_t b, int64_t e) {
  auto* c = static_cast<NonFiniteCtx*>(p);
  int64_t r = -1;
  if (c->isa >= kAvx512Vnni) {
    r = detail::first_nonfinite_row_avx512(c->x, c->dt, c->K, b, e);
  } else {
    for (int64_t m = b; m < e && r < 0; ++m)
      for (int64_t k = 0; k < c->K; ++k) {
        uint32_t bits;
        if (c->dt == kBF16) {
          bits = uint32_t(static_cast<const uint16_t*>(c->x)[m * c->K + k]) << 16;
        } else {
          std::memcpy(&bits, static_cast<const float*>(c->x) + m * c->K + k, 4);
        }
        if ((bits & 0x7fffffffu) >= 0x7f800000u) {
          r = m;
          break;
        }
      }
  }
  if (r >= 0) keep_min(c->bad, r);
}

struct Sp24FCtx {
  Isa isa;
  int kind;  // 0 ref, 1 avx2 expand, 2 gather fp32 FMA, 3 gather vdpbf16ps
  detail::Sparse24FArgs a;
  Tiling t;
};

// Expand sp24f columns [n0, n1) to dense fp32 [panel][K][16].
// Element i of x (fp32 or bf16) as fp32.
inline float load_f32(const void* x, DType dt, int64_t i) {
  if (dt == kBF16) {
    const uint32_t b = uint32_t(static_cast<const uint16_t*>(x)[i]) << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  }
  return static_cast<const float*>(x)[i];
}

void expand_f32(const detail::Sparse24FArgs& a, int64_t n0, int64_t n1, float* out) {
  const int64_t K = a.K, G = K / 4;
  for (int64_t nb = n0 / 16; nb * 16 < n1; ++nb) {
    float* dst = out + (nb - n0 / 16) * K * 16;
    std::memset(dst, 0, size_t(K * 16) * sizeof(float));
    for (int64_t g = 0; g < G; ++g) {
      const int64_t line = (nb * G + g) * 32;
      const uint64_t code = a.sc[nb * G + g];
      for (int j = 0; j < 16; ++j)
        for (int t = 0; t < 2; ++t) {
          const float w = load_f32(a.sv, a.vdt, line + j * 2 + t);
          const int64_t k = 4 * g + int64_t((code >> (4 * j + 2 * t)) & 3u);
          dst[k * 16 + j] = w;
        }
    }
  }
}

void sp24_f_range(void* p, int64_t b, int64_t e) {
  const auto* c = static_cast<const Sp24FCtx*>(p);
  std::unique_ptr<float[]> tmp;
  std::unique_ptr<uint8_t[]> scratch;
  int64_t tmp_n0 = -1, tmp_n1 = -1;
  for (int64_t t = b; t < e; ++t) {
    int64_t m0, m1, n0, n1;
    c->t.block(t, m0, m1, n0, n1);
    switch (c->kind) {
      case 3:
        if (!scratch) scratch.reset(new uint8_t[size_t(detail::sparse24_f_scratch_bytes(c->a.K))]);
        detail::sparse24_f_block_bf16(c->a, m0, m1, n0, n1, scratch.get());
        break;
      case 2: detail::sparse24_f_block_vbmi(c->a, m0, m1, n0, n1); break;
      case 1:
        if (!tmp) tmp.reset(new float[size_t(c->t.nc / 16 + 1) * 16 * c->a.K]);
        if (n0 != tmp_n0 || n1 != tmp_n1) {
          expand_f32(c->a, n0, n1, tmp.get());
          tmp_n0 = n0; tmp_n1 = n1;
        }
        detail::dense_f32_block_avx2(c->a, tmp.get(), m0, m1, n0, n1);
        break;
      default: detail::sparse24_f_block_ref(c->a, m0, m1, n0, n1); break;
    }
  }
}

// ---------------------------------------------------------------- attention
enum AttnPath { kAttnRef, kAttnAvx2, kAttnF32, kAttnBf16 };

AttnPath attn_path(Isa isa, DType dt) {
  isa = effective(isa);
  if (isa >= kAvx512Vnni) return dt == kBF16 && cpu_info().bf16 ? kAttnBf16 : kAttnF32;
  return isa == kAvx2 ? kAttnAvx2 : kAttnRef;
}

struct AttnCtx {
  const AttentionArgs* a;
  AttnPath path;
  uint8_t* kp;
  uint8_t* vp;
  int64_t kbytes, vbytes;  // per (b, kv head)
  bool v_direct;           // f32 form from fp32 V with D % 16 == 0: V is read in place
  int64_t nqb;             // query blocks per head
};

// Packs K and V of (b, kv head g) in the form of impl.h ("f32" or "bf16").
void attn_pack_one(const AttnCtx& c, int64_t b, int64_t g, uint8_t* kdst, uint8_t* vdst) {
  const AttentionArgs& a = *c.a;
  const int64_t Sk = a.Sk, D = a.D, D16 = (D + 15) / 16 * 16, Dp = (D + 1) / 2 * 2;
  const int64_t kbase = b * a.ks[0] + g * a.ks[1], vbase = b * a.vs[0] + g * a.vs[1];
  if (c.path == kAttnBf16) {  // bf16 in, bf16 packs: plain 16-bit moves
    const uint16_t* K = static_cast<const uint16_t*>(a.k) + kbase;
    const uint16_t* V = static_cast<const uint16_t*>(a.v) + vbase;
    uint16_t* kp = reinterpret_cast<uint16_t*>(kdst);
    uint16_t* vp = reinterpret_cast<uint16_t*>(vdst);
    // zero only what the loops below leave unwritten: the last partial 16-key block of K (all
    // of K when D is odd: the pad d of every pair) and the pad d / odd last key of V
    const int64_t kfull = (D % 2) ? 0 : (Sk / 16) * Dp * 16;
    std::memset(kp + kfull, 0, size_t(c.kbytes) - size_t(kfull) * 2);
    const int64_t vfull = (D % 16) ? 0 : (Sk / 2) * D16 * 2;
    std::memset(vp + vfull, 0, size_t(c.vbytes) - size_t(vfull) * 2);
    for (int64_t j = 0; j < Sk; ++j) {  // kp[j/16][d/2][j%16][d%2]
      const uint16_t* kr = K + j * a.ks[2];
      uint16_t* dst = kp + (j / 16) * Dp * 16 + (j % 16) * 2;
      for (int64_t d = 0; d < D; ++d) dst[(d / 2) * 32 + (d % 2)] = kr[d];
    }
    for (int64_t j = 0; j < Sk; ++j) {  // vp[j/2][d][j%2]
      const uint16_t* vr = V + j * a.vs[2];
      uint16_t* dst = vp + (j / 2) * D16 * 2 + (j % 2);
      for (int64_t d = 0; d < D; ++d) dst[d * 2] = vr[d];
    }
    return;
  }
  float* kp = reinterpret_cast<float*>(kdst);
  const int64_t kfull = (Sk / 16) * D * 16;
  std::memset(kp + kfull, 0, size_t(c.kbytes) - size_t(kfull) * 4);
  for (int64_t j = 0; j < Sk; ++j) {  // kp[j/16][d][j%16]
    const int64_t ko = kbase + j * a.ks[2];
    float* dst = kp + (j / 16) * D * 16 + (j % 16);
    if (a.dt == kF32) {
      const float* kr = static_cast<const float*>(a.k) + ko;
      for (int64_t d = 0; d < D; ++d) dst[d * 16] = kr[d];
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d * 16] = load_f32(a.k, a.dt, ko + d);
    }
  }
  if (c.v_direct) return;  // the kernel reads V in place
  float* vp = reinterpret_cast<float*>(vdst);
  std::memset(vp, 0, size_t(c.vbytes));
  for (int64_t j = 0; j < Sk; ++j) {  // vp[j][d]
    const int64_t vo = vbase + j * a.vs[2];
    for (int64_t d = 0; d < D; ++d) vp[j * D16 + d] = load_f32(a.v, a.dt, vo + d);
  }
}

void attn_pack_range(void* p, int64_t b, int64_t e) {
  const auto* c = static_cast<const AttnCtx*>(p);
  for (int64_t t = b; t < e; ++t)
    attn_pack_one(*c, t / c->a->Hkv, t % c->a->Hkv, c->kp + t * c->kbytes, c->vp + t * c->vbytes);
}

void attn_job_range(void* p, int64_t b, int64_t e) {
  const auto* c = static_cast<const AttnCtx*>(p);
  const AttentionArgs& a = *c->a;
  const int64_t D16 = (a.D + 15) / 16 * 16;
  const int64_t BQ = detail::kAttnBq, BC = detail::kAttnBc;
  // Q | S | P | O | m, l, alpha (impl.h); +16 floats so the last masked loads stay inside
  std::unique_ptr<float[]> scratch(new float[size_t(2 * BQ * D16 + 2 * BQ * BC + 3 * BQ + 16)]);
  for (int64_t t = b; t < e; ++t) {
    const int64_t bh = t / c->nqb, qb = t % c->nqb;
    detail::AttnJob j{};
    j.a = &a;
    j.b = bh / a.Hq;
    j.h = bh % a.Hq;
    j.i0 = qb * BQ;
    j.i1 = std::min<int64_t>(a.Sq, j.i0 + BQ);
    // Keys no row of the job can see are not visited: past the causal limit of its last
    // row, and a -inf key-padding margin (a bias constant over queries) at either end.
    j.j0 = 0;
    j.j1 = a.causal ? std::min<int64_t>(a.Sk, j.i1 + a.Sk - a.Sq) : a.Sk;
    if (a.bias && a.bs[2] == 0) {
      const float* row = a.bias + j.b * a.bs[0] + j.h * a.bs[1];
      while (j.j1 > 0 && row[j.j1 - 1] == -INFINITY) --j.j1;
      while (j.j0 < j.j1 && row[j.j0] == -INFINITY) ++j.j0;
    }
    j.j0 = j.j0 / 16 * 16;
    const int64_t kv = j.b * a.Hkv + j.h / (a.Hq / a.Hkv);
    j.kp = c->kp + kv * c->kbytes;
    if (c->v_direct) {
      j.vp = static_cast<const float*>(a.v) + j.b * a.vs[0] + (j.h / (a.Hq / a.Hkv)) * a.vs[1];
      j.vstride = a.vs[2];
    } else {
      j.vp = c->vp + kv * c->vbytes;
      j.vstride = (a.D + 15) / 16 * 16;
    }
    j.scratch = scratch.get();
    switch (c->path) {
      case kAttnBf16: detail::attn_rows_avx512_bf16(j); break;
      case kAttnF32: detail::attn_rows_avx512_f32(j); break;
      case kAttnAvx2: detail::attn_rows_avx2(j); break;
      default: detail::attn_rows_ref(j); break;
    }
  }
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

// ---------------------------------------------------------------- 2:4 sparse entry points
bool has_sparse_gather() { return gather_ok(active_isa()); }
bool has_avx512_bf16() { return cpu_info().bf16; }

void pack_sparse24_int8(const int8_t* values, const uint8_t* meta, int64_t N, int64_t K, int8_t* packed_values,
                        uint8_t* packed_codes, int32_t* colsum) {
  if (N <= 0 || K <= 0) return;
  const int64_t KB = (K + 7) / 8, NB = (N + 15) / 16, half = K / 2, mb = (K + 7) / 8;
  for (int64_t n = 0; n < NB * 16; ++n) {
    const int64_t nb = n / 16;
    const int j = int(n % 16);
    uint32_t sum = 0;
    for (int64_t b = 0; b < KB; ++b) {
      int8_t* v = packed_values + (nb * KB + b) * 64 + j * 4;
      uint8_t* c = packed_codes + (nb * KB + b) * 16 + kCodePos[j];
      if (n >= N) {
        std::memset(v, 0, 4);
        *c = 0;
        continue;
      }
      for (int t = 0; t < 4; ++t) {
        const int64_t i = 4 * b + t;  // index into the row's K/2 values
        v[t] = i < half ? values[n * half + i] : int8_t(0);
        sum += uint32_t(int32_t(v[t]));
      }
      *c = b < mb ? meta[n * mb + b] : uint8_t(0);
    }
    colsum[n] = n < N ? int32_t(sum) : 0;
  }
}

void pack_sparse24_float(const void* values, DType vdt, const uint8_t* meta, int64_t N, int64_t K,
                         void* packed_values, uint64_t* packed_codes) {
  if (N <= 0 || K <= 0) return;
  const int64_t G = K / 4, NB = (N + 15) / 16, half = K / 2, mb = (K + 7) / 8;
  for (int64_t nb = 0; nb < NB; ++nb)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t line = (nb * G + g) * 32;
      uint64_t code = 0;
      for (int j = 0; j < 16; ++j) {
        const int64_t n = nb * 16 + j;
        for (int t = 0; t < 2; ++t) {
          if (vdt == kBF16) {
            static_cast<uint16_t*>(packed_values)[line + j * 2 + t] =
                n < N ? static_cast<const uint16_t*>(values)[n * half + 2 * g + t] : uint16_t(0);
          } else {
            static_cast<float*>(packed_values)[line + j * 2 + t] =
                n < N ? static_cast<const float*>(values)[n * half + 2 * g + t] : 0.0f;
          }
        }
        // Pad columns get code 0b0100 (i0 = 0, i1 = 1): valid positions whose
        // zero values contribute nothing.
        const unsigned c = n < N ? (meta[n * mb + g / 2] >> (4 * (g % 2))) & 0xFu : 0x4u;
        code |= uint64_t(c) << (4 * j);
      }
      packed_codes[nb * G + g] = code;
    }
}

int64_t sparse24_int8_linear_packed(Isa isa, const void* x, DType dt, int64_t M, int64_t K,
                                    const int8_t* packed_values, const uint8_t* packed_codes, const int32_t* colsum,
                                    const float* w_scale, const float* bias, int64_t N, void* y, ParallelFor pf) {
  if (M <= 0 || K <= 0 || N <= 0) return -1;
  isa = effective(isa);
  const int64_t Kp = (K + 7) / 8 * 8;
  const bool gather = gather_ok(isa);
  // Activation in the form of the dense packed path of this ISA, rows
  // zero-padded to Kp (a multiple of 8), or to a multiple of 64 for the
  // gather kernel (it reads 64-byte windows of a row).
  const int64_t astride = gather ? (K + 63) / 64 * 64 : Kp;
  const int64_t row_bytes = isa == kAvx2 ? 2 * Kp : (isa == kRef ? K : astride);
  AlignedBuf abuf(size_t(M * row_bytes));
  std::unique_ptr<float[]> xs(new float[size_t(M)]);
  PackedQuantCtx qc;
  qc.isa = isa; qc.x = x; qc.dt = dt; qc.K = K; qc.Kp = astride; qc.out = abuf.p; qc.scale = xs.get();
  run_pf(pf, M, (16384 + K - 1) / K, &qc, packed_quant_range);
  const int64_t bad = qc.bad.load();
  if (bad != INT64_MAX) return bad;
  Sp24I8Ctx c;
  c.isa = isa;
  c.gather = gather;
  c.a.a = abuf.p; c.a.sv = packed_values; c.a.sc = packed_codes; c.a.colsum = colsum;
  c.a.M = M; c.a.K = K; c.a.N = N; c.a.Kp = Kp; c.a.astride = row_bytes / (isa == kAvx2 ? 2 : 1);
  c.a.xs = xs.get(); c.a.ws = w_scale; c.a.bias = bias; c.a.y = y; c.a.dt = dt;
  // Gather kernel: half the multiply work per output of the dense kernel.
  c.t = plan_tiles(M, N, row_bytes, gather ? Kp * 5 / 8 : Kp, gather ? K / 2 : K);
  run_pf(pf, c.t.tiles_n * c.t.tiles_m, c.t.grain, &c, sp24_i8_range);
  return -1;
}

int64_t sparse24_linear_packed(Isa isa, const void* x, DType dt, int64_t M, int64_t K, const void* packed_values,
                               DType vdt, const uint64_t* packed_codes, const float* bias, int64_t N, void* y,
                               ParallelFor pf) {
  if (M <= 0 || K <= 0 || N <= 0) return -1;
  isa = effective(isa);
  NonFiniteCtx nc;
  nc.isa = isa; nc.x = x; nc.dt = dt; nc.K = K;
  run_pf(pf, M, (65536 + K - 1) / K, &nc, nonfinite_range);
  const int64_t bad = nc.bad.load();
  if (bad != INT64_MAX) return bad;
  Sp24FCtx c;
  c.isa = isa;
  if (gather_ok(isa))
    c.kind = (dt == kBF16 && vdt == kBF16 && cpu_info().bf16) ? 3 : 2;
  else
    c.kind = isa >= kAvx2 ? 1 : 0;
  c.a.x = x; c.a.dt = dt; c.a.sv = packed_values; c.a.vdt = vdt; c.a.sc = packed_codes;
  c.a.M = M; c.a.K = K; c.a.N = N; c.a.bias = bias; c.a.y = y;
  const int64_t xsz = dt == kBF16 ? 2 : 4, vsz = vdt == kBF16 ? 2 : 4;
  c.t = plan_tiles(M, N, K * xsz, c.kind >= 2 ? K / 2 * vsz + K / 8 : K * 4, c.kind >= 2 ? K / 2 : K);
  run_pf(pf, c.t.tiles_n * c.t.tiles_m, c.t.grain, &c, sp24_f_range);
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


void attention_fwd(Isa isa, const AttentionArgs& a, ParallelFor pf) {
  if (a.B <= 0 || a.Hq <= 0 || a.Hkv <= 0 || a.Sq <= 0 || a.Sk <= 0 || a.D <= 0 || a.Hq % a.Hkv) return;
  AttnCtx c{};
  c.a = &a;
  c.path = attn_path(isa, a.dt);
  const int64_t D16 = (a.D + 15) / 16 * 16, Dp = (a.D + 1) / 2 * 2;
  const int64_t S16 = (a.Sk + 15) / 16 * 16, S2 = (a.Sk + 1) / 2 * 2;
  if (c.path == kAttnBf16) {
    c.kbytes = S16 * Dp * 2;
    c.vbytes = S2 * D16 * 2;
  } else {
    c.kbytes = S16 * a.D * 4;
    c.v_direct = a.dt == kF32 && a.D % 16 == 0;
    c.vbytes = c.v_direct ? 0 : a.Sk * D16 * 4;
  }
  c.kbytes = (c.kbytes + 63) / 64 * 64;  // each (b, kv head) on its own cache lines
  c.vbytes = (c.vbytes + 63) / 64 * 64;
  const int64_t nkv = a.B * a.Hkv;
  std::unique_ptr<uint8_t[]> kp(new uint8_t[size_t(nkv * c.kbytes)]);
  std::unique_ptr<uint8_t[]> vp(new uint8_t[size_t(nkv * c.vbytes)]);
  c.kp = kp.get();
  c.vp = vp.get();
  c.nqb = (a.Sq + detail::kAttnBq - 1) / detail::kAttnBq;
  run_pf(pf, nkv, 1, &c, attn_pack_range);
  run_pf(pf, a.B * a.Hq * c.nqb, 1, &c, attn_job_range);
}

const char* attention_kernel_name(Isa isa, DType dt) {
  switch (attn_path(isa, dt)) {
    case kAttnBf16: return "avx512_bf16 (vdpbf16ps)";
    case kAttnF32: return "avx512 (fp32 fma)";
    case kAttnAvx2: return "avx2 (fp32, compiler-vectorised)";
    default: return "ref (fp32, plain C++)";
  }
}

}}  // namespace pysparse::cpu
