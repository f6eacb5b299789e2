"""Pruning front-end. This first version has the magnitude criterion with the 2:4 (N:M along
K) and unstructured per-layer patterns; Wanda, SparseGPT, Taylor and structured pruning come
with the compression-methods work and are refused with a clear message until then."""
from typing import Callable, Iterable

import torch
from torch import nn

from ..formats import sparse24 as _sp24
from ..nn.linear import linear_weight
from ..replace import LayerResult, Report, _shape, linear_layers

METHODS = ("magnitude",)


def _unstructured_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(round(sparsity * w.numel()))
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    thresh = w.abs().flatten().float().kthvalue(k).values
    return w.abs().float() > thresh


@torch.no_grad()
def prune(model: nn.Module, pattern: str | None = None, sparsity: float | None = None,
          method: str = "magnitude", calib=None, tokenizer=None, include=None,
          exclude: Iterable[str] | str | None = ("lm_head",),
          filter_fn: Callable | None = None) -> Report:
    """Zero weights of every selected linear layer in place; returns a per-layer Report.

    pattern="2:4": keep the 2 largest-|w| of every 4 consecutive weights along K (what the 2:4
    kernels need). sparsity=s (0 <= s < 1): unstructured, the s fraction of smallest |w| per
    layer is zeroed. Give exactly one of pattern / sparsity. calib / tokenizer are taken by the
    data-driven methods (not needed by magnitude).
    """
    if method not in METHODS:
        raise ValueError(f"pysparse.prune: method {method!r} is not available in this version; "
                         f"available: {', '.join(METHODS)}")
    if (pattern is None) == (sparsity is None):
        raise ValueError('pysparse.prune: give exactly one of pattern="2:4" or sparsity=<0..1>')
    if pattern is not None and pattern != "2:4":
        raise ValueError(f"pysparse.prune: unknown pattern {pattern!r}; supported: '2:4'")
    if sparsity is not None and not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"pysparse.prune: sparsity must be in [0, 1), got {sparsity}")
    what = f"pattern={pattern!r}" if pattern else f"sparsity={sparsity}"
    report = Report(f"prune({what}, method={method!r})")
    for name, _parent, _attr, module, reason in linear_layers(model, include, exclude, filter_fn):
        shape = _shape(module)
        if reason is None and pattern == "2:4" and shape[1] % 4:
            reason = f"in_features={shape[1]} is not a multiple of 4"
        if reason is not None:
            report.layers.append(LayerResult(name, "skipped", reason, shape))
            continue
        w = linear_weight(module)  # [out, in] view of the parameter's data
        mask = _sp24.mask_24(w) if pattern == "2:4" else _unstructured_mask(w, float(sparsity))
        w.mul_(mask.to(w.dtype))
        zeros = 1.0 - mask.float().mean().item()
        report.layers.append(LayerResult(name, "pruned", f"{zeros:.1%} zeros", shape))
    return report


__all__ = ["prune", "METHODS"]
