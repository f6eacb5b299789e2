"""Static activation calibration: one per-tensor symmetric int8 scale per linear layer's input.

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
              percentile: float = 99.99) -> Report:
    """Record a static activation scale on every selected linear layer (in place).

    method: "minmax" (the largest |x| seen), "percentile" (the ``percentile``-th percentile of
    |x|, from a bounded uniform sample of the inputs) or "mse" (the clipping of the min-max range
    that minimises the int8 quantization MSE of that sample). The scale is per tensor and
    symmetric: ``scale = max(amax, 1e-12) / 127`` (quant.observers). calib / tokenizer: the
    ``pysparse.calib`` convention. Returns a Report: each layer "calibrated" with its amax and
    scale, or "skipped" with the reason (not selected, or never called by the forward).
    Call it after ``pysparse.smooth`` (smoothing changes the inputs and clears stale scales).
    """
    if method not in _obs.OBSERVERS:
        raise ValueError(f"pysparse.calibrate: unknown method {method!r}; choose one of "
                         f"{', '.join(map(repr, _obs.OBSERVERS))}")
    kw = {"percentile": percentile} if method == "percentile" else {}
    observers = {}
    layers = {}
    report = Report(f"calibrate(method={method!r})")
    entries = []
    for name, _parent, _attr, module, reason in linear_layers(model, include, exclude, filter_fn):
        entries.append((name, module, reason))
        if reason is None:
            layers[name] = module
            observers[name] = _obs.make_observer(method, bits=8, symmetric=True,
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
        scale = float(obs.qparams()[0])
        _state.set_input_scale(module, scale)
        amax = float(torch.maximum(obs.amin.abs(), obs.amax.abs()).max())
        report.layers.append(LayerResult(
            name, "calibrated", f"{method}: max|x|={amax:.4g}, clip={scale * 127:.4g}, "
                                f"scale={scale:.4g}", _shape(module)))
    return report


__all__ = ["calibrate"]
