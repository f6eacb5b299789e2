"""Replacement modules for nn.Linear / transformers' Conv1D.

Each module holds *packed* buffers (packed once in ``from_linear``; nothing is quantized in
``forward`` or ``.to()``) and calls one pysparse op. Scales and biases stay fp32 whatever
``model.to(dtype)`` does (``_apply`` keeps their dtype, moves their device), so a bf16 model does
not round its quantization scales; float 2:4 values follow the model's dtype like a weight would.
"""
import torch
from torch import nn

from ..formats import int8 as _int8
from ..formats import sparse24 as _sp24
from ..ops import reference
from ..quant import int4 as _int4
from ..quant import state as _qstate


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear or a transformers Conv1D ([in, out] stored)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.detach().t()
    raise TypeError(f"pysparse: expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


class _PackedLinear(nn.Module):
    """Shared plumbing: shape attributes, fp32 side buffers, backend choice, repr."""

    _fp32_buffers = ("weight_scale", "bias")
    scheme = ""

    def __init__(self, in_features, out_features, backend=None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.backend = backend

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers[n] for n in self._fp32_buffers if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, buf in kept.items():
            moved = self._buffers[name]
            # a dtype cast would round the fp32 scales/bias: keep the dtype, follow the device
            self._buffers[name] = buf.to(device=moved.device) if moved.dtype != buf.dtype else moved
        return self

    def _set_bias(self, module):
        b = getattr(module, "bias", None)
        self.register_buffer("bias", None if b is None else b.detach().float().clone())

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme!r}, "
                f"backend={self.backend or 'auto'}")

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _run(self, op: str, *args):
        if self.backend == "reference":  # forced: plain torch, traceable, any device
            return getattr(reference, op)(*args)
        return getattr(torch.ops.pysparse, op)(*args)


def default_layout(backend, device) -> str:
    """"vnni16" (packed for the CPU kernels) where they will run, else "canonical"."""
    from ..ops.backends import cpu
    if torch.device(device).type == "cpu" and backend in (None, "cpu") and cpu._C is not None:
        return "vnni16"
    return "canonical"


def _set_multiplier(out, module, device):
    """The SmoothQuant multiplier 1/s of a layer smoothed without an exact fold (quant.state)."""
    m = _qstate.input_multiplier(module, device)
    out.register_buffer("input_multiplier", None if m is None else m.float().contiguous())


def _apply_multiplier(x, m):
    return x if m is None else (x * m).to(x.dtype)


