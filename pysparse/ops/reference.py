"""Pure-torch reference for every pysparse op: the definition of its semantics.

These functions are the tests' oracle, the default backend on any device, and the docs'
definition. They favour clarity and exactness over speed: integer products are accumulated in
float64, which is exact for int8 x int8 sums while K < 2**53 / 127**2 (~5.6e11).
"""
import math

import torch

from ..formats import int8 as _int8
from ..formats import sparse24 as _sp24
from . import checks


def quantize_per_token(x: torch.Tensor):
    """x [..., K] float -> (q int8 [..., K], scale fp32 [...]), symmetric per token (row).

    ``scale = max(amax, 1e-12) / 127``, ``q = clamp(round_half_even(x / scale), -127, 127)``,
    with amax = max |x| over the row in fp32. NaN/Inf in x raise ValueError.
    """
    checks.tensor("quantize_per_token", "x", x, checks.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"pysparse.quantize_per_token: x must be [..., K] with K >= 1, got "
                         f"{tuple(x.shape)}")
    return _quantize("quantize_per_token", x)


def _quantize(op, x):
    xf = x.float()
    amax = xf.abs().amax(dim=-1) if x.numel() else xf.new_zeros(x.shape[:-1])
    checks.finite_rows(op, amax)
    scale = _int8.symmetric_scale(amax)
    return _int8.quantize_rows(xf, scale), scale


def _int_mm(a_q, b_q):
    """Exact int32 a_q [M, K] @ b_q[N, K]^T."""
    return (a_q.double() @ b_q.double().T).to(torch.int32)


def _epilogue(acc, x_scale, w_scale, bias, shape, dtype):
    y = acc.float() * x_scale.reshape(-1, 1) * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype).reshape(*shape[:-1], -1)


def _quantized_linear(op, x, w_q_dense, w_scale, bias):
    N, K = w_q_dense.shape
    x2 = x.reshape(-1, K)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], N))
    xq, xs = _quantize(op, x2)
    return _epilogue(_int_mm(xq, w_q_dense), xs, w_scale, bias, x.shape, x.dtype)


def int8_linear(x, w_q, w_scale, bias=None):
    """W8A8 linear, activations quantized dynamically per token.

    x [..., K] fp32/bf16/fp16; w_q int8 [N, K]; w_scale [N] (fp32 preferred); bias [N] or None.
    y = (xq @ w_q.T as exact int32) * x_scale[:, None] * w_scale[None, :] + bias, computed in
    fp32 in that order and cast to x.dtype. Output [..., N].
    """
    checks.tensor("int8_linear", "x", x, checks.FLOAT_DTYPES)
    N, K = checks.int8_weight("int8_linear", w_q, w_scale, x.device)
    checks.activation("int8_linear", x, K)
    checks.bias("int8_linear", bias, N, x.device)
    return _quantized_linear("int8_linear", x, w_q, w_scale, bias)


def int8_linear_packed(x, w_packed, w_colsum, w_scale, bias=None):
    """int8_linear on a weight packed by formats.int8.pack_vnni16 (N = len(w_scale), K = x's
    last dim). w_colsum is a cache the kernels use (sum_k of each packed row); it does not
    change the definition, which is int8_linear on the unpacked weight."""
    op = "int8_linear_packed"
    checks.tensor(op, "x", x, checks.FLOAT_DTYPES)
    N, K = checks.packed_int8_weight(op, x, w_packed, w_colsum, w_scale)
    w_q = _int8.unpack_vnni16(w_packed, N, K)
    return int8_linear(x, w_q, w_scale, bias)


def sparse24_linear(x, values, meta, bias=None):
    """2:4 sparse linear in float: y = x @ decompress(values, meta).T + bias, computed in fp32,
    cast to x.dtype. values [N, K/2] float, meta uint8 [N, ceil(K/8)]. Non-finite x is refused
    (checks.sparse_finite)."""
    checks.tensor("sparse24_linear", "x", x, checks.FLOAT_DTYPES)
    N, K = checks.sparse24_weight("sparse24_linear", values, meta, x.device, checks.FLOAT_DTYPES)
    checks.activation("sparse24_linear", x, K)
    checks.bias("sparse24_linear", bias, N, x.device)
    checks.sparse_finite("sparse24_linear", x, K)
    w = _sp24.decompress(values, meta).float()
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def sparse24_int8_linear(x, values_q, meta, w_scale, bias=None):
    """2:4 sparse W8A8: as int8_linear with the int8 weight decompress(values_q, meta)."""
    op = "sparse24_int8_linear"
    checks.tensor(op, "x", x, checks.FLOAT_DTYPES)
    N, K = checks.sparse24_weight(op, values_q, meta, x.device, (torch.int8,))
    checks.tensor(op, "w_scale", w_scale, checks.FLOAT_DTYPES, ndim=1, device=x.device)
    if w_scale.shape[0] != N:
        raise ValueError(f"pysparse.{op}: w_scale must have shape [{N}], got {tuple(w_scale.shape)}")
    checks.activation(op, x, K)
    checks.bias(op, bias, N, x.device)
    return _quantized_linear(op, x, _sp24.decompress(values_q, meta), w_scale, bias)


def sparse24_linear_packed(x, w_values, w_codes, bias, N):
    """sparse24_linear on an sp24f-packed weight; defined as sparse24_linear on the unpacked one.
    Like the CPU kernel (which never multiplies the activations that meet pruned weights),
    non-finite activations are refused."""
    op = "sparse24_linear_packed"
    checks.tensor(op, "x", x, checks.FLOAT_DTYPES)
    N, K = checks.packed_sparse24_weight(op, x, w_values, w_codes, int(N), int8=False)
    checks.bias(op, bias, N, x.device)
    checks.sparse_finite(op, x, K)
    values, meta = _sp24.unpack_cpu_float(w_values, w_codes, N, K)
    return sparse24_linear(x, values, meta, bias)


