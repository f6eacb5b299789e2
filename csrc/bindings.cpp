// The one translation unit that includes torch: converts tensors to raw pointers, checks the
// contract (op-prefixed messages), releases the GIL and hands threading to at::parallel_for.
// Kernels live in csrc/cpu/*.cpp (plain C++, one file per ISA). The ops themselves are defined
// and registered from Python (pysparse/ops/library.py, pysparse/ops/backends/cpu.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu/kernels.h"

namespace cpu = pysparse::cpu;

namespace {

void torch_parallel_for(int64_t n, int64_t grain, void* ctx, cpu::RangeFn fn) {
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { fn(ctx, b, e); });
}

cpu::Isa pick_isa(int64_t isa) {
  // isa < 0: the active (detected, env-capped) ISA; otherwise min(requested, detected)
  if (isa < 0) return cpu::active_isa();
  TORCH_CHECK_VALUE(isa <= cpu::kAmx, "pysparse: unknown ISA id ", isa);
  return static_cast<cpu::Isa>(std::min<int64_t>(isa, cpu::detected_isa()));
}

cpu::DType dtype_of(const char* op, const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) return cpu::kF32;
  TORCH_CHECK_VALUE(x.scalar_type() == at::kBFloat16, "pysparse.", op,
                    ": the CPU kernel takes float32 or bfloat16 x, got ", x.scalar_type());
  return cpu::kBF16;
}

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "pysparse.", op, ": x must be a CPU tensor");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), "pysparse.", op,
                    ": the CPU kernel takes a contiguous 2-D x [M, K]");
  TORCH_CHECK_VALUE(x.size(0) >= 1 && x.size(1) >= 1, "pysparse.", op, ": x must be non-empty");
}

void check_vec(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == n &&
                        t.is_contiguous() && t.device().is_cpu(),
                    "pysparse.", op, ": ", name, " must be a contiguous fp32 [", n,
                    "] CPU tensor");
}

const float* bias_ptr(const char* op, const c10::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return nullptr;
  check_vec(op, "bias", *bias, n);
  return bias->data_ptr<float>();
}

void raise_nonfinite(const char* op, int64_t row) {
  TORCH_CHECK_VALUE(row < 0, "pysparse.", op, ": x contains NaN or Inf (first at token row ",
                    row, "); int8 quantization of non-finite activations is undefined");
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, int64_t isa) {
  const char* op = "quantize_per_token";
  check_x(op, x);
  auto dt = dtype_of(op, x);
  const int64_t M = x.size(0), K = x.size(1);
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto s = at::empty({M}, x.options().dtype(at::kFloat));
  int64_t bad;
  {
    pybind11::gil_scoped_release nogil;
    bad = cpu::quantize_per_token(pick_isa(isa), x.data_ptr(), dt, M, K, q.data_ptr<int8_t>(),
                                  s.data_ptr<float>(), torch_parallel_for);
  }
  raise_nonfinite(op, bad);
  return {q, s};
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                       const c10::optional<at::Tensor>& bias, int64_t isa) {
  const char* op = "int8_linear";
  check_x(op, x);
  auto dt = dtype_of(op, x);
  TORCH_CHECK_VALUE(w_q.device().is_cpu() && w_q.scalar_type() == at::kChar && w_q.dim() == 2 &&
                        w_q.is_contiguous() && w_q.size(0) >= 1,
                    "pysparse.int8_linear: w_q must be a contiguous CPU int8 [N, K] tensor");
  const int64_t M = x.size(0), K = x.size(1), N = w_q.size(0);
  TORCH_CHECK_VALUE(w_q.size(1) == K, "pysparse.int8_linear: x has K=", K, " but w_q is ",
                    w_q.sizes());
  check_vec(op, "w_scale", w_scale, N);
  const float* bptr = bias_ptr(op, bias, N);
  auto y = at::empty({M, N}, x.options());
  int64_t bad;
  {
    pybind11::gil_scoped_release nogil;
    bad = cpu::int8_linear(pick_isa(isa), x.data_ptr(), dt, M, K, w_q.data_ptr<int8_t>(),
                           w_scale.data_ptr<float>(), bptr, N, y.data_ptr(), torch_parallel_for);
  }
  raise_nonfinite(op, bad);
  return y;
}

