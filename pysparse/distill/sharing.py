"""Cross-layer weight sharing (ALBERT-style): several transformer blocks become one module.

``share_layers(model, every=2)`` ties blocks 0-1, 2-3, ...; ``groups=[[0, 1, 2], [3, 4, 5]]``
gives the groups explicitly. Each group's blocks are replaced by one module (the group's first
block) whose floating-point parameters are initialised to the mean of the group's (``init=
"mean"``, a better starting point for the distillation that should follow) or kept as the
first block's (``init="first"``). The model computes with fewer distinct weights at the same
cost; ``pysparse.save`` stores each shared block once and ``pysparse.load`` ties it again.

Supported: the BERT family, GPT-2 and the Llama family (the block lists prune.structured knows).
Decoder KV caches index layers by ``layer_idx``: a shared block keeps its first position's
index, so run shared decoder models with ``use_cache=False``.
"""
import torch
from torch import nn

from ..prune import structured as _st

_WHO = "pysparse.share_layers"


def share_layers(model: nn.Module, every: int | None = None, groups=None,
                 init: str = "mean") -> list:
    """Tie blocks of ``model`` in place; returns the groups (lists of block indices) tied."""
    fam = _st._family(model)
    _parent, _attr, blocks = _st._blocks(model, fam)
    n = len(blocks)
    if (every is None) == (groups is None):
        raise ValueError(f"{_WHO}: give exactly one of every= or groups=")
    if init not in ("mean", "first"):
        raise ValueError(f"{_WHO}: init must be 'mean' or 'first', got {init!r}")
    if every is not None:
        if not isinstance(every, int) or isinstance(every, bool) or not 2 <= every <= n:
            raise ValueError(f"{_WHO}: every must be an integer in [2, {n}], got {every!r}")
        groups = [list(range(i, min(i + every, n))) for i in range(0, n, every)]
    groups = [[int(i) for i in g] for g in groups]
    flat = [i for g in groups for i in g]
    if any(not 0 <= i < n for i in flat) or len(flat) != len(set(flat)):
        raise ValueError(f"{_WHO}: groups {groups} must be disjoint block indices in [0, {n})")
    if len({id(blocks[i]) for i in flat}) != len(flat):
        raise ValueError(f"{_WHO}: some of the blocks {flat} are already shared")
    for g in groups:
        if len({tuple((k, tuple(p.shape)) for k, p in blocks[i].state_dict().items())
                for i in g}) != 1:
            raise ValueError(f"{_WHO}: blocks {g} have different shapes (structured pruning?) "
                             f"and cannot share weights")
    tied = []
    for g in [g for g in groups if len(g) > 1]:
        keep = blocks[g[0]]
        if init == "mean":
            with torch.no_grad():
                states = [dict(blocks[i].named_parameters()) for i in g]
                for name, p in keep.named_parameters():
                    if p.is_floating_point():
                        p.copy_(torch.stack([s[name].detach().float() for s in states]).mean(0)
                                .to(p.dtype))
        for i in g[1:]:
            blocks[i] = keep
        tied.append(g)
    return tied


def distinct_parameters(model: nn.Module) -> int:
    """Number of parameters counted once per distinct tensor (shared blocks once)."""
    return sum(p.numel() for p in model.parameters())  # parameters() already deduplicates


__all__ = ["share_layers", "distinct_parameters"]
