"""Quantization-aware training for W8A8.

``prepare_qat`` swaps each selected nn.Linear / Conv1D for a ``QATLinear`` (an nn.Linear, so
optimizers, ``prune`` and ``replace_linear`` see an ordinary linear layer) whose forward
fake-quantizes with exactly the math of the real ``Int8Linear``: weights symmetric int8 per
output channel, activations symmetric int8 per token (``scale = max(amax, 1e-12) / 127``, round
half to even, ±127), product and bias in fp32, output cast to x's dtype. Gradients use the
straight-through estimator: d(fake_quant(x))/dx = 1 where x lies inside the clip range
``[qmin * scale, qmax * scale]`` and 0 outside; scales are computed from detached values and get
no gradient (with min-max scales every value is inside, so the gradient is the identity).
``convert_qat`` turns them into ``Int8Linear`` (``replace_linear``).
"""
from typing import Callable, Iterable

import torch
from torch import nn

from ..formats import int8 as _int8
from ..nn.linear import linear_weight
from ..replace import LayerResult, Report, _shape, linear_layers, replace_linear
from . import observers as _obs
from . import state as _state

SCHEMES = ("w8a8",)


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        q = torch.round(x / scale)
        if zero_point is not None:
            q = q + zero_point
        inside = (q >= qmin) & (q <= qmax)
        q = q.clamp(qmin, qmax)
        if zero_point is not None:
            q = q - zero_point
        ctx.save_for_backward(inside)
        return q * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None, None, None


def fake_quantize_ste(x, scale, zero_point=None, bits=8, granularity="tensor", symmetric=True,
                      group_size=None):
    """quant.observers.fake_quantize (computed in fp32, returned in x's dtype) with the
    straight-through gradient: identity inside the clip range, 0 outside; none for the scale."""
    qmin, qmax = _obs.qrange(bits, symmetric)
    shape = x.shape
    xf = x.float()
    if granularity == "group":
        xf = xf.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    s = _obs._expand(scale.detach().float(), x, granularity, group_size)
    zp = None
    if not symmetric and zero_point is not None:
        zp = _obs._expand(zero_point.detach().float(), x, granularity, group_size)
    return _FakeQuantSTE.apply(xf, s, zp, qmin, qmax).reshape(shape).to(x.dtype)


def _per_row_scale(t):
    """Symmetric int8 scale per row of the last dim (Int8Linear's weight and token scales)."""
    return _int8.symmetric_scale(t.detach().abs().amax(dim=-1))


class QATLinear(nn.Linear):
    """nn.Linear whose forward is the fake-quantized W8A8 product (module docstring). Carries
    the attributes of quant.state (a pending SmoothQuant vector is honoured as in Int8Linear)."""

    scheme = "qat-w8a8"

    @classmethod
    def from_linear(cls, module):
        w = linear_weight(module)
        b = getattr(module, "bias", None)
        out = cls(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if b is not None:
                out.bias.copy_(b.detach())
        out.weight.requires_grad_(module.weight.requires_grad)
        _state.copy_state(module, out)
        return out

    def fake_quant_weight(self):
        w = self.weight.float()
        s = _state.smooth_vector(self)
        if s is not None:
            w = w * s.to(w.device)
        return fake_quantize_ste(w, _per_row_scale(w), bits=8, granularity="channel")

    def forward(self, x):
        xf = x.float()
        m = _state.input_multiplier(self, x.device)
        if m is not None:
            xf = xf * m
        x_fq = fake_quantize_ste(xf, _per_row_scale(xf), bits=8, granularity="token")
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x_fq, self.fake_quant_weight(), bias).to(x.dtype)


def prepare_qat(model: nn.Module, scheme: str = "w8a8", *, include=None,
                exclude: Iterable[str] | str | None = ("lm_head",),
                filter_fn: Callable | None = None) -> Report:
    """Turn the selected linear layers of ``model`` into fake-quantizing QATLinear modules;
    train as usual, then ``convert_qat``. scheme: "w8a8" (the only one so far).

    A plain nn.Linear becomes a QATLinear in place and keeps its parameters (the same tensors),
    so an optimizer built before still trains them: QAT can start in the middle of a run
    (``pysparse.distill(..., qat="w8a8", qat_start=0.75)``). Other linears (transformers'
    Conv1D) are replaced by a new QATLinear holding a copy of their weights."""
    if scheme not in SCHEMES:
        raise ValueError(f"pysparse.prepare_qat: unknown scheme {scheme!r}; choose one of "
                         f"{', '.join(map(repr, SCHEMES))}")
    report = Report(f"prepare_qat(scheme={scheme!r})")
    plan = []
    for name, parent, attr, module, reason in linear_layers(model, include, exclude, filter_fn):
        if reason is None and isinstance(module, QATLinear):
            reason = "already a QATLinear"
        if reason is None and not module.weight.is_floating_point():
            reason = f"weight dtype {module.weight.dtype} is not floating point"
        if reason is None and module.weight.device.type == "meta":
            reason = "weight is on the meta device (not materialized)"
        if reason is None:
            plan.append((parent, attr, module))
            report.layers.append(LayerResult(name, "replaced", f"{type(module).__name__} -> "
                                             "QATLinear", _shape(module)))
        else:
            report.layers.append(LayerResult(name, "skipped", reason, _shape(module)))
    for parent, attr, module in plan:
        if type(module) is nn.Linear:  # in place: the same parameter tensors keep training
            module.__class__ = QATLinear
        else:
            setattr(parent, attr, QATLinear.from_linear(module))
    return report


def convert_qat(model: nn.Module, *, backend: str | None = None) -> Report:
    """Turn every QATLinear of ``model`` into the real Int8Linear (in place): the same math,
    with an exact int32 accumulation instead of the fp32 product of dequantized values."""
    if not any(isinstance(m, QATLinear) for m in model.modules()):
        raise ValueError("pysparse.convert_qat: the model has no QATLinear module; call "
                         "pysparse.prepare_qat(model) (and train) first")
    return replace_linear(model, "w8a8", exclude=None, backend=backend,
                          filter_fn=lambda m, _name: isinstance(m, QATLinear))


__all__ = ["prepare_qat", "convert_qat", "QATLinear", "fake_quantize_ste"]
