"""Seeing what each linear layer is fed during a calibration forward.

``capture_inputs`` registers a forward pre-hook on each chosen layer and calls ``fn(name, x)``
with the layer's input as a 2-D [tokens, K] fp32 tensor of *real* tokens: when the model is
called with an ``attention_mask`` [B, S] and the layer input is [B, S, K], padding positions are
dropped (they would otherwise widen the ranges with activations nobody reads). The input is the
one a quantized module built from the layer would quantize (``quant.state.effective_input``:
divided by a pending SmoothQuant vector). Other hooks (``on_output``) see module outputs.
"""
from contextlib import contextmanager

import torch

from ..calib import TokenMask
from . import state as _state


@contextmanager
def capture_inputs(model, layers: dict, fn, on_output: dict | None = None):
    """layers: {name: module}; fn(name, x2d). on_output: {module: callback(module, output)}."""
    tokens = TokenMask()

    def layer_pre(name):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = _state.effective_input(module, tokens.select(args[0].detach())).float()
            if x.numel():
                fn(name, x)
        return hook

    handles = []
    try:
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(layer_pre(name)))
        for module, cb in (on_output or {}).items():
            handles.append(module.register_forward_hook(
                lambda mod, args, out, cb=cb: cb(mod, out)))
        with tokens.follow(model):
            yield
    finally:
        for h in handles:
            h.remove()


def main_output(out) -> torch.Tensor:
    """The tensor a model call is about: last_hidden_state, else logits, else the first item."""
    for key in ("last_hidden_state", "logits"):
        t = getattr(out, key, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, torch.Tensor):
        return out
    return out[0]


__all__ = ["capture_inputs", "main_output"]
