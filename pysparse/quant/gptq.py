"""GPTQ (Frantar et al., 2023): weight-only quantization with second-order error compensation.

Layer-sequential like SparseGPT and sharing its machinery (``prune.sequential.replay`` for the
block-by-block replay of calibration data, ``prune.layer_inputs`` for the Hessian
``H = 2 X^T X / n`` over real tokens, ``prune.sparsegpt.prepare_hessian`` / ``obs_sweep`` for the
dampened inverse-Hessian Cholesky factor and the blocked column sweep). Column ``j`` of a weight
is rounded to the grid of its group, and the rounding error is spread over the columns not yet
quantized. The scale (and zero point) of each group of ``group_size`` columns is computed when
the sweep reaches the group's first column, by min-max over the group's *current* weights
(already updated by the earlier columns), as in the GPTQ paper; ``group_size=None`` gives one
scale per output row, from the weights before the sweep.

The layer keeps float weights equal to the dequantized codes, and its quantization parameters
are stored on it (``quant.state.GPTQ``, a plain attribute). Re-deriving the scales by min-max
from the dequantized weights would not always give them back (a group's extreme entry can be
moved by the updates, or clamped), so ``replace_linear`` ("w4" with the same group_size and
symmetric, or "w8" for ``bits=8``) uses the stored scales when they reproduce the weights
exactly, and the conversion is then lossless. Recipe::

    pysparse.quant.gptq.gptq_quantize(model, texts, tokenizer)             # float, in place
    pysparse.replace_linear(model, "w4")                                    # packs the codes

(``gptq_quantize(..., group_size=64, symmetric=False)`` pairs with
``replace_linear(model, "w4", group_size=64, symmetric=False)``; ``bits=8, group_size=None``
with ``replace_linear(model, "w8")``.) A layer changed after ``gptq_quantize`` (or cast to a
half dtype) no longer matches its stored scales and is quantized by round-to-nearest, with a
warning.
"""
import torch
from torch import nn

from .. import calib as _calib
from ..nn.linear import linear_weight
from ..prune.sequential import replay
from ..prune.sparsegpt import obs_sweep, prepare_hessian
from ..replace import LayerResult, Report, _shape, linear_layers
from . import int4 as _int4
from . import observers as _obs
from . import state as _state

_WHO = "pysparse.quant.gptq"


CLIPS = ("minmax", "mse")


def _qparams(cols: torch.Tensor, bits: int, symmetric: bool, clip: str = "minmax"):
    """Per-row (scale fp32, zero int32) of ``cols`` [rows, n]: min-max (as the w4/w8 formats) or
    the MSE-optimal clipping of that range (quant.observers)."""
    return _obs.qparams(cols.float(), bits, "channel", symmetric, clip)


def _check_clip(clip):
    if clip not in CLIPS:
        raise ValueError(f"{_WHO}: clip must be one of {', '.join(map(repr, CLIPS))}, got "
                         f"{clip!r}")