class _MultiplierStateDict:
    """Lets a module built without a SmoothQuant multiplier load a state_dict that has one."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "input_multiplier" in state_dict and self.input_multiplier is None:
            self.input_multiplier = torch.ones(self.in_features, device=self.weight_scale.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Int8Linear(_MultiplierStateDict, _PackedLinear):
    """W8A8: int8 weight per output channel, activations int8 per token at run time.

    layout "canonical" holds ``weight_q`` int8 [N, K]; layout "vnni16" (the default where the CPU
    kernels run) holds ``weight_packed`` / ``weight_colsum`` as formats.int8.pack_vnni16 makes
    them, packed once here so forward streams them as they are.

    ``input_multiplier`` (fp32 [K] or None): set when the source layer carries a pending
    SmoothQuant vector s (``pysparse.smooth`` on a layer it could not fold, see quant.state):
    the weight quantized is ``W * s`` and forward multiplies x by ``1 / s`` before quantizing.
    """

    scheme = "w8a8"
    LAYOUTS = ("canonical", "vnni16")
    _fp32_buffers = ("weight_scale", "bias", "input_multiplier")

    def __init__(self, in_features, out_features, bias=True, backend=None, layout="canonical"):
        super().__init__(in_features, out_features, backend)
        if layout not in self.LAYOUTS:
            raise ValueError(f"pysparse.Int8Linear: unknown layout {layout!r}; choose one of "
                             f"{self.LAYOUTS}")
        self.layout = layout
        N, K = out_features, in_features
        if layout == "vnni16":
            Np, Kp = -(-N // _int8.VNNI_N) * _int8.VNNI_N, -(-K // _int8.VNNI_K) * _int8.VNNI_K
            self.register_buffer("weight_packed", torch.zeros(Np // _int8.VNNI_N,
                                                              Kp // _int8.VNNI_K, 64,
                                                              dtype=torch.int8))
            self.register_buffer("weight_colsum", torch.zeros(Np, dtype=torch.int32))
        else:
            self.register_buffer("weight_q", torch.zeros(N, K, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(N))
        self.register_buffer("bias", torch.zeros(N) if bias else None)
        self.register_buffer("input_multiplier", None)

    @classmethod
    def from_linear(cls, module, backend=None, layout=None):
        w = linear_weight(module)
        layout = layout or default_layout(backend, w.device)
        out = cls(w.shape[1], w.shape[0], bias=False, backend=backend, layout=layout)
        q, out.weight_scale = _int8.quantize_weight(_qstate.smoothed_weight(w, module))
        if layout == "vnni16":
            out.weight_packed, out.weight_colsum = _int8.pack_vnni16(q)
        else:
            out.weight_q = q
        out._set_bias(module)
        _set_multiplier(out, module, w.device)
        return out.to(w.device)

    def forward(self, x):
        x = _apply_multiplier(x, self.input_multiplier)
        if self.layout == "vnni16":
            return self._run("int8_linear_packed", x, self.weight_packed, self.weight_colsum,
                             self.weight_scale, self.bias)
        return self._run("int8_linear", x, self.weight_q, self.weight_scale, self.bias)

    def int8_weight(self):
        """The int8 weight [N, K] in canonical layout."""
        if self.layout == "vnni16":
            return _int8.unpack_vnni16(self.weight_packed, self.out_features, self.in_features)
        return self.weight_q

    def dequantized_weight(self):
        return _int8.dequantize_weight(self.int8_weight(), self.weight_scale)

    def extra_repr(self):
        return super().extra_repr() + f", layout={self.layout!r}"


def default_sparse_layout(backend, device, dtype=torch.float32) -> str:
    """"sp24" (packed for the 2:4 CPU kernels) where they will run, else "canonical"."""
    if dtype in _sp24.CPU_FLOAT_DTYPES + (torch.int8,) and default_layout(backend, device) != "canonical":
        return "sp24"
    return "canonical"


class _Sparse24Base(_PackedLinear):
    LAYOUTS = ("canonical", "sp24")

    def _check_layout(self, layout):
        if layout not in self.LAYOUTS:
            raise ValueError(f"pysparse.{type(self).__name__}: unknown layout {layout!r}; choose "
                             f"one of {self.LAYOUTS}")
        self.layout = layout

    def extra_repr(self):
        return super().extra_repr() + f", layout={self.layout!r}"


class Sparse24Linear(_Sparse24Base):
    """2:4 sparse weight in the layer's float dtype.

    layout "canonical" holds ``values`` [N, K/2] + ``meta`` (formats.sparse24); layout "sp24"
    (the default where the CPU kernels run, for fp32/bf16 weights) holds ``weight_values`` /
    ``weight_codes`` as formats.sparse24.pack_cpu_float makes them. The packed value order does
    not depend on the dtype, so ``model.to(torch.bfloat16)`` keeps a valid packed weight; a dtype
    the kernels do not take (float16) runs the reference on the unpacked weight.
    """

    scheme = "2:4"

    def __init__(self, in_features, out_features, bias=True, dtype=torch.float32, backend=None,
                 layout="canonical"):
        super().__init__(in_features, out_features, backend)
        self._check_layout(layout)
        N, K = out_features, in_features
        if layout == "sp24":
            NB, G = -(-N // 16), K // 4
            self.register_buffer("weight_values", torch.zeros(NB, G, 32, dtype=dtype))
            self.register_buffer("weight_codes", torch.zeros(NB, G, dtype=torch.int64))
        else:
            self.register_buffer("values", torch.zeros(N, K // 2, dtype=dtype))
            self.register_buffer("meta", torch.zeros(N, (K + 7) // 8, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, module, backend=None, layout=None):
        w = linear_weight(module)
        layout = layout or default_sparse_layout(backend, w.device, w.dtype)
        out = cls(w.shape[1], w.shape[0], bias=False, dtype=w.dtype, backend=backend,
                  layout=layout)
        values, meta = _sp24.compress(w)
        if layout == "sp24":
            out.weight_values, out.weight_codes = _sp24.pack_cpu_float(values, meta)
        else:
            out.values, out.meta = values, meta
        out._set_bias(module)
        return out.to(w.device)

    def canonical(self):
        """(values [N, K/2], meta) in the canonical format."""
        if self.layout == "sp24":
            return _sp24.unpack_cpu_float(self.weight_values, self.weight_codes,
                                          self.out_features, self.in_features)
        return self.values, self.meta

    def forward(self, x):
        if self.layout == "sp24":
            if self.weight_values.dtype in _sp24.CPU_FLOAT_DTYPES:
                return self._run("sparse24_linear_packed", x, self.weight_values,
                                 self.weight_codes, self.bias, self.out_features)
            return self._run("sparse24_linear", x, *self.canonical(), self.bias)
        return self._run("sparse24_linear", x, self.values, self.meta, self.bias)

    def dequantized_weight(self):
        return _sp24.decompress(*self.canonical())


class Sparse24Int8Linear(_Sparse24Base):
    """2:4 sparse + W8A8: int8 kept values with per-channel scales, int8 activations per token.

    layout "canonical" holds ``values_q`` + ``meta``; layout "sp24" (the default where the CPU
    kernels run) holds ``weight_values`` / ``weight_codes`` / ``weight_colsum`` as
    formats.sparse24.pack_cpu_int8 makes them.
    """

    scheme = "2:4+w8a8"

    def __init__(self, in_features, out_features, bias=True, backend=None, layout="canonical"):
        super().__init__(in_features, out_features, backend)
        self._check_layout(layout)
        N, K = out_features, in_features
        if layout == "sp24":
            NB, KB = -(-N // 16), -(-K // 8)
            self.register_buffer("weight_values", torch.zeros(NB, KB, 64, dtype=torch.int8))
            self.register_buffer("weight_codes", torch.zeros(NB, KB, 16, dtype=torch.uint8))
            self.register_buffer("weight_colsum", torch.zeros(NB * 16, dtype=torch.int32))
        else:
            self.register_buffer("values_q", torch.zeros(N, K // 2, dtype=torch.int8))
            self.register_buffer("meta", torch.zeros(N, (K + 7) // 8, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, module, backend=None, layout=None):
        w = linear_weight(module)
        layout = layout or default_sparse_layout(backend, w.device, torch.int8)
        out = cls(w.shape[1], w.shape[0], bias=False, backend=backend, layout=layout)
        values, meta = _sp24.compress(w)
        # per-channel scale from the kept values (= from the whole row: the pruned ones are 0)
        values_q, out.weight_scale = _int8.quantize_weight(values)
        if layout == "sp24":
            out.weight_values, out.weight_codes, out.weight_colsum = _sp24.pack_cpu_int8(values_q,
                                                                                       meta)
        else:
            out.values_q, out.meta = values_q, meta
        out._set_bias(module)
        return out.to(w.device)

    def canonical(self):
        """(values_q [N, K/2] int8, meta) in the canonical format."""
        if self.layout == "sp24":
            return _sp24.unpack_cpu_int8(self.weight_values, self.weight_codes,
                                         self.out_features, self.in_features)
        return self.values_q, self.meta

    def forward(self, x):
        if self.layout == "sp24":
            return self._run("sparse24_int8_linear_packed", x, self.weight_values,
                             self.weight_codes, self.weight_colsum, self.weight_scale, self.bias)
        return self._run("sparse24_int8_linear", x, self.values_q, self.meta,
                         self.weight_scale, self.bias)

    def dequantized_weight(self):
        values_q, meta = self.canonical()
        return _sp24.decompress(_int8.dequantize_weight(values_q, self.weight_scale), meta)


class StaticInt8Linear(_MultiplierStateDict, _PackedLinear):
    """W8A8 with a *static* activation scale: int8 weight per output channel (as Int8Linear), the
    input quantized per tensor with the fixed scale ``input_scale`` (fp32 []) that
    ``pysparse.calibrate`` recorded, so there is no per-token amax pass; values beyond the
    calibrated range saturate. ``input_zero`` (int32 [] or None): the uint8 zero point of an
    asymmetric calibration (``calibrate(..., symmetric=False)``), None for symmetric int8.
    Runs ``pysparse::int8_linear_static`` (reference backend for now). Honours a pending
    SmoothQuant vector like Int8Linear (``input_multiplier``).
    Built by ``replace_linear(model, "w8a8", activation="static")``.
    """

    scheme = "w8a8-static"
    _fp32_buffers = ("weight_scale", "bias", "input_scale", "input_multiplier")

    def __init__(self, in_features, out_features, bias=True, backend=None):
        super().__init__(in_features, out_features, backend)
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("input_multiplier", None)
        self.register_buffer("input_zero", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "input_zero" in state_dict and self.input_zero is None:
            self.input_zero = torch.zeros((), dtype=torch.int32, device=self.input_scale.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_linear(cls, module, backend=None):
        scale = _qstate.input_scale(module)
        if scale is None:
            raise ValueError("pysparse.StaticInt8Linear: the layer has no calibrated activation "
                             "scale; call pysparse.calibrate(model, calib, tokenizer=...) first")
        w = linear_weight(module)
        out = cls(w.shape[1], w.shape[0], bias=False, backend=backend)
        out.weight_q, out.weight_scale = _int8.quantize_weight(_qstate.smoothed_weight(w, module))
        out.input_scale = torch.tensor(float(scale), dtype=torch.float32)
        zero = _qstate.input_zero(module)
        if zero is not None:
            out.input_zero = torch.tensor(int(zero), dtype=torch.int32)
        out._set_bias(module)
        _set_multiplier(out, module, w.device)
        return out.to(w.device)

    def forward(self, x):
        x = _apply_multiplier(x, self.input_multiplier)
        return self._run("int8_linear_static", x, self.weight_q, self.weight_scale,
                         self.input_scale, self.bias, self.input_zero)

    def int8_weight(self):
        return self.weight_q

    def dequantized_weight(self):
        return _int8.dequantize_weight(self.weight_q, self.weight_scale)

    def extra_repr(self):
        zero = "" if self.input_zero is None else f", input_zero={int(self.input_zero)}"
        return super().extra_repr() + f", input_scale={float(self.input_scale):.4g}{zero}"


class Int8WeightOnlyLinear(_MultiplierStateDict, _PackedLinear):
    """Weight-only int8 ("w8"): ``weight_q`` int8 [N, K] with per-output-channel symmetric
    scales (formats.int8), float activations. forward dequantizes the weight (fp32, cast to x's
    dtype) and calls F.linear in x's dtype: the reference path (a fused int8-weight kernel that
    streams 1 byte per weight is a later issue). A pending smoothing vector (``pysparse.smooth``,
    ``quant.awq.awq_smooth``) is honoured like Int8Linear: ``W * s`` is quantized and the input
    multiplied by ``input_multiplier`` = 1 / s."""

    scheme = "w8"
    _fp32_buffers = ("weight_scale", "bias", "input_multiplier")

    def __init__(self, in_features, out_features, bias=True, backend=None):
        super().__init__(in_features, out_features, backend)
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("input_multiplier", None)

    @classmethod
    def from_linear(cls, module, backend=None):
        w = _qstate.smoothed_weight(linear_weight(module), module)
        out = cls(w.shape[1], w.shape[0], bias=False, backend=backend)
        out.weight_q, out.weight_scale = _int8.quantize_weight(w)
        stored = _qstate.gptq_qparams(module, 8, None, True)
        if stored is not None:  # GPTQ's scales (quant.gptq), when they reproduce w exactly
            scale = stored[0].to(w.device)
            q = _int8.quantize_rows(w, scale)
            if _exact(_int8.dequantize_weight(q, scale), w, "w8"):
                out.weight_q, out.weight_scale = q, scale
        out._set_bias(module)
        _set_multiplier(out, module, w.device)
        return out.to(w.device)

    def dequantized_weight(self):
        return _int8.dequantize_weight(self.weight_q, self.weight_scale)

    def forward(self, x):
        x = _apply_multiplier(x, self.input_multiplier)
        w = self.dequantized_weight().to(x.dtype)
        return torch.nn.functional.linear(x, w, None if self.bias is None else
                                          self.bias.to(x.dtype))


def _exact(deq, w, scheme):
    """Whether GPTQ's stored codes reproduce ``w`` (to float rounding: a smoothed layer holds
    codes / s, and W * s comes back within an ulp or two); warns (round-to-nearest follows) if
    not. Codes sit on integers, so rounding noise this small never changes them."""
    if torch.allclose(deq.float(), w.detach().float(), rtol=2e-6, atol=0.0):
        return True
    import warnings
    warnings.warn(f"pysparse.replace_linear({scheme!r}): the layer's stored GPTQ scales no "
                  f"longer reproduce its weight (changed or cast after gptq_quantize); "
                  f"quantizing it by round-to-nearest")
    return False


class Int4Linear(_MultiplierStateDict, _PackedLinear):
    """Weight-only int4, group-wise ("w4"): groups of ``group_size`` (default 128) along K, each
    with an fp32 scale (and a uint8 zero point when ``symmetric=False``); codes packed two per
    byte, ``weight_packed`` uint8 [N, K/2] (layout in quant.int4). K must be a multiple of
    group_size (``replace_linear`` skips other layers with the reason; from_linear raises).
    Options (``replace_linear(model, "w4", group_size=..., symmetric=..., method=...)``):
    group_size (even, default 128), symmetric (default True), method "minmax" | "mse".
    forward dequantizes (fp32, cast to x's dtype) and calls F.linear: the reference path.
    A pending smoothing vector (``quant.awq.awq_smooth``, ``pysparse.smooth``) is honoured as in
    Int8Linear (``input_multiplier``)."""

    scheme = "w4"
    OPTIONS = ("group_size", "symmetric", "method")
    _fp32_buffers = ("weight_scale", "bias", "input_multiplier")

    def __init__(self, in_features, out_features, bias=True, backend=None,
                 group_size=_int4.DEFAULT_GROUP_SIZE, symmetric=True):
        super().__init__(in_features, out_features, backend)
        _int4.check_group_size(group_size, in_features, who="Int4Linear")
        self.group_size, self.symmetric = int(group_size), bool(symmetric)
        N, K, G = out_features, in_features, in_features // group_size
        self.register_buffer("weight_packed", torch.zeros(N, K // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(N, G))
        self.register_buffer("weight_zero", None if symmetric else
                             torch.zeros(N, G, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("input_multiplier", None)

    @classmethod
    def check_options(cls, group_size=_int4.DEFAULT_GROUP_SIZE, symmetric=True,
                      method="minmax"):
        who = "replace_linear(scheme='w4')"
        _int4.check_group_size(group_size, who=who)
        if not isinstance(symmetric, bool):
            raise ValueError(f"pysparse.{who}: symmetric must be a bool, got {symmetric!r}")
        if method not in ("minmax", "mse"):
            raise ValueError(f"pysparse.{who}: method must be 'minmax' or 'mse', got {method!r}")

    @classmethod
    def from_linear(cls, module, backend=None, group_size=_int4.DEFAULT_GROUP_SIZE,
                    symmetric=True, method="minmax"):
        """method: each group's range, "minmax" or "mse" (the clipping with the least squared
        error, quant.observers); it changes only the scales chosen, not the format."""
        w = _qstate.smoothed_weight(linear_weight(module), module)
        out = cls(w.shape[1], w.shape[0], bias=False, backend=backend, group_size=group_size,
                  symmetric=symmetric)
        stored = _qstate.gptq_qparams(module, 4, group_size, symmetric)
        if stored is not None:  # GPTQ's scales (quant.gptq), when they reproduce w exactly
            packed, scale, zero = _int4.quantize_weight_with(w, *stored, group_size=group_size)
            if _exact(_int4.dequantize_weight(packed, scale, zero, group_size), w, "w4"):
                out.weight_packed, out.weight_scale, out.weight_zero = packed, scale, zero
                stored = True
        if stored is not True:
            out.weight_packed, out.weight_scale, out.weight_zero = _int4.quantize_weight(
                w, group_size, symmetric, method)
        out._set_bias(module)
        _set_multiplier(out, module, w.device)
        return out.to(w.device)

    def dequantized_weight(self):
        return _int4.dequantize_weight(self.weight_packed, self.weight_scale, self.weight_zero,
                                       self.group_size)

    def forward(self, x):
        x = _apply_multiplier(x, self.input_multiplier)
        w = self.dequantized_weight().to(x.dtype)
        return torch.nn.functional.linear(x, w, None if self.bias is None else
                                          self.bias.to(x.dtype))

    def extra_repr(self):
        return (super().extra_repr() + f", group_size={self.group_size}, "
                f"symmetric={self.symmetric}")


SCHEMES = {
    "w8a8": Int8Linear,
    "2:4": Sparse24Linear,
    "2:4+w8a8": Sparse24Int8Linear,
    "w8": Int8WeightOnlyLinear,
    "w4": Int4Linear,
}

# replace_linear(scheme, activation="static"): the scheme's static-activation module
STATIC_SCHEMES = {"w8a8": StaticInt8Linear}

__all__ = ["Int8Linear", "Sparse24Linear", "Sparse24Int8Linear", "StaticInt8Linear",
           "Int8WeightOnlyLinear", "Int4Linear", "SCHEMES", "STATIC_SCHEMES", "linear_weight"]