at::Tensor int8_gemm_s32(const at::Tensor& xq, const at::Tensor& w_q, int64_t isa) {
  TORCH_CHECK_VALUE(xq.device().is_cpu() && w_q.device().is_cpu() &&
                        xq.scalar_type() == at::kChar && w_q.scalar_type() == at::kChar &&
                        xq.dim() == 2 && w_q.dim() == 2 && xq.is_contiguous() &&
                        w_q.is_contiguous() && xq.size(1) == w_q.size(1) && xq.size(0) >= 1 &&
                        w_q.size(0) >= 1 && xq.size(1) >= 1,
                    "pysparse.int8_gemm_s32: expects contiguous CPU int8 [M, K] and [N, K]");
  auto acc = at::empty({xq.size(0), w_q.size(0)}, xq.options().dtype(at::kInt));
  {
    pybind11::gil_scoped_release nogil;
    cpu::int8_gemm_s32(pick_isa(isa), xq.data_ptr<int8_t>(), xq.size(0), xq.size(1),
                       w_q.data_ptr<int8_t>(), w_q.size(0), acc.data_ptr<int32_t>(),
                       torch_parallel_for);
  }
  return acc;
}

// W8A8 linear on a vnni16-packed weight (layout and contract in cpu/kernels.h). The packed
// buffer carries no shape, so N is passed and every size is checked against it: a buffer
// of the wrong size is rejected before any kernel could read past it.
at::Tensor int8_linear_packed(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_colsum,
                              const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, int64_t N,
                              int64_t isa) {
  const char* op = "int8_linear_packed";
  check_x(op, x);
  auto dt = dtype_of(op, x);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(w_packed.device().is_cpu() && w_packed.scalar_type() == at::kChar &&
                        w_packed.is_contiguous(),
                    "pysparse.int8_linear_packed: w_packed must be a contiguous CPU int8 tensor "
                    "(vnni16 layout, e.g. [Np/16, Kp/4, 64]), got ", w_packed.scalar_type(), " ",
                    w_packed.sizes());
  const int64_t numel = w_packed.numel(), Kp = (K + 3) / 4 * 4;
  // N <= numel first, so that Np = ceil(N/16)*16 cannot overflow; Np*Kp == numel is then
  // tested by division (no overflow either).
  TORCH_CHECK_VALUE(N >= 1 && N <= numel && numel % Kp == 0 && numel / Kp == (N + 15) / 16 * 16,
                    "pysparse.int8_linear_packed: w_packed has ", numel,
                    " elements, but a vnni16-packed weight with N=", N, " and K=", K,
                    " (from x) has ceil(N/16)*16 * ceil(K/4)*4 = ",
                    N >= 1 && N <= numel ? (N + 15) / 16 * 16 * Kp : int64_t(-1),
                    " (N must be >= 1)");
  TORCH_CHECK_VALUE(w_colsum.device().is_cpu() && w_colsum.scalar_type() == at::kInt &&
                        w_colsum.dim() == 1 && w_colsum.is_contiguous() && w_colsum.size(0) >= N,
                    "pysparse.int8_linear_packed: w_colsum must be a contiguous CPU int32 [>= ", N,
                    "] tensor, got ", w_colsum.scalar_type(), " ", w_colsum.sizes());
  check_vec(op, "w_scale", w_scale, N);
  const float* bptr = bias_ptr(op, bias, N);
  auto y = at::empty({M, N}, x.options());
  int64_t bad;
  {
    pybind11::gil_scoped_release nogil;
    bad = cpu::int8_linear_packed(pick_isa(isa), x.data_ptr(), dt, M, K, w_packed.data_ptr<int8_t>(),
                                  w_colsum.data_ptr<int32_t>(), w_scale.data_ptr<float>(), bptr, N,
                                  y.data_ptr(), torch_parallel_for);
  }
  raise_nonfinite(op, bad);
  return y;
}

