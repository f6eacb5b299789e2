"""2:4 semi-structured sparsity along K (the reduction dim), canonical storage.

In every group of 4 consecutive elements of a row at most 2 are non-zero. A weight ``w``
[N, K] (K a multiple of 4) is stored as

* ``values`` [N, K/2]: the two kept elements of each group, in order;
* ``meta`` uint8 [N, ceil(K/8)]: per group a 4-bit code ``i0 | i1 << 2`` (i0 < i1 the kept
  positions, 0..3); two groups per byte, the earlier group in the low nibble; when the number
  of groups is odd the last high nibble is 0.

A group with fewer than 2 non-zeros keeps zero-valued positions (the lowest free indices), so
every group has exactly two (i0 < i1) entries. Backends re-pack from this canonical form.
"""
import torch

_PRUNE_HINT = 'prune it first with pysparse.prune(model, pattern="2:4")'


def _check(w, who, need_float=True):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"pysparse.{who}: expected a tensor, got {type(w).__name__}")
    if need_float and not w.is_floating_point():
        raise ValueError(f"pysparse.{who}: expected a floating-point weight, got {w.dtype}")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"pysparse.{who}: expected a non-empty 2-D weight [N, K], got {tuple(w.shape)}")
    if w.shape[1] % 4:
        raise ValueError(f"pysparse.{who}: 2:4 sparsity needs K (in_features) to be a multiple "
                         f"of 4, got K={w.shape[1]}")
    if w.is_floating_point() and not bool(torch.isfinite(w).all()):
        raise ValueError(f"pysparse.{who}: weight contains NaN or Inf")


def mask_24(w: torch.Tensor) -> torch.Tensor:
    """Bool mask [N, K] keeping the 2 largest-|w| elements of every group of 4 (ties: lower index)."""
    _check(w, "formats.sparse24.mask_24")
    N, K = w.shape
    g = w.detach().abs().float().reshape(N, K // 4, 4)
    # a stable descending sort breaks ties toward the lower index, deterministically
    idx = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :2]
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(N, K)


def is_24(w: torch.Tensor) -> bool:
    """True when every group of 4 along K has at most 2 non-zeros (K must be a multiple of 4)."""
    if w.dim() != 2 or w.shape[1] % 4:
        return False
    N, K = w.shape
    return bool(((w != 0).reshape(N, K // 4, 4).sum(-1) <= 2).all())


def _kept_positions(w):
    """[N, G, 2] int64 positions (ascending) of the kept entries of each group."""
    N, K = w.shape
    nz = (w != 0).reshape(N, K // 4, 4)
    # key: non-zeros first, then lower index first -> exactly 2 positions per group
    key = nz.to(torch.int16) * 4 + (3 - torch.arange(4, device=w.device, dtype=torch.int16))
    pos = key.topk(2, dim=-1).indices
    return pos.sort(dim=-1).values


def compress(w: torch.Tensor):
    """Dense 2:4 weight [N, K] -> (values [N, K/2] same dtype, meta uint8 [N, ceil(K/8)]).

    Raises ValueError if ``w`` is not 2:4 sparse (pointing at ``pysparse.prune``).
    """
    _check(w, "formats.sparse24.compress", need_float=False)
    if not is_24(w):
        N, K = w.shape
        bad = int(((w != 0).reshape(N, K // 4, 4).sum(-1) > 2).sum())
        raise ValueError(f"pysparse.formats.sparse24.compress: weight is not 2:4 sparse ({bad} "
                         f"groups of 4 have more than 2 non-zeros); {_PRUNE_HINT}")
    N, K = w.shape
    pos = _kept_positions(w)
    values = torch.gather(w.reshape(N, K // 4, 4), -1, pos).reshape(N, K // 2)
    codes = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)  # [N, G]
    if codes.shape[1] % 2:
        codes = torch.cat([codes, codes.new_zeros(N, 1)], dim=1)
    meta = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return values.contiguous(), meta.contiguous()


def unpack_meta(meta: torch.Tensor, K: int) -> torch.Tensor:
    """meta uint8 [N, ceil(K/8)] -> kept positions int64 [N, K/4, 2]."""
    N = meta.shape[0]
    codes = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(N, -1)[:, : K // 4].long()
    pos = torch.stack([codes & 3, codes >> 2], dim=-1)
    if bool((pos[..., 0] >= pos[..., 1]).any()):
        raise ValueError("pysparse.formats.sparse24: corrupt meta (a group code has i0 >= i1)")
    return pos


def decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(values [N, K/2], meta [N, ceil(K/8)]) -> dense [N, K] in values' dtype."""
    if values.dim() != 2 or meta.dim() != 2 or meta.dtype != torch.uint8:
        raise ValueError("pysparse.formats.sparse24.decompress: expected values [N, K/2] and "
                         f"meta uint8 [N, ceil(K/8)], got {tuple(values.shape)} and "
                         f"{tuple(meta.shape)} {meta.dtype}")
    N, half = values.shape
    K = 2 * half
    if K % 4 or meta.shape != (N, (K + 7) // 8):
        raise ValueError(f"pysparse.formats.sparse24.decompress: meta shape {tuple(meta.shape)} "
                         f"does not match values {tuple(values.shape)}")
    pos = unpack_meta(meta, K)
    out = values.new_zeros(N, K // 4, 4)
    out.scatter_(-1, pos, values.reshape(N, K // 4, 2))
    return out.reshape(N, K)
