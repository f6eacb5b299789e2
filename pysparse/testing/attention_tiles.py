"""Python models of the CUDA flash-attention kernel (csrc/cuda/attention.{h,cu}), for CPU tests.

Two models, with what each covers and what it does not:

* **Tile schedule** (``key_tiles``, ``key_visible``, ``block_coord``, ``num_ctas``): line-by-line
  transcriptions of the ``PYSPARSE_HD`` functions in attention.h, which the kernel calls
  unchanged. tests/test_cuda_attention.py compiles attention.h with the host compiler and
  checks that the C++ functions return exactly what these return on a grid of sizes, and that
  the schedule they define (visit tiles [0, end), per-element predicate on tiles >=
  first_masked) reproduces the reference attention's causal / Sk-tail semantics.

* **Warp-level dataflow** (``emulate_attention``): numpy re-enactment of one CTA per
  (batch, head, query block) with 4 warps x 32 lanes, using the kernel's own index formulas
  (swizzled shared-memory offsets, the cp.async row/chunk split, the per-lane ldmatrix
  addresses, the register order of the P -> A operand reuse, the online-softmax rescaling and
  the epilogue), and the PTX ISA's fragment layouts of ldmatrix(.trans) and
  mma.m16n8k16. It catches a wrong lane->address formula, a swizzle that maps two chunks to one
  slot, a wrong fragment order, a wrong skip/mask decision. It does NOT run the compiled code:
  the formulas are transcribed by hand from attention.cu (keep them in sync), the fragment
  layouts come from the PTX documentation as read by the same author, global-memory address
  arithmetic (strides, pointer offsets, 32-bit in-tile offsets) is not modelled, nor are
  cp.async ordering, barriers, ex2.approx rounding or the hardware's accumulation order.
"""
import math

import numpy as np
import torch

BLOCK_M, BLOCK_N, WARPS = 64, 64, 4  # attention.h kBlockM, kBlockN, kWarps
LOG2E = 1.4426950408889634


# ---- attention.h, transcribed --------------------------------------------------------------

def cdiv(a, b):
    """attention.h ``cdiv`` for a >= 0 (C++ truncating division)."""
    return (a + b - 1) // b


def floordiv(a, b):
    """attention.h ``floordiv``: rounds toward -infinity (b > 0)."""
    return a // b if a >= 0 else -((-a + b - 1) // b)


def key_visible(i, j, seq_q, seq_k, causal):
    """attention.h ``key_visible``: may query row i see key j."""
    return j < seq_k and (not causal or j <= i + (seq_k - seq_q))


def key_tiles(q_block, seq_q, seq_k, block_m, block_n, causal):
    """attention.h ``key_tiles`` -> (end, first_masked)."""
    n_tiles = cdiv(seq_k, block_n)
    end, first_masked = n_tiles, (n_tiles - 1 if seq_k % block_n != 0 else n_tiles)
    if causal:
        shift = seq_k - seq_q
        row_lo = q_block * block_m
        row_hi = min(row_lo + block_m, seq_q) - 1
        key_hi = row_hi + shift
        e = 0 if key_hi < 0 else key_hi // block_n + 1  # key_hi >= 0: C++ / is floor here
        diag = floordiv(row_lo + shift + 1, block_n)
        end = min(e, n_tiles)
        first_masked = min(max(diag, 0), first_masked)
    return end, first_masked


def block_coord(block_idx, q_blocks, heads_q):
    """attention.h ``block_coord`` -> (q_block, head, batch)."""
    bh = block_idx // q_blocks
    return q_blocks - 1 - block_idx % q_blocks, bh % heads_q, bh // heads_q


def num_ctas(batch, heads_q, seq_q, block_m):
    """attention.h ``num_ctas``."""
    return batch * heads_q * cdiv(seq_q, block_m)


