"""Statistics of the inputs of linear layers over calibration tokens.

Forward hooks accumulate, per layer, either the squared norm of every input column (Wanda's
``||X_j||^2``) or the Gram matrix ``X^T X`` (SparseGPT's Hessian ``H = 2 X^T X / n``). Padding
tokens are left out: the model never reads their activations, so they would only bias the
statistics. Which tokens are real comes from the batch's 2-D ``attention_mask``, held by a
``calib.TokenMask`` that the driver updates per batch (or that reads it from the model's own calls).
"""
from contextlib import contextmanager

import torch

from ..calib import TokenMask


class InputStats:
    """Accumulates one linear layer's input statistics (float32, on the layer's device)."""

    def __init__(self, tokens: TokenMask, gram: bool):
        self.tokens = tokens
        self.gram = gram
        self.n = 0
        self.acc = None  # [K] sum of x_j^2, or [K, K] sum of x x^T

    def __call__(self, _module, args, _output):
        x = self.tokens.select(args[0].detach()).float()
        if self.acc is None:
            K = x.shape[-1]
            self.acc = x.new_zeros((K, K) if self.gram else (K,))
        if self.gram:
            self.acc.addmm_(x.t(), x)
        else:
            self.acc.add_(x.pow(2).sum(0))
        self.n += x.shape[0]

    def col_norms(self) -> torch.Tensor:
        """||X_j||_2 over the tokens seen, [K]."""
        sq = self.acc.diagonal() if self.gram else self.acc
        return sq.clamp_min(0).sqrt()

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n, [K, K] (the Hessian of the mean squared reconstruction error)."""
        if not self.gram:
            raise RuntimeError("pysparse.prune: these statistics hold column norms only")
        return self.acc * (2.0 / self.n)


@contextmanager
def collect(layers: dict, tokens: TokenMask, gram: bool):
    """Hook every module of ``layers`` (name -> module); yields name -> InputStats."""
    stats = {name: InputStats(tokens, gram) for name in layers}
    handles = [m.register_forward_hook(stats[name]) for name, m in layers.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


__all__ = ["TokenMask", "InputStats", "collect"]