def sparse24_int8_linear_packed(x, w_values, w_codes, w_colsum, w_scale, bias=None):
    """sparse24_int8_linear on an sp24i8-packed weight (w_colsum is the kernels' helper and is
    not read here)."""
    op = "sparse24_int8_linear_packed"
    checks.tensor(op, "x", x, checks.FLOAT_DTYPES)
    checks.tensor(op, "w_scale", w_scale, checks.FLOAT_DTYPES, ndim=1, device=x.device)
    checks.tensor(op, "w_colsum", w_colsum, (torch.int32,), ndim=1, device=x.device)
    N, K = checks.packed_sparse24_weight(op, x, w_values, w_codes, w_scale.shape[0], int8=True)
    if w_colsum.shape[0] != -(-N // 16) * 16:
        raise ValueError(f"pysparse.{op}: w_colsum must have {-(-N // 16) * 16} entries, got "
                         f"{w_colsum.shape[0]}")
    values_q, meta = _sp24.unpack_cpu_int8(w_values, w_codes, N, K)
    return sparse24_int8_linear(x, values_q, meta, w_scale, bias)


def attention(q, k, v, mask=None, causal=False, scale=None):
    """softmax(q k^T * scale + mask) v, in fp32, cast to q.dtype.

    q [B, Hq, Sq, D]; k, v [B, Hkv, Sk, D] with Hq % Hkv == 0 (grouped-query: query head h
    uses kv head h // (Hq / Hkv)). mask: bool (True = attend) or additive float, broadcastable
    to [B, Hq, Sq, Sk]. causal: query i attends key j iff j <= i + (Sk - Sq) (bottom-right
    aligned, so decoding with a KV cache works; equals torch's top-left when Sq == Sk).
    scale defaults to 1/sqrt(D). Rows with no key to attend (all masked, or only -inf bias)
    give 0; a NaN in q, k or v gives NaN in the rows it reaches, as in the dense formula.
    """
    B, Hq, Hkv, Sq, Sk, D = checks.attention(q, k, v, mask)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if Sk == 0:  # no key at all: every row is empty
        return q.new_zeros(q.shape)
    rep = Hq // Hkv
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    keep = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.ones_like(keep).tril(diagonal=Sk - Sq)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = keep & mask
        else:
            s = s + mask.float()
    s = s.masked_fill(~keep, float("-inf"))
    empty = s.amax(dim=-1, keepdim=True) == float("-inf")  # nothing to attend (NaN is not empty)
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    return (p @ vf).to(q.dtype)


def int8_linear_static(x, w_q, w_scale, x_scale, bias=None, x_zero=None):
    """W8A8 linear with a static (calibrated) per-tensor activation scale.

    x [..., K] fp32/bf16/fp16; w_q int8 [N, K]; w_scale [N]; x_scale: one positive finite fp32
    value (shape [] or [1]); bias [N] or None. Symmetric (``x_zero`` None):
    ``xq = clamp(round_half_even(x / x_scale), -127, 127)``. Asymmetric (``x_zero``: one int32
    / uint8 value in [0, 255], the uint8 zero point): ``xq = clamp(round_half_even(x / x_scale)
    + x_zero, 0, 255) - x_zero`` (the unsigned code minus its zero point: the operands a
    u8 x s8 dot product with a column-sum correction computes). Values beyond the calibrated
    range saturate. Then as int8_linear: y = (xq @ w_q.T as exact int32) * x_scale *
    w_scale[None, :] + bias in fp32, cast to x.dtype. NaN/Inf in x raise ValueError.
    """
    op = "int8_linear_static"
    checks.tensor(op, "x", x, checks.FLOAT_DTYPES)
    N, K = checks.int8_weight(op, w_q, w_scale, x.device)
    checks.activation(op, x, K)
    checks.bias(op, bias, N, x.device)
    checks.tensor(op, "x_scale", x_scale, checks.FLOAT_DTYPES, device=x.device)
    if x_scale.numel() != 1 or x_scale.dim() > 1:
        raise ValueError(f"pysparse.{op}: x_scale must hold one value (per-tensor scale), got "
                         f"shape {tuple(x_scale.shape)}")
    xs = x_scale.float().reshape(())
    if not bool(torch.isfinite(xs)) or float(xs) <= 0:
        raise ValueError(f"pysparse.{op}: x_scale must be positive and finite, got {float(xs)}")
    z = None
    if x_zero is not None:
        checks.tensor(op, "x_zero", x_zero, (torch.int32, torch.uint8), device=x.device)
        if x_zero.numel() != 1 or x_zero.dim() > 1:
            raise ValueError(f"pysparse.{op}: x_zero must hold one value (per-tensor zero "
                             f"point), got shape {tuple(x_zero.shape)}")
        z = int(x_zero.reshape(()))
        if not 0 <= z <= 255:
            raise ValueError(f"pysparse.{op}: x_zero must be in [0, 255] (uint8 zero point), "
                             f"got {z}")
    x2 = x.reshape(-1, K)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], N))
    xf = x2.float()
    checks.finite_rows(op, xf.abs().amax(dim=-1))
    if z is None:
        xq = _int8.quantize_rows(xf, xs.expand(xf.shape[0]))
    else:
        xq = (torch.round(xf / xs) + z).clamp_(0, 255).to(torch.int32) - z
    return _epilogue(_int_mm(xq, w_q), xs, w_scale, bias, x.shape, x.dtype)
