"""AWQ (Lin et al., 2024): activation-aware input-channel scaling before weight-only quantization.

A weight column that meets large activations matters more: scaling it up by ``s_j`` (and its
input down by ``s_j``) shrinks its relative rounding error. Per fold step (the same steps as
SmoothQuant: a pre-norm group, a value -> output-projection pair, or one layer with a pending
multiplier; quant.smoothquant), ``s = mean|x|^alpha`` (normalised to a geometric mean of 1 over
its range) with ``alpha`` chosen on a grid in [0, 1] to minimise the squared output error

    sum over the step's layers of || X W^T - (X / s) Q(W * s)^T ||^2

on a uniform sample of real calibration tokens, where Q is the target weight format (int4
group-wise by default). ``alpha = 0`` is ``s = 1``, so on the sample the result is never worse
than no scaling. The vectors are folded upstream where that is exact and left as pending
multipliers otherwise (BERT), exactly as ``pysparse.smooth`` does; the "w4" / "w8" modules and
``quant.gptq`` honour them. Recipe (MiniLM w4 g128: see bench/RESULTS.md)::

    awq_smooth(model, texts, tokenizer, symmetric=False)
    gptq_quantize(model, texts, tokenizer, symmetric=False, act_order=True, clip="mse")
    pysparse.replace_linear(model, "w4", symmetric=False)
"""
import torch
from torch import nn

from ..replace import Report, linear_layers
from . import int4 as _int4
from . import observers as _obs
from . import state as _state
from .smoothquant import S_FLOOR, _weight, rescale_inputs

_WHO = "quant.awq"


class RowSample:
    """A uniform sample (without replacement) of at most ``cap`` rows of the [n, K] tensors
    given to ``add``: every row gets a random key and the ``cap`` smallest keys are kept."""

    def __init__(self, cap: int, seed: int = 0):
        self.cap, self.rows, self.keys = cap, None, None
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor):
        keys = torch.rand(x.shape[0], generator=self.gen)
        x = x.detach().float().cpu()
        if self.rows is not None:
            x, keys = torch.cat([self.rows, x]), torch.cat([self.keys, keys])
        if x.shape[0] > self.cap:
            keep = torch.topk(keys, self.cap, largest=False).indices
            x, keys = x[keep], keys[keep]
        self.rows, self.keys = x, keys


def _fake_quant(w, bits, group_size, symmetric):
    """w [N, K] fake-quantized to the weight format (per group when K allows, else per row)."""
    if group_size is not None and w.shape[1] % group_size == 0:
        gran, g = "group", group_size
    else:
        gran, g = "channel", None
    scale, zero = _obs.qparams(w, bits, gran, symmetric, "minmax", g)
    return _obs.fake_quantize(w, scale, zero, bits, gran, symmetric, g)


def _candidates(act, grid):
    act = act.float().clamp_min(S_FLOOR)
    for i in range(grid + 1):
        alpha = i / grid
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        if bool(torch.isfinite(s).all()) and bool((s > 0).all()):
            yield alpha, s


@torch.no_grad()
def awq_smooth(model: nn.Module, calib, tokenizer=None, *, bits: int = 4,
               group_size: int | None = _int4.DEFAULT_GROUP_SIZE, symmetric: bool = False,
               grid: int = 20, max_tokens: int = 2048, include=None, exclude=("lm_head",),
               filter_fn=None, progress: bool = True) -> Report:
    """Search and apply AWQ input-channel scales on the selected linear layers (in place).

    bits / group_size / symmetric: the weight format the search quantizes to (match the later
    ``replace_linear(model, "w4", group_size=..., symmetric=...)`` / ``gptq_quantize``).
    grid: alphas tried (grid + 1 values in [0, 1]). max_tokens: calibration rows sampled per
    layer for the error. calib / tokenizer: the ``pysparse.calib`` convention. Returns a Report
    (every layer "smoothed" with how, the chosen alpha and the range of s, or "skipped").
    """
    if bits not in (4, 8):
        raise ValueError(f"pysparse.{_WHO}: bits must be 4 or 8, got {bits!r}")
    if group_size is not None:
        _int4.check_group_size(group_size, who=_WHO)
    if not isinstance(symmetric, bool):
        raise ValueError(f"pysparse.{_WHO}: symmetric must be a bool, got {symmetric!r}")
    for name, v, lo in (("grid", grid, 1), ("max_tokens", max_tokens, 16)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"pysparse.{_WHO}: {name} must be an integer >= {lo}, got {v!r}")
    samples, modules, chosen = {}, {}, {}

    def on_input(name, x):
        if name not in samples:
            samples[name] = RowSample(max_tokens, seed=len(samples))
        samples[name].add(x)

    def vector(members, act, _w_max, expand):
        layers = []
        for n in members:
            x = samples[n].rows
            w = _state.smoothed_weight(_weight(modules[n]).detach().float(), modules[n])
            layers.append((x, w, x @ w.T))
        best = None
        for alpha, s in _candidates(act, grid):
            full = expand(s)
            err = 0.0
            for x, w, ref in layers:
                sd = full.to(w.device)
                wq = _fake_quant(w * sd, bits, group_size, symmetric)
                err += float((ref - (x / sd.to(x.device)) @ wq.T).pow(2).sum())
            if best is None or err < best[0]:
                best = (err, alpha, s)
        for n in members:
            chosen[n] = best[1]
        return best[2]

    for name, _p, _a, module, _r in linear_layers(model, include, exclude, filter_fn):
        modules[name] = module
    report = rescale_inputs(
        model, calib, tokenizer, title=f"awq_smooth(bits={bits}, group_size={group_size}, "
        f"symmetric={symmetric})", who=_WHO, stat=lambda x: x.abs().sum(dim=0), combine=torch.add,
        vector=vector, include=include, exclude=exclude, filter_fn=filter_fn, progress=progress,
        on_input=on_input)
    for r in report.layers:
        if r.name in chosen:
            r.detail += f"; alpha={chosen[r.name]:.2f}"
    return report


__all__ = ["awq_smooth", "RowSample"]