def schedule_keep(seq_q, seq_k, block_m, block_n, causal):
    """The [Sq, Sk] bool matrix of (query, key) pairs the schedule lets through: key tiles
    [0, end) of each query block, all of a tile below first_masked, ``key_visible`` above."""
    keep = np.zeros((seq_q, seq_k), dtype=bool)
    for qb in range(cdiv(seq_q, block_m)):
        end, first_masked = key_tiles(qb, seq_q, seq_k, block_m, block_n, causal)
        rows = range(qb * block_m, min((qb + 1) * block_m, seq_q))
        for t in range(end):
            for j in range(t * block_n, min((t + 1) * block_n, seq_k)):
                for i in rows:
                    keep[i, j] = t < first_masked or key_visible(i, j, seq_q, seq_k, causal)
    return keep


# ---- attention.cu's warp-level dataflow, re-enacted ----------------------------------------

_LANE = np.arange(32)
_G, _QUAD = _LANE // 4, _LANE % 4  # fragment row group and column pair of each lane


def swz(row, chunk, d):
    """attention.cu ``swz``: byte offset of 16-byte chunk ``chunk`` of row ``row``."""
    return (row * (d // 8) + (chunk ^ (row & 7))) * 16


def _load_tile(smem, base, rows_src, valid_rows, n_rows, d):
    """attention.cu ``load_tile``: 128 threads, each copying chunks (row + i * rows_per_pass,
    chunk); rows >= valid_rows zero-filled. Asserts that every slot is written exactly once."""
    chunks = d // 8
    per_pass = WARPS * 32 // chunks
    written = np.zeros(n_rows * chunks, dtype=int)
    for tid in range(WARPS * 32):
        row, chunk = tid // chunks, tid % chunks
        for i in range(n_rows // per_pass):
            r = row + i * per_pass
            off = (base + swz(r, chunk, d)) // 2
            src = rows_src[r, chunk * 8:chunk * 8 + 8] if r < valid_rows else np.zeros(8)
            smem[off:off + 8] = src
            written[(off - base // 2) // 8] += 1
    assert (written == 1).all(), "load_tile: a shared-memory slot written != once"


def _ldmatrix_x4(smem, addr, trans):
    """PTX ldmatrix.m8n8.x4(.trans).b16: lane 8m + r gives the address of row r of matrix m;
    lane l receives, per matrix m, elements (l/4, 2(l%4) + {0,1}), or with .trans
    (2(l%4) + {0,1}, l/4). addr [W, 32] bytes -> [W, 32, 4, 2]."""
    idx = addr[..., None] // 2 + np.arange(8)
    mats = smem[idx].reshape(addr.shape[0], 4, 8, 8)  # [W, matrix, row, col]
    e = np.arange(2)
    if trans:
        vals = mats[:, :, 2 * _QUAD[:, None] + e, _G[:, None]]  # [W, 4, 32, 2]
    else:
        vals = mats[:, :, _G[:, None], 2 * _QUAD[:, None] + e]
    return vals.transpose(0, 2, 1, 3)


def _mma16816(d, a, b0, b1):
    """PTX mma.m16n8k16.row.col, fp32 accumulate. d [W,32,4], a [W,32,4,2], b0/b1 [W,32,2]."""
    w = d.shape[0]
    A, B, C = np.zeros((w, 16, 16)), np.zeros((w, 16, 8)), np.zeros((w, 16, 8))
    for e in range(2):
        A[:, _G, 2 * _QUAD + e] = a[:, :, 0, e]
        A[:, _G + 8, 2 * _QUAD + e] = a[:, :, 1, e]
        A[:, _G, 2 * _QUAD + 8 + e] = a[:, :, 2, e]
        A[:, _G + 8, 2 * _QUAD + 8 + e] = a[:, :, 3, e]
        B[:, 2 * _QUAD + e, _G] = b0[:, :, e]
        B[:, 2 * _QUAD + 8 + e, _G] = b1[:, :, e]
        C[:, _G, 2 * _QUAD + e] = d[:, :, e]
        C[:, _G + 8, 2 * _QUAD + e] = d[:, :, 2 + e]
    D = (A @ B + C).astype(np.float32)
    out = np.empty_like(d)
    for e in range(2):
        out[:, :, e] = D[:, _G, 2 * _QUAD + e]
        out[:, :, 2 + e] = D[:, _G + 8, 2 * _QUAD + e]
    return out


def _round(x, dtype):
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dtype).float().numpy()


def _cta(q, k, v, mask_rows, row0, seq_q, seq_k, causal, scale, dtype, tiles):
    """One CTA of attention_fwd_kernel. q [Sq, D], k/v [Sk, D] (fp32 values of the 16-bit
    inputs), mask_rows [Sq, Sk] additive fp32 (or None). Returns O rows [row0, row0 + 64)."""
    d = q.shape[1]
    bm, bn = BLOCK_M, BLOCK_N
    tile_bytes = bn * d * 2
    s_q, s_k = 0, bm * d * 2
    s_v = s_k + 2 * tile_bytes
    smem = np.zeros((s_v + 2 * tile_bytes) // 2, dtype=np.float32)
    end, first_masked = tiles
    warp = np.arange(WARPS)[:, None]
    lane = _LANE[None, :]
    _load_tile(smem, s_q, q[row0:], seq_q - row0, bm, d)
    if end > 0:
        _load_tile(smem, s_k, k, seq_k, bn, d)
        _load_tile(smem, s_v, v, seq_k, bn, d)
    row_a = row0 + warp * 16 + _G[None, :]  # [W, 32]
    acc = np.zeros((WARPS, 32, d // 8, 4), dtype=np.float32)
    row_max = np.full((WARPS, 32, 2), -np.inf, dtype=np.float32)
    row_sum = np.zeros((WARPS, 32, 2), dtype=np.float32)
    for t in range(end):
        stage = t & 1
        if t + 1 < end:
            key1 = (t + 1) * bn
            _load_tile(smem, s_k + (stage ^ 1) * tile_bytes, k[key1:], seq_k - key1, bn, d)
            _load_tile(smem, s_v + (stage ^ 1) * tile_bytes, v[key1:], seq_k - key1, bn, d)
        s = np.zeros((WARPS, 32, bn // 8, 4), dtype=np.float32)
        k_tile = s_k + stage * tile_bytes
        for kk in range(d // 16):
            qa = _ldmatrix_x4(smem, s_q + swz(warp * 16 + (lane & 15), kk * 2 + (lane >> 4), d),
                              trans=False)
            for n2 in range(bn // 16):
                b = _ldmatrix_x4(smem, k_tile + swz(n2 * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                    kk * 2 + ((lane >> 3) & 1), d), trans=False)
                s[:, :, 2 * n2] = _mma16816(s[:, :, 2 * n2], qa, b[:, :, 0], b[:, :, 1])
                s[:, :, 2 * n2 + 1] = _mma16816(s[:, :, 2 * n2 + 1], qa, b[:, :, 2], b[:, :, 3])
        s *= np.float32(scale)
        if mask_rows is not None or t >= first_masked:
            key0 = t * bn + 2 * _QUAD[None, :]
            for n in range(bn // 8):
                for e in range(4):
                    i = row_a + (e >> 1) * 8
                    j = np.broadcast_to(key0 + n * 8 + (e & 1), i.shape)
                    for w in range(WARPS):
                        for ln in range(32):
                            ii, jj = int(i[w, ln]), int(j[w, ln])
                            if not key_visible(ii, jj, seq_q, seq_k, causal):
                                s[w, ln, n, e] = -np.inf
                            elif mask_rows is not None and ii < seq_q:
                                s[w, ln, n, e] += mask_rows[ii, jj]
        for h in range(2):
            cols = s[:, :, :, 2 * h:2 * h + 2]
            mx = np.maximum(row_max[:, :, h], cols.max(axis=(2, 3)))
            for x in (1, 2):  # __shfl_xor_sync over the quad
                mx = np.maximum(mx, mx[:, _LANE ^ x])
            base = np.where(mx == -np.inf, 0.0, mx).astype(np.float32)
            with np.errstate(invalid="ignore"):
                alpha = np.exp2((row_max[:, :, h] - base) * LOG2E).astype(np.float32)
                p = np.exp2((cols - base[:, :, None, None]) * LOG2E).astype(np.float32)
            row_max[:, :, h] = mx
            s[:, :, :, 2 * h:2 * h + 2] = p
            row_sum[:, :, h] = row_sum[:, :, h] * alpha + p.sum(axis=(2, 3))
            acc[:, :, :, 2 * h:2 * h + 2] *= alpha[:, :, None, None]
        v_tile = s_v + stage * tile_bytes
        pr = _round(s, dtype)  # Elem<T>::pack
        for kk in range(bn // 16):
            a = np.stack([pr[:, :, 2 * kk, 0:2], pr[:, :, 2 * kk, 2:4],
                          pr[:, :, 2 * kk + 1, 0:2], pr[:, :, 2 * kk + 1, 2:4]], axis=2)
            for d2 in range(d // 16):
                b = _ldmatrix_x4(smem, v_tile + swz(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                    d2 * 2 + (lane >> 4), d), trans=True)
                acc[:, :, 2 * d2] = _mma16816(acc[:, :, 2 * d2], a, b[:, :, 0], b[:, :, 1])
                acc[:, :, 2 * d2 + 1] = _mma16816(acc[:, :, 2 * d2 + 1], a, b[:, :, 2],
                                                  b[:, :, 3])
    out = np.full((bm, d), np.nan, dtype=np.float32)
    for h in range(2):
        l_sum = row_sum[:, :, h]
        l_sum = l_sum + l_sum[:, _LANE ^ 1]
        l_sum = l_sum + l_sum[:, _LANE ^ 2]
        with np.errstate(divide="ignore"):
            inv = np.where(l_sum == 0, 0.0, 1.0 / l_sum).astype(np.float32)
        r = (row_a + h * 8 - row0)  # [W, 32]
        for dd in range(d // 8):
            for e in range(2):
                out[r, dd * 8 + 2 * _QUAD[None, :] + e] = acc[:, :, dd, 2 * h + e] * inv
    return out


def emulate_attention(q, k, v, mask=None, causal=False, scale=None):
    """attention_fwd_kernel re-enacted on the CPU (see the module docstring for what that
    covers). q [B, Hq, Sq, D] fp16/bf16 with D in {64, 128}; k, v [B, Hkv, Sk, D]; mask as
    the reference takes it. Returns [B, Hq, Sq, D] in q's dtype."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    assert D in (64, 128) and q.dtype in (torch.float16, torch.bfloat16)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    add = None
    if mask is not None:
        m = mask.expand(B, Hq, Sq, Sk)
        add = (torch.zeros(m.shape).masked_fill(~m, -math.inf) if m.dtype == torch.bool
               else m.float()).numpy()
    out = torch.zeros(B, Hq, Sq, D)
    q_blocks = cdiv(Sq, BLOCK_M)
    qf, kf, vf = q.float().numpy(), k.float().numpy(), v.float().numpy()
    for idx in range(num_ctas(B, Hq, Sq, BLOCK_M)):
        qb, h, b = block_coord(idx, q_blocks, Hq)
        hk = h // (Hq // Hkv)
        row0 = qb * BLOCK_M
        tiles = key_tiles(qb, Sq, Sk, BLOCK_M, BLOCK_N, causal)
        o = _cta(qf[b, h], kf[b, hk], vf[b, hk], None if add is None else add[b, h], row0, Sq,
                 Sk, causal, scale, q.dtype, tiles)
        rows = min(BLOCK_M, Sq - row0)
        out[b, h, row0:row0 + rows] = torch.from_numpy(o[:rows])
    return out.to(q.dtype)
