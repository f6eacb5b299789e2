"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with second-order weight updates.

For a linear layer with weight W [rows, K] and calibration inputs X [n, K], pruning aims at the
smallest output change ||X W^T - X W'^T||^2, whose Hessian (per row, the rows are independent)
is H = 2 X^T X / n. Columns are processed left to right: when column i is fixed (its pruned
entries set to 0), the error it leaves is spread over the columns not yet fixed with the optimal
brain surgeon update, err_i / [U]_ii * U[i, i:], where U is the upper Cholesky factor of H^-1
(row i of U is the inverse Hessian of the trailing columns i.. restricted to its first row, so
one factorization serves every step). Updates inside a block of ``blocksize`` columns are applied
column by column; those to the columns after the block are batched into one matmul per block
(the "lazy batch" trick). The mask is chosen adaptively from the current, already-updated
weights with the OBS saliency w^2 / [U]_ii^2: per block of columns for unstructured sparsity
(exactly round(sparsity * rows * block) zeros in each block), per group of M columns for N:M.

``H`` is dampened by ``percdamp`` times its mean diagonal (numerical safety); columns that no
calibration token ever activated (zero diagonal) are pruned to 0.
"""
import torch
from torch import nn

from ..nn.linear import linear_weight
from . import masks as _masks
from .criteria import NO_INPUT
from .sequential import replay


def prepare_hessian(w: torch.Tensor, h: torch.Tensor, percdamp: float = 0.01,
                    who: str = "pysparse.prune"):
    """(W, U) for an OBS column sweep: a float copy of ``w`` [rows, K] (float64 when ``w`` is,
    else float32) with the columns no input ever reached (zero Hessian diagonal) set to 0, and
    the upper Cholesky factor ``U`` of the dampened inverse Hessian. Shared with GPTQ."""
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = w.detach().to(dtype).clone()
    H = h.detach().to(device=W.device, dtype=dtype).clone()
    rows, K = W.shape
    dead = (H.diagonal() == 0).nonzero().flatten()
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise ValueError(f"{who}: the Hessian of a {rows}x{K} layer is not positive "
                         f"definite (percdamp={percdamp}); raise percdamp or give more "
                         f"calibration data") from None
    return W, U


def obs_sweep(W: torch.Tensor, U: torch.Tensor, fix, blocksize: int = 128) -> torch.Tensor:
    """Fix the columns of ``W`` left to right, in place, spreading each column's error over the
    columns not yet fixed (OBS update with lazy batches of ``blocksize`` columns).

    ``fix(W1, d, i1, i)`` returns the new value of column ``i1 + i``: ``W1`` is the current
    block (columns i1.., already updated by every earlier column), ``d`` the diagonal of ``U``
    over the block. SparseGPT returns the column with its pruned entries zeroed, GPTQ its
    quantized value. Every column of the result is exactly what ``fix`` returned.
    """
    K = W.shape[1]
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = U1.diagonal()
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            new = fix(W1, d, i1, i)
            err = (W1[:, i] - new) / d[i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            W1[:, i] = new
            err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:].sub_(err1 @ U[i1:i2, i2:])
    return W


def sparsegpt_solve(w: torch.Tensor, h: torch.Tensor, *, sparsity: float | None = None,
                    nm: tuple | None = None, mask: torch.Tensor | None = None,
                    blocksize: int = 128, percdamp: float = 0.01):
    """Prune ``w`` [rows, K] given the Hessian ``h`` [K, K] of its inputs.

    Exactly one of ``sparsity`` (unstructured), ``nm`` ((N, M), along K) or ``mask`` (a fixed
    bool keep mask [rows, K]) says what to prune. Returns (the pruned and updated weight in
    float32 - float64 when ``w`` is float64 -, the keep mask). ``w`` is not modified.
    """
    if sum(x is not None for x in (sparsity, nm, mask)) != 1:
        raise ValueError("pysparse.prune.sparsegpt_solve: give exactly one of sparsity, nm, mask")
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"pysparse.prune: sparsegpt blocksize={blocksize} must be a multiple "
                         f"of M={nm[1]} (the N:M groups must not straddle blocks)")
    W, U = prepare_hessian(w, h, percdamp)
    rows, K = W.shape
    keep = torch.ones(rows, K, dtype=torch.bool, device=W.device)

    def fix(W1, d, i1, i):
        keep1 = keep[:, i1:i1 + W1.shape[1]]  # a view: filled in place
        if i == 0:
            if mask is not None:
                keep1.copy_(mask[:, i1:i1 + W1.shape[1]].to(W.device))
            elif sparsity is not None:
                keep1.copy_(_masks.unstructured_mask(W1.pow(2) / d.pow(2), sparsity))
        if nm is not None and i % nm[1] == 0:
            j = i + nm[1]
            keep1[:, i:j] = _masks.nm_mask(W1[:, i:j].pow(2) / d[i:j].pow(2), *nm)
        return torch.where(keep1[:, i], W1[:, i], 0.0)

    obs_sweep(W, U, fix, blocksize)
    return W, keep


def prune_sparsegpt(model: nn.Module, layers: dict, data: list, *, nm=None, sparsity=None,
                    blocksize: int = 128, percdamp: float = 0.01, blocks: str | None = None,
                    progress: bool = True) -> dict:
    """Layer-sequential SparseGPT on the selected ``layers`` (name -> module), in place.

    Returns name -> note for layers no calibration token reached (pruned by magnitude).
    """
    notes = {}

    def process(own, stats):
        for name, module in own.items():
            w = linear_weight(module)
            if stats[name].n == 0:
                notes[name] = NO_INPUT
                scores = w.abs().float()
                keep = (_masks.nm_mask(scores, *nm) if nm is not None
                        else _masks.unstructured_mask(scores, sparsity))
                w.mul_(keep.to(w.dtype))
                continue
            new, _ = sparsegpt_solve(w, stats[name].hessian(), nm=nm, sparsity=sparsity,
                                     blocksize=blocksize, percdamp=percdamp)
            w.copy_(new.to(w.dtype))

    replay(model, data, layers, process, gram=True, blocks=blocks, progress=progress,
           desc="sparsegpt")
    return notes


__all__ = ["prepare_hessian", "obs_sweep", "sparsegpt_solve", "prune_sparsegpt"]
