"""Static activation calibration: one per-tensor int8 scale (and, asymmetric, a uint8 zero point)
per linear layer's input.

``calibrate`` runs the model over calibration data (``pysparse.calib`` convention), feeds every
selected layer's input (real tokens only, after a pending SmoothQuant multiplier, see
quant.capture) to a stateful observer and stores the resulting scale on the layer as the
attribute ``pysparse_input_scale`` (quant.state). ``replace_linear(model, "w8a8",
activation="static")`` then builds StaticInt8Linear modules that quantize with that fixed scale.
"""
from typing import Callable, Iterable

import torch
from torch import nn

from .. import calib as _calib
from ..replace import LayerResult, Report, _shape, linear_layers
from . import observers as _obs
from . import state as _state
from .capture import capture_inputs


@torch.no_grad()
def calibrate(model: nn.Module, calib, tokenizer=None, *, method: str = "minmax",
              include=None, exclude: Iterable[str] | str | None = ("lm_head",),
              filter_fn: Callable | None = None, progress: bool = True,
              percentile: float = 99.99, symmetric: bool = True) -> Report:
    """Record a static activation scale on every selected linear layer (in place).

    method: "minmax" (the largest |x| seen), "percentile" (the ``percentile``-th percentile of
    |x|, from a bounded uniform sample of the inputs) or "mse" (the clipping of the min-max range
    that minimises the int8 quantization MSE of that sample). The scale is per tensor.
    symmetric=True: int8 codes, ``scale = max(amax, 1e-12) / 127``; symmetric=False: uint8 codes
    over [min, max] (widened to hold 0) with a zero point, which spends all 256 codes on a
    one-sided range such as a GELU's output (-0.17 .. max): about twice the resolution there,
    and the native operand of a u8 x s8 dot product (quant.observers). calib / tokenizer: the
    ``pysparse.calib`` convention. Returns a Report: each layer "calibrated" with its amax and
    scale, or "skipped" with the reason (not selected, or never called by the forward).
    Call it after ``pysparse.smooth`` (smoothing changes the inputs and clears stale scales).
    """
    if not isinstance(symmetric, bool):
        raise ValueError(f"pysparse.calibrate: symmetric must be a bool, got {symmetric!r}")
    if method not in _obs.OBSERVERS:
        raise ValueError(f"pysparse.calibrate: unknown method {method!r}; choose one of "
                         f"{', '.join(map(repr, _obs.OBSERVERS))}")
    kw = {"percentile": percentile} if method == "percentile" else {}
    observers = {}
    layers = {}
    report = Report(f"calibrate(method={method!r}, symmetric={symmetric})")
    entries = []
    for name, _parent, _attr, module, reason in linear_layers(model, include, exclude, filter_fn):
        entries.append((name, module, reason))
        if reason is None:
            layers[name] = module
            observers[name] = _obs.make_observer(method, bits=8, symmetric=symmetric,
                                                 granularity="tensor", **kw)
    data = _calib.batches(calib, tokenizer, who="pysparse.calibrate")
    if not layers:
        raise ValueError("pysparse.calibrate: no linear layer selected (check include/exclude/"
                         "filter_fn)")
    with capture_inputs(model, layers, lambda name, x: observers[name].update(x)):
        _calib.run(model, data, desc=f"calibrate ({method})", progress=progress)
    for name, module, reason in entries:
        if reason is None and observers[name].count == 0:
            reason = "not reached by the calibration forward"
        if reason is not None:
            report.layers.append(LayerResult(name, "skipped", reason, _shape(module)))
            continue
        obs = observers[name]
        s, z = obs.qparams()
        scale = float(s)
        zero = None if symmetric else int(z)
        _state.set_input_scale(module, scale, zero)
        lo, hi = float(obs.amin.min()), float(obs.amax.max())
        clip = (f"clip={scale * 127:.4g}" if symmetric else
                f"clip=[{-zero * scale:.4g}, {(255 - zero) * scale:.4g}], zero={zero}")
        report.layers.append(LayerResult(
            name, "calibrated", f"{method}: x in [{lo:.4g}, {hi:.4g}], {clip}, "
                                f"scale={scale:.4g}", _shape(module)))
    return report


__all__ = ["calibrate"]
