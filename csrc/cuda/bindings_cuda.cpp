// The one torch translation unit of pysparse._C_cuda: checks tensors (op-prefixed messages),
// takes raw pointers and the current CUDA stream, calls the launchers of kernels.h. Registers
// the ops in their own namespace, torch.ops.pysparse_cuda.*; pysparse/ops/backends/cuda.py wraps
// them (weight re-packing, fallbacks to the reference) behind the public pysparse:: ops.
#include <cmath>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "attention.h"
#include "kernels.h"

namespace pc = pysparse_cuda;

namespace {

void check_cuda(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                int64_t ndim) {
  TORCH_CHECK_VALUE(t.is_cuda(), "pysparse_cuda.", op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, "pysparse_cuda.", op, ": ", name, " must be ",
                    dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == ndim && t.is_contiguous(), "pysparse_cuda.", op, ": ", name,
                    " must be a contiguous ", ndim, "-D tensor, got shape ", t.sizes());
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "pysparse_cuda.", op,
                    ": ", name, " must be 16-byte aligned");
}

void check_same_device(const char* op, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "pysparse_cuda.", op,
                    ": all tensors must be on one device, got ", a.device(), " and ", b.device());
}

pc::DType to_dtype(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return pc::kF32;
    case at::kHalf: return pc::kF16;
    case at::kBFloat16: return pc::kBF16;
    default: break;
  }
  TORCH_CHECK_VALUE(false, "pysparse_cuda.", op, ": unsupported dtype ", t);
  return pc::kF32;
}

void check_vec(const char* op, const char* name, const at::Tensor& t, int64_t n,
               const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.scalar_type() == at::kFloat && t.dim() == 1 &&
                        t.size(0) == n && t.is_contiguous(),
                    "pysparse_cuda.", op, ": ", name, " must be a contiguous fp32 [", n,
                    "] CUDA tensor");
  check_same_device(op, t, like);
}