def gptq_solve(w: torch.Tensor, h: torch.Tensor, *, bits: int = 4,
               group_size: int | None = 128, symmetric: bool = True, percdamp: float = 0.01,
               blocksize: int = 128, act_order: bool = False, clip: str = "minmax"):
    """Quantize ``w`` [rows, K] given the Hessian ``h`` [K, K] of its inputs.

    Returns (the dequantized weight, float32 - float64 when ``w`` is -, scale fp32
    [rows, K/G] or [rows] when ``group_size`` is None, zero point uint8 of the same shape or
    None when symmetric). ``act_order`` processes the columns by decreasing Hessian diagonal
    (the inputs that carry the most energy first, while the most columns are left to absorb
    their error); with groups, each group's scale is then fixed before the sweep from the
    weights as given ("static groups": the sweep visits a group's columns out of order).
    Without act_order a group's scale comes from its current, already updated weights when the
    sweep reaches it. ``clip``: "minmax" or "mse" (clipped range with the least squared error)
    for those scales. ``w`` is not modified.
    """
    rows, K = w.shape
    _check_clip(clip)
    if group_size is not None:
        _int4.check_group_size(group_size, K, who="quant.gptq")
        blocksize = -(-blocksize // group_size) * group_size  # groups never straddle blocks
    qmin, qmax = _obs.qrange(bits, symmetric)
    perm = None
    h = h.detach()
    ngroups = 1 if group_size is None else K // group_size
    scale = torch.ones(rows, ngroups, device=w.device)
    zero = torch.zeros(rows, ngroups, dtype=torch.int32, device=w.device)
    static = group_size is None or act_order
    if static:  # every scale from the weights before the sweep
        G = K if group_size is None else group_size
        s, z = _qparams(w.detach().reshape(rows * ngroups, G), bits, symmetric, clip)
        scale[:], zero[:] = s.reshape(rows, ngroups), z.reshape(rows, ngroups)
    group = torch.arange(K, device=w.device) // (K if group_size is None else group_size)
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h, group = w[:, perm], h[perm][:, perm], group[perm]
    W, U = prepare_hessian(w, h, percdamp, who=_WHO)
    group = group.tolist()
    cur = {}

    def fix(W1, d, i1, i):
        j = i1 + i
        g = group[j]
        if not static and j % group_size == 0:
            scale[:, g], zero[:, g] = _qparams(W1[:, i:i + group_size], bits, symmetric, clip)
        if cur.get("g") != g:
            cur.update(g=g, s=scale[:, g], z=zero[:, g].float())
        s, z = cur["s"], cur["z"]
        q = (torch.round(W1[:, i].float() / s) + z).clamp_(qmin, qmax)
        return ((q - z) * s).to(W1.dtype)  # fp32 product, as the formats dequantize

    obs_sweep(W, U, fix, blocksize)
    if perm is not None:
        W = W[:, torch.argsort(perm)]
    if group_size is None:
        scale, zero = scale[:, 0], zero[:, 0]
    return W, scale.contiguous(), None if symmetric else zero.to(torch.uint8).contiguous()


def gptq_quantize(model: nn.Module, calib, tokenizer=None, *, bits: int = 4,
                  group_size: int | None = 128, symmetric: bool = True, percdamp: float = 0.01,
                  blocksize: int = 128, act_order: bool = False, clip: str = "minmax",
                  include=None,
                  exclude=("lm_head",), blocks: str | None = None, batch_size: int = 8,
                  max_length: int = 128, progress: bool = True) -> Report:
    """GPTQ every selected linear layer of ``model`` in place (float weights = dequantized
    codes, scales stored on the layer); returns a per-layer Report. Then call
    ``pysparse.replace_linear(model, "w4", group_size=group_size, symmetric=symmetric)``
    (``"w8"`` for ``bits=8, group_size=None``), which packs exactly these codes (module
    docstring). calib: a list of strings with ``tokenizer``, or tokenized batches.
    act_order / clip: see ``gptq_solve``. A layer with a pending smoothing vector s
    (``pysparse.smooth`` / ``quant.awq.awq_smooth`` on a model where it could not be folded) is
    solved for the weight its quantized module will hold, W * s, against the Hessian of x / s;
    the float weight then holds the result / s, so the float model stays consistent.
    Layers no calibration token reaches are left as they are (round-to-nearest later).
    """
    if bits not in (4, 8):
        raise ValueError(f"{_WHO}: bits must be 4 or 8, got {bits!r}")
    if bits == 8 and (group_size is not None or not symmetric):
        raise ValueError(f"{_WHO}: bits=8 matches the 'w8' scheme only with group_size=None "
                         f"and symmetric=True")
    if group_size is not None:
        _int4.check_group_size(group_size, who="quant.gptq")
    _check_clip(clip)
    report = Report(f"gptq_quantize(bits={bits}, group_size={group_size}, "
                    f"symmetric={symmetric}, act_order={act_order}, clip={clip!r})")
    entries, layers = [], {}
    for name, _parent, _attr, module, reason in linear_layers(model, include, exclude):
        shape = _shape(module)
        if reason is None and group_size is not None and shape[1] % group_size:
            reason = f"in_features={shape[1]} is not a multiple of group_size={group_size}"
        if reason is None:
            layers[name] = module
        entries.append((name, shape, reason))
    notes = {}
    if layers:
        data = _calib.batches(calib, tokenizer, who=f"{_WHO}.gptq_quantize",
                              batch_size=batch_size, max_length=max_length)

        def process(own, stats):
            for name, module in own.items():
                if stats[name].n == 0:
                    notes[name] = "no calibration token reached this layer"
                    continue
                w = linear_weight(module)
                h = stats[name].hessian()
                sv = _state.smooth_vector(module)
                if sv is not None:  # solve for W * s against the Hessian of x / s
                    sv = sv.to(h.device, h.dtype)
                    h = h / sv[:, None] / sv[None, :]
                new, scale, zero = gptq_solve(_state.smoothed_weight(w, module), h, bits=bits,
                                              group_size=group_size, symmetric=symmetric,
                                              percdamp=percdamp, blocksize=blocksize,
                                              act_order=act_order, clip=clip)
                if sv is not None:
                    new = new / sv.to(new.device, new.dtype)
                w.copy_(new.to(w.dtype))
                _state.set_gptq_qparams(module, bits, group_size, symmetric, scale, zero)

        replay(model, data, layers, process, gram=True, blocks=blocks, progress=progress,
               desc="gptq")
    for name, shape, reason in entries:
        if reason is not None:
            report.layers.append(LayerResult(name, "skipped", reason, shape))
        elif name in notes:
            report.layers.append(LayerResult(name, "skipped", notes[name], shape))
        else:
            report.layers.append(LayerResult(name, "quantized", f"int{bits} gptq", shape))
    return report


__all__ = ["gptq_solve", "gptq_quantize"]
