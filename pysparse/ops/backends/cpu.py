"""CPU backend: the C++ kernels in pysparse._C (run-time ISA dispatch inside).

Registered as the ``CPU`` kernel of each op it implements. Falls back to the reference when the
extension is missing, when ``PYSPARSE_BACKEND=reference``, or for dtypes the kernels do not take
(float16). ``sparse24_*`` on canonical weights pack per call; modules hold packed weights.
"""
import importlib
import math

import torch

from .. import checks, reference
from ...formats import sparse24 as _sp24
from . import forced

try:
    _C = importlib.import_module("pysparse._C")
    _LOAD_ERROR = None
except Exception as exc:  # noqa: BLE001 - any import failure means: no native kernels
    _C = None
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"

_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def status():
    if _C is None:
        return False, f"pysparse._C did not load ({_LOAD_ERROR}); rebuild with `pip install -e .`"
    info = _C.info()
    why = f"C++ kernels, ISA {info['active_isa']}"
    if info["active_isa"] != info["detected_isa"]:
        why += f" (capped by PYSPARSE_CPU_ISA; CPU supports {info['detected_isa']})"
    if not info.get("parallel", False):
        why += "; WARNING: built without OpenMP, kernels run on one thread"
    if info["isa_error"]:
        why += f"; note: {info['isa_error']}"
    return True, why


def native_ok(x) -> bool:
    if _C is None or x.dtype not in _NATIVE_DTYPES:
        return False
    f = forced()
    return f is None or f == "cpu"


def _rows(x, K):
    return x if x.dim() == 2 else x.reshape(-1, K)


def _unrows(y, x, N):
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)


def quantize_per_token(x):
    if not native_ok(x) or x.dim() < 1 or x.numel() == 0:
        return reference.quantize_per_token(x)
    checks.tensor("quantize_per_token", "x", x, checks.FLOAT_DTYPES)
    K = x.shape[-1]
    q, s = _C.quantize_per_token(x.reshape(-1, K).contiguous())
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


def _fp32(t):
    return t if t is None or t.dtype == torch.float32 else t.float()


def _native(run, check):
    """Hot path: call the C++ kernel straight away (it checks every size and dtype itself, so
    nothing can be read out of bounds). Only if it refuses do we run the Python checks, so the
    error the user sees is the canonical one shared with every other backend."""
    try:
        return run()
    except (ValueError, RuntimeError, TypeError):
        check()
        raise


def int8_linear(x, w_q, w_scale, bias=None):
    if not native_ok(x):
        return reference.int8_linear(x, w_q, w_scale, bias)
    N, K = w_q.shape[0], x.shape[-1]
    x2 = _rows(x, K)
    if x2.shape[0] == 0:
        return reference.int8_linear(x, w_q, w_scale, bias)

    def check():
        checks.tensor("int8_linear", "x", x, checks.FLOAT_DTYPES)
        n, k = checks.int8_weight("int8_linear", w_q, w_scale, x.device)
        checks.activation("int8_linear", x, k)
        checks.bias("int8_linear", bias, n, x.device)

    y = _native(lambda: _C.int8_linear(x2.contiguous(), w_q, _fp32(w_scale), _fp32(bias)),
                check)
    return _unrows(y, x, N)


def int8_linear_packed(x, w_packed, w_colsum, w_scale, bias=None):
    if not native_ok(x) or x.dim() < 1 or w_scale.dim() != 1:
        return reference.int8_linear_packed(x, w_packed, w_colsum, w_scale, bias)
    N, K = w_scale.shape[0], x.shape[-1]
    x2 = _rows(x, K)
    if x2.shape[0] == 0:
        return reference.int8_linear_packed(x, w_packed, w_colsum, w_scale, bias)

    def check():
        op = "int8_linear_packed"
        checks.tensor(op, "x", x, checks.FLOAT_DTYPES)
        n, _ = checks.packed_int8_weight(op, x, w_packed, w_colsum, w_scale)
        checks.bias(op, bias, n, x.device)

    y = _native(lambda: _C.int8_linear_packed(x2.contiguous(), w_packed, w_colsum,
                                              _fp32(w_scale), _fp32(bias), N), check)
    return _unrows(y, x, N)


def sparse24_linear(x, values, meta, bias=None):
    """Canonical 2:4 weight: packed on every call (O(N*K)), then the packed kernel. Modules pack
    once (nn.Sparse24Linear, layout "sp24")."""
    if not native_ok(x) or values.dtype not in _NATIVE_DTYPES:
        return reference.sparse24_linear(x, values, meta, bias)
    checks.tensor("sparse24_linear", "x", x, checks.FLOAT_DTYPES)
    N, K = checks.sparse24_weight("sparse24_linear", values, meta, x.device, checks.FLOAT_DTYPES)
    checks.activation("sparse24_linear", x, K)
    checks.bias("sparse24_linear", bias, N, x.device)
    w_values, w_codes = _sp24.pack_cpu_float(values, meta)
    return sparse24_linear_packed(x, w_values, w_codes, bias, N)


