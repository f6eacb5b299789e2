"""Statistics of the inputs of linear layers over calibration tokens.

Forward hooks accumulate, per layer, either the squared norm of every input column (Wanda's
``||X_j||^2``) or the Gram matrix ``X^T X`` (SparseGPT's Hessian ``H = 2 X^T X / n``). Padding
tokens are left out: the model never reads their activations, so they would only bias the
statistics. Which tokens are real comes from the batch's 2-D ``attention_mask``, held by a
``TokenMask`` that the driver updates per batch (or that reads it from the model's own calls).
"""
from contextlib import contextmanager

import torch
from torch import nn


class TokenMask:
    """The real-token mask [batch, seq] of the batch now running (None: every token is real)."""

    def __init__(self):
        self.current = None

    def set(self, attention_mask):
        m = attention_mask
        self.current = m.bool() if isinstance(m, torch.Tensor) and m.dim() == 2 else None

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` [..., K] that belong to real tokens, as [n, K]."""
        m = self.current
        if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
            return x[m.to(x.device)]
        return x.reshape(-1, x.shape[-1])

    @contextmanager
    def follow(self, model: nn.Module):
        """Read ``attention_mask`` from every call of ``model`` (for ``calib.run`` passes)."""
        def pre_hook(_module, args, kwargs):
            self.set(kwargs.get("attention_mask"))

        handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()
            self.current = None


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
