"""Importance scores [out, in] (float32, higher = keep) of the score-based pruning criteria.

* magnitude: |w|.
* random: uniform noise from a seeded generator (a baseline).
* wanda (Sun et al., 2023): |w_ij| * ||X_j||_2, the weight times the norm of its input feature
  over the real calibration tokens, from one forward pass of the dense model.
* taylor: the first-order Taylor estimate of the loss change when w is removed,
  |w * dL/dw|, with dL/dw the gradient of the calibration loss summed over the batches.

``scorer(...)`` runs whatever pass over the calibration data a method needs and returns
``score(name, module) -> Tensor``.
"""
import torch
from torch import nn

from .. import calib as _calib
from ..nn.linear import linear_weight
from .layer_inputs import TokenMask, collect


def _magnitude(_name, module):
    return linear_weight(module).abs().float()


def _random_scorer(seed: int):
    gen = torch.Generator().manual_seed(int(seed))

    def score(_name, module):
        w = linear_weight(module)
        return torch.rand(w.shape, generator=gen).to(w.device)
    return score


@torch.no_grad()
def wanda_norms(model: nn.Module, layers: dict, data: list, progress: bool = True) -> dict:
    """name -> (||X_j||_2 [K] over the real calibration tokens, number of tokens seen)."""
    tokens = TokenMask()
    with collect(layers, tokens, gram=False) as stats, tokens.follow(model):
        _calib.run(model, data, desc="wanda: input norms", progress=progress)
    return {name: (s.col_norms() if s.n else None, s.n) for name, s in stats.items()}


def _wanda_scorer(norms: dict):
    def score(name, module):
        return linear_weight(module).abs().float() * norms[name][0][None, :]
    return score


def _weight_grad(module):
    g = module.weight.grad
    if g is None:
        return None
    return g if isinstance(module, nn.Linear) else g.t()


def taylor_scores(model: nn.Module, layers: dict, data: list, loss_fn=None,
                  progress: bool = True) -> dict:
    """name -> |w * dL/dw| (float32), dL/dw accumulated over the calibration batches, or None
    for a layer the loss does not depend on.

    Only the selected weights require grad during the pass; every parameter's requires_grad is
    restored afterwards and the selected weights' .grad is cleared (set to None).
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    weights = [m.weight for m in layers.values()]
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights:
            w.grad = None
            w.requires_grad_(True)
        with torch.enable_grad():
            _calib.run(model, data, desc="taylor: gradients", progress=progress, grad=True,
                       loss_fn=loss_fn)
        out = {}
        with torch.no_grad():
            for name, module in layers.items():
                g = _weight_grad(module)
                out[name] = None if g is None else (linear_weight(module) * g).abs().float()
        return out
    finally:
        for w in weights:
            w.grad = None
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


NO_INPUT = "no calibration token reached this layer: pruned by magnitude"
NO_GRAD = "the calibration loss does not depend on this layer: pruned by magnitude"


def scorer(method: str, model: nn.Module, layers: dict, data, *, loss_fn=None, seed: int = 0,
           progress: bool = True):
    """(score(name, module) -> Tensor, name -> note for layers scored by magnitude instead,
    because the data says nothing about them)."""
    if method == "magnitude":
        return _magnitude, {}
    if method == "random":
        return _random_scorer(seed), {}
    if method == "wanda":
        norms = wanda_norms(model, layers, data, progress)
        notes = {n: NO_INPUT for n, (_, count) in norms.items() if count == 0}
        wanda = _wanda_scorer(norms)
        return (lambda n, m: _magnitude(n, m) if n in notes else wanda(n, m)), notes
    if method == "taylor":
        scores = taylor_scores(model, layers, data, loss_fn, progress)
        notes = {n: NO_GRAD for n, s in scores.items() if s is None}
        return (lambda n, m: _magnitude(n, m) if n in notes else scores.pop(n)), notes
    raise ValueError(f"pysparse.prune: {method!r} is not a score-based method")


__all__ = ["scorer", "wanda_norms", "taylor_scores", "NO_INPUT", "NO_GRAD"]
