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


# ----------------------------------------------------------------------------- CPU packing
# The layouts the 2:4 CPU kernels stream (csrc/cpu/kernels.h has the full contract). Both keep
# 16-output-channel panels contiguous along K, with the kept values of a panel's 16 channels
# side by side (one zmm operand) and their 4-bit codes next to them:
#
# "sp24i8" (int8 values), Kb = ceil(K/8), Np = ceil(N/16)*16:
#   values int8 [Np/16, Kb, 64]:  [nb, b, 4*j + t] = values[16*nb + j, 4*b + t]
#   codes uint8 [Np/16, Kb, 16]:  the meta byte meta[16*nb + j, b] of column j at position
#                                 SP24I8_CODE_ORDER.index(j)
#   colsum int32 [Np]:            sum of each channel's values (for the u8 activation trick)
# "sp24f" (fp32 or bf16 values), G = K/4:
#   values [Np/16, G, 32]:        [nb, g, 2*j + t] = values[16*nb + j, 2*g + t] (fp32 or bf16:
#                                 the order does not depend on the dtype, so a module's .to(dtype)
#                                 keeps a valid layout)
#   codes int64 [Np/16, G]:       bits 4j..4j+3 = the code of group g of channel 16*nb + j
# Padding channels hold zero values (code 0b0100 in sp24f, 0 in sp24i8).
SP24I8_CODE_ORDER = (0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15)
CPU_FLOAT_DTYPES = (torch.float32, torch.bfloat16)