const float* bias_ptr(const char* op, const c10::optional<at::Tensor>& bias, int64_t n,
                      const at::Tensor& like) {
  if (!bias.has_value()) return nullptr;
  check_vec(op, "bias", *bias, n, like);
  return bias->data_ptr<float>();
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "pysparse_cuda.", op, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

void check_meta(const char* op, const at::Tensor& meta, int64_t N, int64_t K, int64_t words,
                int64_t kstep, const at::Tensor& like) {
  check_cuda(op, "meta", meta, at::kInt, 3);
  check_same_device(op, meta, like);
  const int64_t nt = (N + 63) / 64 * 4, kt = 2 * ((K + 2 * kstep - 1) / (2 * kstep));
  TORCH_CHECK_VALUE(meta.size(0) == nt && meta.size(1) == kt && meta.size(2) == words,
                    "pysparse_cuda.", op, ": meta must be the pack_cuda_meta words [", nt, ", ",
                    kt, ", ", words, "] for N=", N, ", K=", K, ", got ", meta.sizes());
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x) {
  const char* op = "quantize_per_token";
  TORCH_CHECK_VALUE(x.is_cuda() && x.dim() == 2 && x.is_contiguous() && x.size(1) >= 1,
                    "pysparse_cuda.", op, ": x must be a contiguous 2-D CUDA tensor [M, K]");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto s = at::empty({M}, x.options().dtype(at::kFloat));
  check_launch(op, pc::quantize_per_token(x.data_ptr(), to_dtype(op, x.scalar_type()), K, M, K,
                                          q.data_ptr<int8_t>(), s.data_ptr<float>(),
                                          c10::cuda::getCurrentCUDAStream().stream()));
  return {q, s};
}

at::Tensor int8_gemm(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& w_q,
                     const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                     at::ScalarType out_dtype) {
  const char* op = "int8_gemm";
  check_cuda(op, "xq", xq, at::kChar, 2);
  check_cuda(op, "w_q", w_q, at::kChar, 2);
  check_same_device(op, xq, w_q);
  const int64_t M = xq.size(0), K = xq.size(1), N = w_q.size(0);
  TORCH_CHECK_VALUE(w_q.size(1) == K && N >= 1 && K % 16 == 0, "pysparse_cuda.", op,
                    ": need w_q [N, K] matching xq [M, K] with K % 16 == 0, got ", w_q.sizes(),
                    " and ", xq.sizes());
  check_vec(op, "x_scale", x_scale, M, xq);
  check_vec(op, "w_scale", w_scale, N, xq);
  const float* b = bias_ptr(op, bias, N, xq);
  const c10::cuda::CUDAGuard guard(xq.device());
  auto y = at::empty({M, N}, xq.options().dtype(out_dtype));
  check_launch(op, pc::int8_gemm(xq.data_ptr<int8_t>(), x_scale.data_ptr<float>(),
                                 w_q.data_ptr<int8_t>(), w_scale.data_ptr<float>(), b, M, N, K,
                                 y.data_ptr(), to_dtype(op, out_dtype), N,
                                 c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

at::Tensor sparse24_gemm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                         const c10::optional<at::Tensor>& bias) {
  const char* op = "sparse24_gemm";
  TORCH_CHECK_VALUE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                    "pysparse_cuda.", op, ": x must be float16 or bfloat16, got ",
                    x.scalar_type());
  check_cuda(op, "x", x, x.scalar_type(), 2);
  check_cuda(op, "values", values, x.scalar_type(), 2);
  check_same_device(op, x, values);
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  TORCH_CHECK_VALUE(values.size(1) * 2 == K && N >= 1 && K % 16 == 0, "pysparse_cuda.", op,
                    ": need values [N, K/2] matching x [M, K] with K % 16 == 0, got ",
                    values.sizes(), " and ", x.sizes());
  check_meta(op, meta, N, K, 16, 32, x);
  const float* b = bias_ptr(op, bias, N, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({M, N}, x.options());
  check_launch(op, pc::sparse24_gemm(x.data_ptr(), K, values.data_ptr(),
                                     reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>()),
                                     b, M, N, K, to_dtype(op, x.scalar_type()), y.data_ptr(), N,
                                     c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

at::Tensor sparse24_int8_gemm(const at::Tensor& xq, const at::Tensor& x_scale,
                              const at::Tensor& values_q, const at::Tensor& meta,
                              const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                              at::ScalarType out_dtype) {
  const char* op = "sparse24_int8_gemm";
  check_cuda(op, "xq", xq, at::kChar, 2);
  check_cuda(op, "values_q", values_q, at::kChar, 2);
  check_same_device(op, xq, values_q);
  const int64_t M = xq.size(0), K = xq.size(1), N = values_q.size(0);
  TORCH_CHECK_VALUE(values_q.size(1) * 2 == K && N >= 1 && K % 32 == 0, "pysparse_cuda.", op,
                    ": need values_q [N, K/2] matching xq [M, K] with K % 32 == 0, got ",
                    values_q.sizes(), " and ", xq.sizes());
  check_meta(op, meta, N, K, 32, 64, xq);
  check_vec(op, "x_scale", x_scale, M, xq);
  check_vec(op, "w_scale", w_scale, N, xq);
  const float* b = bias_ptr(op, bias, N, xq);
  const c10::cuda::CUDAGuard guard(xq.device());
  auto y = at::empty({M, N}, xq.options().dtype(out_dtype));
  check_launch(op, pc::sparse24_int8_gemm(
                       xq.data_ptr<int8_t>(), x_scale.data_ptr<float>(),
                       values_q.data_ptr<int8_t>(),
                       reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>()),
                       w_scale.data_ptr<float>(), b, M, N, K, y.data_ptr(),
                       to_dtype(op, out_dtype), N, c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}


// Flash-attention forward (attention.h has the contract). The Python wrapper sends here only
// what the kernel takes (fp16/bf16, head_dim 64/128, sm_80+); this re-checks and makes the
// layouts it needs (16-byte-multiple strides, a mask contiguous along keys).
at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                     const c10::optional<at::Tensor>& mask_in, bool causal,
                     c10::optional<double> scale) {
  const char* op = "attention";
  TORCH_CHECK_VALUE(q_in.is_cuda() && q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
                    "pysparse_cuda.", op, ": q, k, v must be 4-D CUDA tensors");
  TORCH_CHECK_VALUE(q_in.scalar_type() == k_in.scalar_type() &&
                        q_in.scalar_type() == v_in.scalar_type() &&
                        (q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16),
                    "pysparse_cuda.", op, ": q, k, v must share one dtype, fp16 or bf16");
  check_same_device(op, q_in, k_in);
  check_same_device(op, q_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto q = q_in.stride(3) == 1 && q_in.stride(2) % 8 == 0 ? q_in : q_in.contiguous();
  auto k = k_in.stride(3) == 1 && k_in.stride(2) % 8 == 0 ? k_in : k_in.contiguous();
  auto v = v_in.stride(3) == 1 && v_in.stride(2) % 8 == 0 ? v_in : v_in.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == Sk &&
                        k.size(3) == D && v.size(3) == D && Hkv > 0 && Hq % Hkv == 0,
                    "pysparse_cuda.", op, ": shapes q ", q.sizes(), ", k ", k.sizes(), ", v ",
                    v.sizes(), " do not match [B, Hq, Sq, D], [B, Hkv, Sk, D] with Hq % Hkv == 0");
  auto o = at::empty({B, Hq, Sq, D}, q.options());
  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = o.data_ptr();
  p.dtype = q.scalar_type() == at::kHalf ? AttnDType::kFloat16 : AttnDType::kBFloat16;
  p.batch = static_cast<int32_t>(B);
  p.heads_q = static_cast<int32_t>(Hq);
  p.heads_kv = static_cast<int32_t>(Hkv);
  p.seq_q = static_cast<int32_t>(Sq);
  p.seq_k = static_cast<int32_t>(Sk);
  p.head_dim = static_cast<int32_t>(D);
  p.q_stride_b = q.stride(0); p.q_stride_h = q.stride(1); p.q_stride_s = q.stride(2);
  p.k_stride_b = k.stride(0); p.k_stride_h = k.stride(1); p.k_stride_s = k.stride(2);
  p.v_stride_b = v.stride(0); p.v_stride_h = v.stride(1); p.v_stride_s = v.stride(2);
  p.o_stride_b = o.stride(0); p.o_stride_h = o.stride(1); p.o_stride_s = o.stride(2);
  p.mask = nullptr;
  p.mask_kind = AttnMaskKind::kNone;
  at::Tensor mask;  // keeps a converted mask alive until the launch is queued
  if (mask_in.has_value()) {
    mask = *mask_in;
    check_same_device(op, q, mask);
    TORCH_CHECK_VALUE(mask.dim() <= 4, "pysparse_cuda.", op, ": mask must have <= 4 dims");
    if (mask.scalar_type() == at::kDouble) mask = mask.to(at::kFloat);
    // contiguous along keys: a mask broadcast along keys ([..., 1]) is materialised to Sk
    while (mask.dim() < 4) mask = mask.unsqueeze(0);
    if (mask.size(3) != Sk || mask.stride(3) != 1)
      mask = mask.expand({mask.size(0), mask.size(1), mask.size(2), Sk}).contiguous();
    const auto e = mask.expand({B, Hq, Sq, Sk});
    switch (mask.scalar_type()) {
      case at::kBool: p.mask_kind = AttnMaskKind::kKeepBool; break;
      case at::kHalf: p.mask_kind = AttnMaskKind::kAddF16; break;
      case at::kBFloat16: p.mask_kind = AttnMaskKind::kAddBF16; break;
      case at::kFloat: p.mask_kind = AttnMaskKind::kAddF32; break;
      default: TORCH_CHECK_VALUE(false, "pysparse_cuda.", op, ": unsupported mask dtype ",
                                 mask.scalar_type());
    }
    p.mask = mask.data_ptr();
    p.mask_stride_b = e.stride(0); p.mask_stride_h = e.stride(1);
    p.mask_stride_q = e.stride(2); p.mask_stride_k = Sk > 1 ? e.stride(3) : 1;
  }
  p.causal = causal;
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(double(D)));
  const char* why = pysparse_attention::attention_unsupported(p);
  TORCH_CHECK_VALUE(why == nullptr, "pysparse_cuda.", op, ": ", why ? why : "");
  check_launch(op, pysparse_attention_fwd(p, c10::cuda::getCurrentCUDAStream().stream()));
  return o;
}
}  // namespace

TORCH_LIBRARY(pysparse_cuda, m) {
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  m.def("int8_gemm(Tensor xq, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, "
        "ScalarType out_dtype) -> Tensor");
  m.def("sparse24_gemm(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor");
  m.def("sparse24_int8_gemm(Tensor xq, Tensor x_scale, Tensor values_q, Tensor meta, "
        "Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float? scale) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(pysparse_cuda, CUDA, m) {
  m.impl("quantize_per_token", &quantize_per_token);
  m.impl("int8_gemm", &int8_gemm);
  m.impl("sparse24_gemm", &sparse24_gemm);
  m.impl("sparse24_int8_gemm", &sparse24_int8_gemm);
  m.impl("attention", &attention);
}

// importing pysparse._C_cuda runs the registrations above
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "pysparse CUDA kernels (torch.ops.pysparse_cuda)"; }