def sparse24_linear_packed(x, w_values, w_codes, bias, N):
    if not native_ok(x) or x.dim() < 1:
        return reference.sparse24_linear_packed(x, w_values, w_codes, bias, N)
    N, K = int(N), x.shape[-1]
    x2 = _rows(x, K)
    if x2.shape[0] == 0:
        return reference.sparse24_linear_packed(x, w_values, w_codes, bias, N)

    def check():
        op = "sparse24_linear_packed"
        checks.tensor(op, "x", x, checks.FLOAT_DTYPES)
        n, _ = checks.packed_sparse24_weight(op, x, w_values, w_codes, N, int8=False)
        checks.bias(op, bias, n, x.device)

    y = _native(lambda: _C.sparse24_linear_packed(x2.contiguous(), w_values, w_codes, _fp32(bias),
                                                  N), check)
    return _unrows(y, x, N)


def sparse24_int8_linear(x, values_q, meta, w_scale, bias=None):
    """Canonical 2:4 int8 weight: packed on every call, then the packed kernel."""
    if not native_ok(x):
        return reference.sparse24_int8_linear(x, values_q, meta, w_scale, bias)
    op = "sparse24_int8_linear"
    checks.tensor(op, "x", x, checks.FLOAT_DTYPES)
    N, K = checks.sparse24_weight(op, values_q, meta, x.device, (torch.int8,))
    checks.tensor(op, "w_scale", w_scale, checks.FLOAT_DTYPES, ndim=1, device=x.device)
    if w_scale.shape[0] != N:
        raise ValueError(f"pysparse.{op}: w_scale must have shape [{N}], got {tuple(w_scale.shape)}")
    checks.activation(op, x, K)
    checks.bias(op, bias, N, x.device)
    w_values, w_codes, w_colsum = _sp24.pack_cpu_int8(values_q, meta)
    return sparse24_int8_linear_packed(x, w_values, w_codes, w_colsum, w_scale, bias)


def sparse24_int8_linear_packed(x, w_values, w_codes, w_colsum, w_scale, bias=None):
    if not native_ok(x) or x.dim() < 1 or w_scale.dim() != 1:
        return reference.sparse24_int8_linear_packed(x, w_values, w_codes, w_colsum, w_scale, bias)
    N, K = w_scale.shape[0], x.shape[-1]
    x2 = _rows(x, K)
    if x2.shape[0] == 0:
        return reference.sparse24_int8_linear_packed(x, w_values, w_codes, w_colsum, w_scale, bias)

    def check():
        op = "sparse24_int8_linear_packed"
        checks.tensor(op, "x", x, checks.FLOAT_DTYPES)
        n, _ = checks.packed_sparse24_weight(op, x, w_values, w_codes, N, int8=True)
        checks.bias(op, bias, n, x.device)

    y = _native(lambda: _C.sparse24_int8_linear_packed(x2.contiguous(), w_values, w_codes, w_colsum,
                                                       _fp32(w_scale), _fp32(bias), N), check)
    return _unrows(y, x, N)


def _attention_bias(mask, shape):
    """mask (bool keep / additive, broadcastable) -> fp32 additive view of ``shape`` [B, Hq, Sq, Sk]
    with unit stride along keys (0 = broadcast elsewhere): nothing of size Sq x Sk is made unless
    the mask itself is that big."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        bias = torch.where(mask, 0.0, float("-inf")).float()
    else:
        bias = mask.float()
    bias = bias.expand(shape)
    if bias.stride(-1) != 1:  # broadcast (or strided) along keys: materialise that dim only
        lead = [1 if st == 0 else n for n, st in zip(shape[:-1], bias.stride()[:-1])]
        bias = bias[tuple(slice(0, n) for n in lead)].contiguous().expand(shape)
    return bias


def attention(q, k, v, mask=None, causal=False, scale=None):
    if (not native_ok(q) or not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor)
            or k.dtype != q.dtype or v.dtype != q.dtype or q.dim() != 4 or k.dim() != 4
            or q.numel() == 0 or k.numel() == 0):
        return reference.attention(q, k, v, mask, causal, scale)  # its checks give the errors
    B, Hq, Hkv, Sq, Sk, D = checks.attention(q, k, v, mask)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    bias = _attention_bias(mask, (B, Hq, Sq, Sk))
    return _C.attention(q, k, v, bias, bool(causal), 1.0 / math.sqrt(D) if scale is None else float(scale))


def register():
    for op in ("attention", "quantize_per_token", "int8_linear", "int8_linear_packed", "sparse24_linear",
               "sparse24_linear_packed", "sparse24_int8_linear", "sparse24_int8_linear_packed"):
        torch.library.impl(f"pysparse::{op}", "CPU", globals()[op])