def _check_canonical(values, meta, who):
    if values.dim() != 2 or meta.dim() != 2 or meta.dtype != torch.uint8 or values.numel() == 0:
        raise ValueError(f"pysparse.formats.sparse24.{who}: expected values [N, K/2] and meta "
                         f"uint8 [N, ceil(K/8)], got {tuple(values.shape)} and "
                         f"{tuple(meta.shape)} {meta.dtype}")
    N, half = values.shape
    K = 2 * half
    if K % 4 or meta.shape != (N, (K + 7) // 8):
        raise ValueError(f"pysparse.formats.sparse24.{who}: meta shape {tuple(meta.shape)} does "
                         f"not match values {tuple(values.shape)}")
    unpack_meta(meta, K)  # raises on a corrupt code
    return N, K


def pack_cpu_int8(values_q: torch.Tensor, meta: torch.Tensor):
    """Canonical int8 2:4 -> sp24i8: (values int8 [Np/16, Kb, 64], codes uint8 [Np/16, Kb, 16],
    colsum int32 [Np])."""
    if values_q.dtype != torch.int8:
        raise ValueError(f"pysparse.formats.sparse24.pack_cpu_int8: values must be int8, got "
                         f"{values_q.dtype}")
    N, K = _check_canonical(values_q, meta, "pack_cpu_int8")
    Np, KB = -(-N // 16) * 16, -(-K // 8)
    v = torch.nn.functional.pad(values_q, (0, 4 * KB - K // 2, 0, Np - N))
    packed_v = v.reshape(Np // 16, 16, KB, 4).permute(0, 2, 1, 3).reshape(Np // 16, KB, 64)
    c = torch.nn.functional.pad(meta, (0, 0, 0, Np - N)).reshape(Np // 16, 16, KB).permute(0, 2, 1)
    packed_c = c[..., list(SP24I8_CODE_ORDER)]
    colsum = v.sum(dim=1, dtype=torch.int32)
    return packed_v.contiguous(), packed_c.contiguous(), colsum.contiguous()


def unpack_cpu_int8(packed_v, packed_c, N: int, K: int):
    """Inverse of pack_cpu_int8 -> canonical (values_q [N, K/2], meta [N, ceil(K/8)])."""
    Np, KB = -(-N // 16) * 16, -(-K // 8)
    if (K % 4 or packed_v.dtype != torch.int8 or packed_v.numel() != Np * KB * 4
            or packed_c.dtype != torch.uint8 or packed_c.numel() != Np * KB):
        raise ValueError(f"pysparse.formats.sparse24.unpack_cpu_int8: buffers do not hold an "
                         f"sp24i8 weight with N={N}, K={K}")
    v = packed_v.reshape(Np // 16, KB, 16, 4).permute(0, 2, 1, 3).reshape(Np, 4 * KB)
    inv = [SP24I8_CODE_ORDER.index(j) for j in range(16)]
    c = packed_c.reshape(Np // 16, KB, 16)[..., inv].permute(0, 2, 1).reshape(Np, KB)
    return v[:N, : K // 2].contiguous(), c[:N].contiguous()


def pack_cpu_float(values: torch.Tensor, meta: torch.Tensor):
    """Canonical fp32/bf16 2:4 -> sp24f: (values [Np/16, K/4, 32] same dtype, codes int64
    [Np/16, K/4])."""
    if values.dtype not in CPU_FLOAT_DTYPES:
        raise ValueError(f"pysparse.formats.sparse24.pack_cpu_float: values must be float32 or "
                         f"bfloat16 for the CPU kernels, got {values.dtype}")
    N, K = _check_canonical(values, meta, "pack_cpu_float")
    Np, G = -(-N // 16) * 16, K // 4
    v = torch.nn.functional.pad(values, (0, 0, 0, Np - N)).reshape(Np // 16, 16, G, 2)
    v = v.permute(0, 2, 1, 3)
    codes = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(N, -1)[:, :G].long()
    codes = torch.nn.functional.pad(codes, (0, 0, 0, Np - N), value=0b0100)
    shifts = 4 * torch.arange(16, dtype=torch.int64)
    # disjoint bit fields: the (wrapping) int64 sum is their bitwise or
    packed_c = (codes.reshape(Np // 16, 16, G) << shifts[None, :, None]).sum(dim=1)
    return v.reshape(Np // 16, G, 32).contiguous(), packed_c.contiguous()


def unpack_cpu_float(packed_v, packed_c, N: int, K: int):
    """Inverse of pack_cpu_float -> canonical (values [N, K/2], meta [N, ceil(K/8)])."""
    Np, G = -(-N // 16) * 16, K // 4
    if (K % 4 or not packed_v.is_floating_point() or packed_v.numel() != Np // 16 * G * 32
            or packed_c.dtype != torch.int64 or packed_c.numel() != Np // 16 * G):
        raise ValueError(f"pysparse.formats.sparse24.unpack_cpu_float: buffers do not hold an "
                         f"sp24f weight with N={N}, K={K}")
    v = packed_v.reshape(Np // 16, G, 16, 2)
    values = v.permute(0, 2, 1, 3).reshape(Np, 2 * G)[:N]
    shifts = 4 * torch.arange(16, dtype=torch.int64)
    codes = ((packed_c.reshape(Np // 16, 1, G) >> shifts[None, :, None]) & 0xF).reshape(Np, G)[:N]
    if G % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    meta = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    return values.contiguous(), meta.contiguous()


# ----------------------------------------------------------------------------- CUDA packing
# The CUDA 2:4 kernels (csrc/cuda/) feed the weight W [N, K] as the sparse A operand of
# ``mma.sp::ordered_metadata.sync.aligned`` (PTX ISA, section "Warp-level matrix multiply-
# accumulate instructions" -> "Matrix multiply-accumulate operation using mma.sp instruction
# with sparse matrix A" -> "Sparse matrix storage" and "Matrix fragments for multiply-accumulate
# operation with sparse matrix A": m16n8k32 .f16/.bf16 and m16n8k64 .s8).
#
# Values need no re-ordering: the A fragment of sparse m16n8k32 f16 is the dense m16n8k16 A
# fragment on the compressed 16x16 tile, and that of sparse m16n8k64 s8 is the dense m16n8k32
# s8 A fragment on the compressed 16x32 tile, so ``ldmatrix.x4`` on the canonical ``values``
# [N, K/2] (row-major) delivers them. Only the metadata is re-packed, into one 32-bit word per
# (16-row tile, mma k-step, thread that holds metadata):
#
#   kind "f16" (m16n8k32, sparsity selector 0, threads 4g+j with j in {0, 1} hold metadata):
#       words [NT, KT, 16] with KT = k-steps of 32 columns; word 2g + j covers the 4-column
#       chunks 4j..4j+3 of the step: bits 4c..4c+3 = the code of chunk 4j+c of row g,
#       bits 16+4c..16+4c+3 = the same chunk of row g+8.
#   kind "int8" (m16n8k64, sparsity selector 0, all four threads of a group hold metadata):
#       words [NT, KT, 32] with KT = k-steps of 64 columns; word 4g + j holds one row's eight
#       chunks: row g + 8 (j % 2), chunks 8 (j // 2) .. 8 (j // 2) + 7 of the step, chunk c of
#       the eight at bits 4c..4c+3.
#
# Provenance: the f16 word layout is the one LLVM's executed MLIR integration test
# sparse-mma-2-4-f16.mlir builds (lanes 4g, 4g+1: low 16 bits row g, high 16 bits row g+8,
# one 16-column half each). For int8 the PTX metadata figures split the k64 step into columns
# 0-31 and 32-63; the per-row 32-bit words follow CUTLASS's int8 metadata element (uint32 = 8
# chunks of one row) and its reorder (rows r and r+8 adjacent), which reproduces the f16 layout
# above when lane l reads word l. This int8 layout is not yet confirmed on a GPU (the
# tests/test_cuda_kernels.py numerics on a CUDA machine do that).
#
# A chunk code is the canonical 4-bit ``i0 | i1 << 2`` (i0 < i1, as ::ordered_metadata needs).
# NT is padded to a multiple of 4 (the kernels' 64-row CTA tile) and KT to a multiple of 2 (two
# k-steps per pipeline stage); padding chunks hold code 0b0100 (i0=0, i1=1, a valid code; the
# matching values are zero-filled by the kernels' predicated loads). Words are stored as int32
# (torch has no uint32 arithmetic); the bit pattern is what the kernels read.
CUDA_META_KINDS = {"f16": 2, "int8": 4}  # kind -> threads per group of four holding metadata
_PAD_CODE = 0b0100


def _meta_shifts(device):
    # [1, h, 1, 1, 1, c]: bit offset of chunk c of row half h inside a metadata word
    c = torch.arange(4, device=device).reshape(1, 1, 1, 1, 1, 4)
    h = torch.arange(2, device=device).reshape(1, 2, 1, 1, 1, 1)
    return 4 * c + 16 * h


def _cuda_meta_geometry(N, K, kind, who):
    if kind not in CUDA_META_KINDS:
        raise ValueError(f"pysparse.formats.sparse24.{who}: kind must be one of "
                         f"{sorted(CUDA_META_KINDS)}, got {kind!r}")
    q = CUDA_META_KINDS[kind]
    step = 16 * q  # dense columns per mma k-step: 32 (f16) or 64 (int8)
    NT = -(-N // 64) * 4
    KT = -(-K // (2 * step)) * 2
    return q, NT, KT


def cuda_meta_shape(N: int, K: int, kind: str):
    """Shape (NT, KT, words) of ``pack_cuda_meta``'s output for a weight [N, K]."""
    q, NT, KT = _cuda_meta_geometry(N, K, kind, "cuda_meta_shape")
    return NT, KT, 8 * q


def pack_cuda_meta(meta: torch.Tensor, K: int, kind: str) -> torch.Tensor:
    """Canonical meta uint8 [N, ceil(K/8)] -> mma.sp metadata words int32 [NT, KT, 8q].

    kind "f16" (mma.sp m16n8k32 .f16/.bf16, q = 2) or "int8" (mma.sp m16n8k64 .s8, q = 4);
    layout in the comment above (PTX ISA "Sparse matrix storage" / metadata figures of the
    mma.sp fragments). Raises ValueError on a bad kind, shape or corrupt code.
    """
    who = "pack_cuda_meta"
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.uint8 or meta.dim() != 2:
        raise ValueError(f"pysparse.formats.sparse24.{who}: meta must be uint8 [N, ceil(K/8)], "
                         f"got {getattr(meta, 'dtype', type(meta).__name__)} "
                         f"{tuple(getattr(meta, 'shape', ()))}")
    N = meta.shape[0]
    if N < 1 or K < 4 or K % 4 or meta.shape[1] != (K + 7) // 8:
        raise ValueError(f"pysparse.formats.sparse24.{who}: meta shape {tuple(meta.shape)} does "
                         f"not match K={K} (K must be a positive multiple of 4)")
    q, NT, KT = _cuda_meta_geometry(N, K, kind, who)
    unpack_meta(meta, K)  # raises on a corrupt code
    G = K // 4
    codes = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(N, -1)[:, :G].long()
    Gp = KT * 4 * q
    codes = torch.nn.functional.pad(codes, (0, Gp - G, 0, NT * 16 - N), value=_PAD_CODE)
    if kind == "f16":
        # row = 16 nt + 8 h + g, chunk = 8 kt + 4 j + c; word 2g + j, bits 16 h + 4 c
        c6 = codes.reshape(NT, 2, 8, KT, 2, 4)
        shifts = _meta_shifts(meta.device)
        words = (c6 << shifts).sum(dim=(1, 5))  # [NT, g, KT, j]; disjoint bit fields
        words = words.permute(0, 2, 1, 3).reshape(NT, KT, 16)
    else:
        # row = 16 nt + 8 h + g, chunk = 16 kt + 8 half + c; word 4g + 2 half + h, bits 4 c
        c6 = codes.reshape(NT, 2, 8, KT, 2, 8)
        shifts = 4 * torch.arange(8, device=meta.device)
        words = (c6 << shifts).sum(dim=5)  # [NT, h, g, KT, half]
        words = words.permute(0, 3, 2, 4, 1).reshape(NT, KT, 32)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.contiguous()


def unpack_cuda_meta(words: torch.Tensor, N: int, K: int, kind: str) -> torch.Tensor:
    """Inverse of ``pack_cuda_meta`` -> canonical meta uint8 [N, ceil(K/8)]."""
    who = "unpack_cuda_meta"
    if N < 1 or K < 4 or K % 4:
        raise ValueError(f"pysparse.formats.sparse24.{who}: need N >= 1 and K a positive "
                         f"multiple of 4, got N={N}, K={K}")
    q, NT, KT = _cuda_meta_geometry(N, K, kind, who)
    if (not isinstance(words, torch.Tensor) or words.dtype != torch.int32
            or tuple(words.shape) != (NT, KT, 8 * q)):
        raise ValueError(f"pysparse.formats.sparse24.{who}: expected int32 words of shape "
                         f"{(NT, KT, 8 * q)} for N={N}, K={K}, kind={kind!r}, got "
                         f"{getattr(words, 'dtype', None)} {tuple(getattr(words, 'shape', ()))}")
    w = words.long() & 0xFFFFFFFF
    if kind == "f16":
        w = w.reshape(NT, KT, 8, 2).permute(0, 2, 1, 3)  # [NT, g, KT, j]
        c6 = (w.reshape(NT, 1, 8, KT, 2, 1) >> _meta_shifts(words.device)) & 0xF
    else:
        w = w.reshape(NT, KT, 8, 2, 2).permute(0, 4, 2, 1, 3)  # [NT, h, g, KT, half]
        c6 = (w.unsqueeze(-1) >> 4 * torch.arange(8, device=words.device)) & 0xF
    codes = c6.reshape(NT * 16, KT * 4 * q)[:N, : K // 4]
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    meta = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    unpack_meta(meta, K)  # raises on a corrupt code
    return meta.contiguous()
