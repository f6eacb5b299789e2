"""Masks from scores: N:M along K, unstructured per layer / per row / over many layers.

Every function takes non-negative importance scores (higher = keep) and returns a bool keep
mask of the same shape. Counts are exact (``round(sparsity * count)`` zeros); ties are broken
deterministically toward keeping the lower index, as ``formats.sparse24.mask_24`` does.
"""
import re

import torch

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(pattern: str):
    """"N:M" -> (N, M) with 1 <= N < M; None when ``pattern`` is not of that form."""
    found = _NM.match(pattern) if isinstance(pattern, str) else None
    if found is None:
        return None
    n, m = int(found.group(1)), int(found.group(2))
    return (n, m) if 1 <= n < m else None


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every group of ``m`` consecutive elements of a row.

    scores [rows, K] with K a multiple of m.
    """
    rows, K = scores.shape
    g = scores.detach().float().reshape(rows, K // m, m)
    # a stable descending sort breaks ties toward the lower index, deterministically
    idx = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :n]
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, K)


def is_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` along K (the last dim) has at most ``n`` non-zeros."""
    if w.dim() != 2 or w.shape[1] % m:
        return False
    return bool(((w != 0).reshape(w.shape[0], -1, m).sum(-1) <= n).all())


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask (any shape) zeroing exactly the ``k`` lowest scores (ties: the later ones go)."""
    flat = scores.detach().float().reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k <= 0:
        return keep.reshape(scores.shape)
    if k >= flat.numel():
        return torch.zeros_like(keep).reshape(scores.shape)
    t = flat.kthvalue(k).values
    below = flat < t
    keep[below] = False
    ties = (flat == t).nonzero().flatten()
    keep[ties[ties.numel() - (k - int(below.sum())):]] = False
    return keep.reshape(scores.shape)


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``sparsity`` fraction of lowest scores of the whole tensor."""
    return lowest_k(scores, int(round(sparsity * scores.numel())))


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``sparsity`` fraction of lowest scores of every row (Wanda's comparison group)."""
    rows, K = scores.shape
    k = int(round(sparsity * K))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        # descending + stable: among equal scores the higher index comes last and goes first
        order = torch.sort(scores.detach().float(), dim=-1, descending=True, stable=True).indices
        keep.scatter_(-1, order[:, K - k:], False)
    return keep


def global_masks(scores: list, sparsity: float) -> list:
    """One threshold over all tensors: zero the ``sparsity`` fraction of the lowest scores of
    their union (exact count); returns one keep mask per tensor."""
    sizes = [s.numel() for s in scores]
    flat = torch.cat([s.detach().float().reshape(-1).to(scores[0].device) for s in scores])
    keep = lowest_k(flat, int(round(sparsity * flat.numel())))
    return [k.reshape(s.shape).to(s.device) for k, s in zip(keep.split(sizes), scores)]


__all__ = ["parse_nm", "nm_mask", "is_nm", "lowest_k", "unstructured_mask", "row_mask",
           "global_masks"]
