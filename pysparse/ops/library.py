"""Every pysparse op schema, each with its fake (meta) implementation right below it.

Backends (``pysparse/ops/backends/``) only implement; the reference in ``reference.py`` defines
the semantics. Shapes: ``x`` is ``[..., K]``; weights are ``[N, K]`` in the formats of
DESIGN.md; outputs have ``x``'s dtype and shape ``[..., N]``.
"""
import torch

NAMESPACE = "pysparse"
OPS = ("quantize_per_token", "int8_linear", "int8_linear_packed", "sparse24_linear",
       "sparse24_linear_packed", "sparse24_int8_linear", "sparse24_int8_linear_packed", "attention",
       "int8_linear_static")

# x [..., K] float -> q int8 [..., K], scale fp32 [...]:  x ≈ q * scale[..., None]
torch.library.define("pysparse::quantize_per_token", "(Tensor x) -> (Tensor, Tensor)")


@torch.library.register_fake("pysparse::quantize_per_token")
def _(x):
    return (torch.empty_like(x, dtype=torch.int8, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


# W8A8: x [..., K] fp32/bf16/fp16, w_q int8 [N, K], w_scale fp32 [N], bias [N] -> [..., N]
torch.library.define("pysparse::int8_linear",
                     "(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias) -> Tensor")


@torch.library.register_fake("pysparse::int8_linear")
def _(x, w_q, w_scale, bias):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


# W8A8 on a CPU-packed weight (formats.int8.pack_vnni16): w_packed int8 [Np/16, Kp/4, 64],
# w_colsum int32 [Np]; N = w_scale.shape[0], K = x.shape[-1]. Same result as int8_linear.
torch.library.define(
    "pysparse::int8_linear_packed",
    "(Tensor x, Tensor w_packed, Tensor w_colsum, Tensor w_scale, Tensor? bias) -> Tensor")


@torch.library.register_fake("pysparse::int8_linear_packed")
def _(x, w_packed, w_colsum, w_scale, bias):
    return x.new_empty((*x.shape[:-1], w_scale.shape[0]))


# 2:4 sparse: values [N, K/2] (x's float dtype), meta uint8 [N, ceil(K/8)]
torch.library.define("pysparse::sparse24_linear",
                     "(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor")


@torch.library.register_fake("pysparse::sparse24_linear")
def _(x, values, meta, bias):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


# 2:4 on a CPU-packed weight (formats.sparse24.pack_cpu_float, "sp24f"): w_values fp32/bf16
# [Np/16, K/4, 32], w_codes int64 [Np/16, K/4]; K = x.shape[-1]. Same result as sparse24_linear.
torch.library.define(
    "pysparse::sparse24_linear_packed",
    "(Tensor x, Tensor w_values, Tensor w_codes, Tensor? bias, SymInt N) -> Tensor")


@torch.library.register_fake("pysparse::sparse24_linear_packed")
def _(x, w_values, w_codes, bias, N):
    return x.new_empty((*x.shape[:-1], N))


# 2:4 + W8A8: values_q int8 [N, K/2], meta uint8 [N, ceil(K/8)], w_scale fp32 [N]
torch.library.define(
    "pysparse::sparse24_int8_linear",
    "(Tensor x, Tensor values_q, Tensor meta, Tensor w_scale, Tensor? bias) -> Tensor")


@torch.library.register_fake("pysparse::sparse24_int8_linear")
def _(x, values_q, meta, w_scale, bias):
    return x.new_empty((*x.shape[:-1], values_q.shape[0]))


# q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (Hq % Hkv == 0); mask bool (True = keep) or additive,
# broadcastable to [B, Hq, Sq, Sk]; causal is aligned bottom-right; -> [B, Hq, Sq, D]
torch.library.define(
    "pysparse::attention",
    "(Tensor q, Tensor k, Tensor v, Tensor? mask=None, bool causal=False, float? scale=None)"
    " -> Tensor")


@torch.library.register_fake("pysparse::attention")
def _(q, k, v, mask=None, causal=False, scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# 2:4 + W8A8 on a CPU-packed weight (formats.sparse24.pack_cpu_int8, "sp24i8"): w_values int8
# [Np/16, Kb, 64], w_codes uint8 [Np/16, Kb, 16], w_colsum int32 [Np]; N = w_scale.shape[0].
torch.library.define(
    "pysparse::sparse24_int8_linear_packed",
    "(Tensor x, Tensor w_values, Tensor w_codes, Tensor w_colsum, Tensor w_scale, Tensor? bias) "
    "-> Tensor")


@torch.library.register_fake("pysparse::sparse24_int8_linear_packed")
def _(x, w_values, w_codes, w_colsum, w_scale, bias):
    return x.new_empty((*x.shape[:-1], w_scale.shape[0]))


# Autograd for attention: the forward runs the fused kernel of the device (nothing of size
# Sq x Sk is kept); the backward recomputes the reference with autograd from the saved inputs,
# so gradients are those of softmax(q k^T * scale + mask) v exactly (a fused backward kernel is
# future work: this one materialises the scores once per backward call).
def _attention_setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.causal, ctx.scale = causal, scale


def _attention_backward(ctx, grad):
    from . import reference
    q, k, v, mask = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:4])
    if mask is None or not mask.is_floating_point():
        need[3] = False
    with torch.enable_grad():
        args = [t.detach().requires_grad_(n) if t is not None else None
                for t, n in zip((q, k, v, mask), need)]
        out = reference.attention(*args, ctx.causal, ctx.scale)
        wrt = [a for a, n in zip(args, need) if n]
        grads = iter(torch.autograd.grad(out, wrt, grad)) if wrt else iter(())
    return tuple(next(grads) if n else None for n in need) + (None, None)


torch.library.register_autograd("pysparse::attention", _attention_backward,
                                setup_context=_attention_setup_context)


# W8A8 with a *static* activation scale (pysparse.calibrate): x [..., K] fp32/bf16/fp16, w_q int8
# [N, K], w_scale fp32 [N], x_scale fp32 with one element (per-tensor), bias [N], x_zero None
# (symmetric int8) or one int32/uint8 uint8-zero-point (asymmetric) -> [..., N]
torch.library.define(
    "pysparse::int8_linear_static",
    "(Tensor x, Tensor w_q, Tensor w_scale, Tensor x_scale, Tensor? bias, Tensor? x_zero=None)"
    " -> Tensor")


@torch.library.register_fake("pysparse::int8_linear_static")
def _(x, w_q, w_scale, x_scale, bias, x_zero=None):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))
