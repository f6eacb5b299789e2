"""What ``calibrate`` and ``smooth`` leave on a float linear layer (nn.Linear / Conv1D), read by
``replace_linear`` and ``prepare_qat``.

Two plain attributes (not buffers: they do not change the model's state_dict, ``model.to(dtype)``
never rounds them, and losing them never changes what the float model computes):

* ``pysparse_input_scale`` (float): the static per-tensor int8 scale of the layer's input
  (``pysparse.calibrate``), i.e. of the input *after* the smoothing multiplier below; with
  ``pysparse_input_zero`` (int in [0, 255]) when the calibration was asymmetric (uint8 codes
  with that zero point).
* ``pysparse_smooth`` (fp32 tensor [K]): a pending SmoothQuant vector ``s`` for a layer whose
  input could not be rescaled exactly upstream (post-LN models such as BERT, inputs behind a
  non-linearity). The float layer is unchanged; a W8A8 module built from it quantizes
  ``W * s`` (columns) and multiplies its input by ``1 / s`` before quantizing, so
  ``(x / s) @ (W * s)^T == x @ W^T`` up to float rounding.
"""
import torch

INPUT_SCALE = "pysparse_input_scale"
INPUT_ZERO = "pysparse_input_zero"
SMOOTH = "pysparse_smooth"
# GPTQ (quant.gptq): dict(bits, group_size, symmetric, scale, zero) of the codes the float
# weight holds, read by the w4 / w8 modules' from_linear
GPTQ = "pysparse_gptq"


def set_gptq_qparams(module, bits, group_size, symmetric, scale, zero):
    setattr(module, GPTQ, dict(bits=int(bits), group_size=group_size, symmetric=bool(symmetric),
                               scale=scale, zero=zero))


def gptq_qparams(module, bits, group_size, symmetric):
    """(scale, zero) stored by GPTQ for these format options, or None."""
    p = getattr(module, GPTQ, None)
    if p is None or (p["bits"], p["group_size"], p["symmetric"]) != (bits, group_size,
                                                                       bool(symmetric)):
        return None
    return p["scale"], p["zero"]


def input_scale(module):
    """The calibrated static activation scale (float) or None."""
    return getattr(module, INPUT_SCALE, None)


def input_zero(module):
    """The calibrated uint8 zero point (int) of an asymmetric static scale, or None."""
    return getattr(module, INPUT_ZERO, None)


def set_input_scale(module, scale: float, zero_point: int | None = None):
    setattr(module, INPUT_SCALE, float(scale))
    if zero_point is None:
        if hasattr(module, INPUT_ZERO):
            delattr(module, INPUT_ZERO)
    else:
        setattr(module, INPUT_ZERO, int(zero_point))


def clear_input_scale(module):
    for name in (INPUT_SCALE, INPUT_ZERO):
        if hasattr(module, name):
            delattr(module, name)


def smooth_vector(module):
    """The pending smoothing vector s (fp32 [K]) or None."""
    return getattr(module, SMOOTH, None)


def set_smooth_vector(module, s: torch.Tensor):
    setattr(module, SMOOTH, s.detach().float().clone())


def input_multiplier(module, device=None):
    """1 / s on ``device`` (fp32), or None when the layer has no pending smoothing."""
    s = smooth_vector(module)
    if s is None:
        return None
    return (1.0 / s).to(device if device is not None else s.device)


def effective_input(module, x: torch.Tensor) -> torch.Tensor:
    """What a quantized module built from ``module`` will quantize: x / s (fp32 when smoothed)."""
    m = input_multiplier(module, x.device)
    return x if m is None else x.float() * m


def smoothed_weight(w: torch.Tensor, module) -> torch.Tensor:
    """The [N, K] weight a quantized module built from ``module`` quantizes: W * s (columns, in
    fp32), or ``w`` itself when the layer has no pending smoothing."""
    s = smooth_vector(module)
    if s is None:
        return w
    return w.float() * s.to(w.device)


def copy_state(src, dst):
    """Carry the attributes above from one float module to another (QAT wrappers)."""
    for name in (INPUT_SCALE, INPUT_ZERO, SMOOTH):
        if hasattr(src, name):
            setattr(dst, name, getattr(src, name))


__all__ = ["INPUT_SCALE", "INPUT_ZERO", "SMOOTH", "GPTQ", "set_gptq_qparams", "gptq_qparams",
           "input_scale", "input_zero", "set_input_scale", "clear_input_scale",
           "smooth_vector", "set_smooth_vector", "input_multiplier", "effective_input",
           "smoothed_weight", "copy_state"]