std::tuple<at::Tensor, at::Tensor> pack_int8_vnni16(const at::Tensor& w_q) {
  TORCH_CHECK_VALUE(w_q.device().is_cpu() && w_q.scalar_type() == at::kChar && w_q.dim() == 2 &&
                        w_q.is_contiguous() && w_q.size(0) >= 1 && w_q.size(1) >= 1,
                    "pysparse.pack_int8_vnni16: w_q must be a non-empty contiguous CPU int8 [N, K] "
                    "tensor, got ", w_q.scalar_type(), " ", w_q.sizes());
  const int64_t N = w_q.size(0), K = w_q.size(1);
  const int64_t Np = (N + 15) / 16 * 16, Kp = (K + 3) / 4 * 4;
  auto packed = at::empty({Np / 16, Kp / 4, 64}, w_q.options());
  auto colsum = at::empty({Np}, w_q.options().dtype(at::kInt));
  {
    pybind11::gil_scoped_release nogil;
    cpu::pack_int8_vnni16(w_q.data_ptr<int8_t>(), N, K, packed.data_ptr<int8_t>(),
                          colsum.data_ptr<int32_t>());
  }
  return {packed, colsum};
}

// ---------------------------------------------------------------- 2:4 sparse
void check_sparse_meta(const char* op, const at::Tensor& values, const at::Tensor& meta, int64_t K) {
  TORCH_CHECK_VALUE(K >= 4 && K % 4 == 0, "pysparse.", op, ": K must be a positive multiple of 4, got ", K);
  TORCH_CHECK_VALUE(values.device().is_cpu() && values.dim() == 2 && values.is_contiguous() &&
                        values.size(0) >= 1 && values.size(1) == K / 2,
                    "pysparse.", op, ": values must be a contiguous CPU [N, ", K / 2, "] tensor, got ",
                    values.sizes());
  TORCH_CHECK_VALUE(meta.device().is_cpu() && meta.scalar_type() == at::kByte && meta.is_contiguous() &&
                        meta.dim() == 2 && meta.size(0) == values.size(0) && meta.size(1) == (K + 7) / 8,
                    "pysparse.", op, ": meta must be a contiguous CPU uint8 [", values.size(0), ", ",
                    (K + 7) / 8, "] tensor, got ", meta.scalar_type(), " ", meta.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_sparse24_int8(const at::Tensor& values,
                                                                  const at::Tensor& meta, int64_t K) {
  const char* op = "pack_sparse24_int8";
  check_sparse_meta(op, values, meta, K);
  TORCH_CHECK_VALUE(values.scalar_type() == at::kChar, "pysparse.", op, ": values must be int8");
  const int64_t N = values.size(0), NB = (N + 15) / 16, KB = (K + 7) / 8;
  auto pv = at::empty({NB, KB, 64}, values.options());
  auto pc = at::empty({NB, KB, 16}, meta.options());
  auto cs = at::empty({NB * 16}, values.options().dtype(at::kInt));
  {
    pybind11::gil_scoped_release nogil;
    cpu::pack_sparse24_int8(values.data_ptr<int8_t>(), meta.data_ptr<uint8_t>(), N, K, pv.data_ptr<int8_t>(),
                            pc.data_ptr<uint8_t>(), cs.data_ptr<int32_t>());
  }
  return {pv, pc, cs};
}

std::tuple<at::Tensor, at::Tensor> pack_sparse24_float(const at::Tensor& values, const at::Tensor& meta,
                                                       int64_t K) {
  const char* op = "pack_sparse24_float";
  check_sparse_meta(op, values, meta, K);
  const auto vdt = dtype_of(op, values);
  const int64_t N = values.size(0), NB = (N + 15) / 16, G = K / 4;
  auto pv = at::empty({NB, G, 32}, values.options());
  auto pc = at::empty({NB, G}, values.options().dtype(at::kLong));
  {
    pybind11::gil_scoped_release nogil;
    cpu::pack_sparse24_float(values.data_ptr(), vdt, meta.data_ptr<uint8_t>(), N, K, pv.data_ptr(),
                             reinterpret_cast<uint64_t*>(pc.data_ptr<int64_t>()));
  }
  return {pv, pc};
}

void check_packed(const char* op, const at::Tensor& t, at::ScalarType st, int64_t want, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == st && t.is_contiguous() && t.numel() == want,
                    "pysparse.", op, ": ", what, " must be a contiguous CPU ", c10::toString(st), " tensor of ",
                    want, " elements (from N and x's K), got ", t.scalar_type(), " ", t.sizes());
}

at::Tensor sparse24_int8_linear_packed(const at::Tensor& x, const at::Tensor& w_values, const at::Tensor& w_codes,
                                       const at::Tensor& w_colsum, const at::Tensor& w_scale,
                                       const c10::optional<at::Tensor>& bias, int64_t N, int64_t isa) {
  const char* op = "sparse24_int8_linear_packed";
  check_x(op, x);
  auto dt = dtype_of(op, x);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(K % 4 == 0, "pysparse.", op, ": K (x.shape[-1]) must be a multiple of 4, got ", K);
  TORCH_CHECK_VALUE(N >= 1 && N <= w_values.numel(), "pysparse.", op, ": bad N=", N);
  const int64_t NB = (N + 15) / 16, KB = (K + 7) / 8;
  check_packed(op, w_values, at::kChar, NB * KB * 64, "w_values");
  check_packed(op, w_codes, at::kByte, NB * KB * 16, "w_codes");
  check_packed(op, w_colsum, at::kInt, NB * 16, "w_colsum");
  check_vec(op, "w_scale", w_scale, N);
  const float* bptr = bias_ptr(op, bias, N);
  auto y = at::empty({M, N}, x.options());
  int64_t bad;
  {
    pybind11::gil_scoped_release nogil;
    bad = cpu::sparse24_int8_linear_packed(pick_isa(isa), x.data_ptr(), dt, M, K, w_values.data_ptr<int8_t>(),
                                           w_codes.data_ptr<uint8_t>(), w_colsum.data_ptr<int32_t>(),
                                           w_scale.data_ptr<float>(), bptr, N, y.data_ptr(), torch_parallel_for);
  }
  raise_nonfinite(op, bad);
  return y;
}

at::Tensor sparse24_linear_packed(const at::Tensor& x, const at::Tensor& w_values, const at::Tensor& w_codes,
                                  const c10::optional<at::Tensor>& bias, int64_t N, int64_t isa) {
  const char* op = "sparse24_linear_packed";
  check_x(op, x);
  auto dt = dtype_of(op, x);
  const auto vdt = dtype_of(op, w_values);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(K % 4 == 0, "pysparse.", op, ": K (x.shape[-1]) must be a multiple of 4, got ", K);
  TORCH_CHECK_VALUE(N >= 1 && N <= w_values.numel(), "pysparse.", op, ": bad N=", N);
  const int64_t NB = (N + 15) / 16, G = K / 4;
  check_packed(op, w_values, w_values.scalar_type(), NB * G * 32, "w_values");
  check_packed(op, w_codes, at::kLong, NB * G, "w_codes");
  const float* bptr = bias_ptr(op, bias, N);
  auto y = at::empty({M, N}, x.options());
  int64_t bad;
  {
    pybind11::gil_scoped_release nogil;
    bad = cpu::sparse24_linear_packed(pick_isa(isa), x.data_ptr(), dt, M, K, w_values.data_ptr(), vdt,
                                      reinterpret_cast<const uint64_t*>(w_codes.data_ptr<int64_t>()), bptr, N,
                                      y.data_ptr(), torch_parallel_for);
  }
  TORCH_CHECK_VALUE(bad < 0, "pysparse.", op, ": x contains NaN or Inf (first at token row ", bad,
                    "); a 2:4 kernel never multiplies the activations that meet pruned weights, so "
                    "non-finite activations are refused instead of giving a result that differs "
                    "from the dense product");
  return y;
}

// q [B,Hq,Sq,D], k/v [B,Hkv,Sk,D] (any strides, unit stride along D), bias: optional additive
// fp32 mask viewed as [B,Hq,Sq,Sk] (stride 0 where broadcast, unit stride along keys).
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& bias, bool causal, double scale, int64_t isa) {
  const char* op = "attention";
  const auto dt = dtype_of(op, q);
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->dim() == 4 && t->scalar_type() == q.scalar_type(), "pysparse.",
                      op, ": q, k, v must be 4-D CPU tensors of one dtype");
    TORCH_CHECK_VALUE(t->stride(3) == 1 || t->size(3) == 1, "pysparse.", op,
                      ": the CPU kernel needs unit stride along head_dim");
  }
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hkv >= 1 && Hq % Hkv == 0,
                    "pysparse.", op, ": k and v must be [B, Hkv, Sk, D] with Hq % Hkv == 0");
  TORCH_CHECK_VALUE(B >= 1 && Hq >= 1 && Sq >= 1 && Sk >= 1 && D >= 1, "pysparse.", op,
                    ": the CPU kernel needs non-empty q, k, v");
  cpu::AttentionArgs a{};
  a.q = q.data_ptr(); a.k = k.data_ptr(); a.v = v.data_ptr(); a.dt = dt;
  a.B = B; a.Hq = Hq; a.Hkv = Hkv; a.Sq = Sq; a.Sk = Sk; a.D = D;
  for (int i = 0; i < 3; ++i) {
    a.qs[i] = q.stride(i); a.ks[i] = k.stride(i); a.vs[i] = v.stride(i);
  }
  if (bias.has_value()) {
    const at::Tensor& m = *bias;
    TORCH_CHECK_VALUE(m.device().is_cpu() && m.scalar_type() == at::kFloat && m.dim() == 4 && m.size(0) == B &&
                          m.size(1) == Hq && m.size(2) == Sq && m.size(3) == Sk && (m.stride(3) == 1 || Sk == 1),
                      "pysparse.", op, ": bias must be an fp32 [B, Hq, Sq, Sk] view with unit stride along keys");
    a.bias = m.data_ptr<float>();
    for (int i = 0; i < 3; ++i) a.bs[i] = m.stride(i);
  }
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  auto out = at::empty({B, Hq, Sq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  a.out = out.data_ptr();
  {
    pybind11::gil_scoped_release nogil;
    cpu::attention_fwd(pick_isa(isa), a, torch_parallel_for);
  }
  return out;
}

std::string attention_kernel(int64_t isa, const std::string& dtype) {
  TORCH_CHECK_VALUE(dtype == "float32" || dtype == "bfloat16", "pysparse.attention_kernel: dtype is float32 or bfloat16");
  return cpu::attention_kernel_name(pick_isa(isa), dtype == "bfloat16" ? cpu::kBF16 : cpu::kF32);
}

double int8_peak_gops(int64_t isa, double seconds) {
  TORCH_CHECK_VALUE(seconds > 0 && seconds <= 10, "pysparse.int8_peak_gops: seconds must be in (0, 10], got ",
                    seconds);
  pybind11::gil_scoped_release nogil;
  return cpu::int8_peak_gops(pick_isa(isa), seconds);
}

pybind11::dict info() {
  pybind11::dict d;
  d["detected_isa"] = cpu::isa_name(cpu::detected_isa());
  d["active_isa"] = cpu::isa_name(cpu::active_isa());
  d["features"] = cpu::cpu_features();
  d["isa_error"] = cpu::isa_error();
  // Which 2:4 kernel runs at the active ISA: the gather kernels (AVX-512 + VBMI, vdpbf16ps for
  // bf16 x bf16 where AVX512-BF16 exists) or the expand-to-dense fallback.
  d["sparse24"] = cpu::has_sparse_gather()
                      ? (cpu::has_avx512_bf16() ? "gather (vpermb+vpdpbusd, vpermw+vdpbf16ps)" : "gather (vpermb+vpdpbusd, fp32 fma)")
                      : "expand to dense per column block";
  d["attention"] = std::string("bf16: ") + cpu::attention_kernel_name(cpu::active_isa(), cpu::kBF16) +
                   "; fp32: " + cpu::attention_kernel_name(cpu::active_isa(), cpu::kF32);
#ifdef _OPENMP
  d["parallel"] = true;  // at::parallel_for really forks (ATen's OpenMP backend is header-inline)
#else
  d["parallel"] = false;  // built without -fopenmp: every kernel would run on one thread
#endif
  return d;
}

int isa_id(const std::string& name) {
  for (int i = cpu::kRef; i <= cpu::kAmx; ++i)
    if (name == cpu::isa_name(static_cast<cpu::Isa>(i))) return i;
  TORCH_CHECK_VALUE(false, "pysparse: unknown ISA '", name, "' (ref, avx2, avx512_vnni, amx)");
  return -1;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "pysparse CPU kernels (contracts in csrc/cpu/kernels.h)";
  m.def("info", &info, "ISA detected / active, CPU features, PYSPARSE_CPU_ISA problems");
  m.def("isa_id", &isa_id, "ISA name -> id (ref=0, avx2=1, avx512_vnni=2, amx=3)");
  m.def("quantize_per_token", &quantize_per_token, py::arg("x"), py::arg("isa") = -1);
  m.def("int8_linear", &int8_linear, py::arg("x"), py::arg("w_q"), py::arg("w_scale"),
        py::arg("bias"), py::arg("isa") = -1);
  m.def("int8_gemm_s32", &int8_gemm_s32, py::arg("xq"), py::arg("w_q"), py::arg("isa") = -1);
  m.def("int8_linear_packed", &int8_linear_packed, py::arg("x"), py::arg("w_packed"), py::arg("w_colsum"),
        py::arg("w_scale"), py::arg("bias"), py::arg("N"), py::arg("isa") = -1,
        "W8A8 linear on a vnni16-packed weight; y bitwise equal to int8_linear on the weight it was packed from");
  m.def("pack_int8_vnni16", &pack_int8_vnni16, py::arg("w_q"),
        "int8 [N, K] -> (packed int8 [Np/16, Kp/4, 64], colsum int32 [Np]) in the vnni16 layout");
  m.def("pack_sparse24_int8", &pack_sparse24_int8, py::arg("values"), py::arg("meta"), py::arg("K"),
        "canonical 2:4 int8 -> (values [Np/16, Kb, 64], codes uint8 [Np/16, Kb, 16], colsum int32 [Np])");
  m.def("pack_sparse24_float", &pack_sparse24_float, py::arg("values"), py::arg("meta"), py::arg("K"),
        "canonical 2:4 fp32/bf16 -> (values [Np/16, K/4, 32], codes int64 [Np/16, K/4])");
  m.def("sparse24_int8_linear_packed", &sparse24_int8_linear_packed, py::arg("x"), py::arg("w_values"),
        py::arg("w_codes"), py::arg("w_colsum"), py::arg("w_scale"), py::arg("bias"), py::arg("N"),
        py::arg("isa") = -1);
  m.def("sparse24_linear_packed", &sparse24_linear_packed, py::arg("x"), py::arg("w_values"), py::arg("w_codes"),
        py::arg("bias"), py::arg("N"), py::arg("isa") = -1);
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("bias"), py::arg("causal"),
        py::arg("scale"), py::arg("isa") = -1, "flash-attention forward (contract in csrc/cpu/kernels.h)");
  m.def("attention_kernel", &attention_kernel, py::arg("isa") = -1, py::arg("dtype") = "bfloat16",
        "which attention kernel runs for an ISA and dtype");
  m.def("int8_peak_gops", &int8_peak_gops, py::arg("isa") = -1, py::arg("seconds") = 0.25,
        "measured single-thread int8 MAC peak of an ISA path, GOP/s");
}
