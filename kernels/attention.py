"""Flash-attention forward in Triton: the CUDA implementation of ``pysparse::attention``.

Contract (the same as ``pysparse.ops.reference.attention``, which defines it):

* ``q`` [B, Hq, Sq, D], ``k`` / ``v`` [B, Hkv, Sk, D], one float dtype (fp16, bf16 or fp32), any
  strides; ``Hq % Hkv == 0`` (grouped-query: query head h reads kv head ``h // (Hq // Hkv)``).
* ``mask``: bool (True = attend) or additive float of any float dtype, broadcastable to
  [B, Hq, Sq, Sk]. It is read through its own (broadcast, i.e. zero) strides; nothing of size
  [B, Hq, Sq, Sk] is ever materialised.
* ``causal``: bottom-right aligned, query i attends key j iff ``j <= i + (Sk - Sq)``.
* ``scale`` defaults to ``1 / sqrt(D)``. Rows with no key to attend give 0.
* Output: a new contiguous [B, Hq, Sq, D] tensor of q's dtype.

One program computes BLOCK_M query rows of one (batch, query head) with an online softmax over
BLOCK_N-key tiles (FlashAttention-2 order: the running max, the running sum and the output
accumulator stay in registers in fp32; P is rounded to the input dtype only as the operand of
the P @ V tensor-core product). Head dims 1 <= D <= 128: the tile is padded to a power of two
>= 16 with masked loads, so D = 80 or 96 work (numerics tested at D = 32, 64, 80 under the
interpreter; D = 64, 128 also built for sm_80 / sm_90).
"""
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pysparse.ops import checks

OP = "attention"
MAX_HEAD_DIM = 128
MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions y and z (heads, batch)

# mask kinds (constexpr MASK_KIND)
NO_MASK, KEEP_MASK, ADDITIVE_MASK = 0, 1, 2

# exp(x) == exp2(x * log2(e)); ex2 is the native special-function-unit instruction
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols,
               CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a [len(rows), len(cols)] tile, zero-filling out-of-range rows/cols. The checks are
    constexpr so the common in-range tiles compile to unpredicated (vectorised) loads."""
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _attn_step(acc, l_i, m_i, q, k_base, v_base, m_base, start_n,
               offs_m, offs_d, k_cols, v_cols,
               stride_kn, stride_vn, stride_mm, stride_mn,
               Sq, Sk, D, diag, sm_scale,
               BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, BOUNDARY: tl.constexpr,
               CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_BCAST_M: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """One BLOCK_N-key tile of the online softmax. BOUNDARY tiles may run past Sk or cross the
    causal diagonal and get per-element masks; interior tiles skip that work."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(k_base + offs_n[:, None] * stride_kn + k_cols[None, :],
                   offs_n, Sk, offs_d, D, BOUNDARY, not EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale

    # The scores stay in natural units (not pre-multiplied by log2 e) so that an additive mask
    # of finfo.min does not overflow to -inf: a row masked entirely by finfo.min then averages
    # v uniformly, exactly like the reference's softmax.
    if MASK_KIND != 0:
        if MASK_BCAST_M:  # key-padding masks ([B, 1, 1, Sk]): one row serves every query
            mv = tl.load(m_base + offs_n * stride_mn, mask=offs_n < Sk, other=0)[None, :]
        else:
            mv = tl.load(m_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                         mask=(offs_m[:, None] < Sq) & (offs_n[None, :] < Sk), other=0)
        if MASK_KIND == 1:
            s = tl.where(mv != 0, s, float("-inf"))
        else:
            s = s + mv.to(tl.float32)
    if BOUNDARY:
        keep = offs_n[None, :] < Sk
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
        s = tl.where(keep, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only -inf so far keeps m = -inf; shift it by 0 instead so that
    # exp(-inf - (-inf)) never produces NaN. Its p and alpha are then exactly 0.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2((m_i - m_shift) * _LOG2E)
    p = tl.math.exp2((s - m_shift[:, None]) * _LOG2E)
    l_i = l_i * alpha + tl.sum(p, 1)

    v = _load_tile(v_base + offs_n[:, None] * stride_vn + v_cols[None, :],
                   offs_n, Sk, offs_d, D, BOUNDARY, not EVEN_D)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
        Q, K, V, Mask, Out,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mb, stride_mh, stride_mm, stride_mn,
        stride_ob, stride_oh, stride_om,
        Sq, Sk, D, kv_group, sm_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        EVEN_D: tl.constexpr, UNIT_D: tl.constexpr, CAUSAL: tl.constexpr,
        MASK_KIND: tl.constexpr, MASK_BCAST_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid: (cdiv(Sq, BLOCK_M), Hq, B), i.e. the query blocks of one (batch, head) are
    neighbours in launch order and share K/V in L2. (Heads and batch on separate axes rather
    than one B * Hq axis: grid axes y and z are limited to 65535, and large-batch decoding
    reaches B * Hq > 65535.) Out is contiguous along D (the launcher allocates it).

    Mask is a bool viewed as int8 (MASK_KIND 1) or any float tensor (MASK_KIND 2), addressed
    through 4 strides that are 0 on broadcast dims; with MASK_KIND 0 it is never read.
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    h_kv = h // kv_group  # GQA by index arithmetic: kv_group query heads share one kv head

    # 64-bit base offsets: B * H * S * D can exceed 2**31 elements for long sequences
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    m_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # A unit D stride (the common case, including transposed [B, S, H, D] views) is made a
    # compile-time fact so the loads vectorise; other strides are honoured at run time.
    if UNIT_D:
        q_cols = offs_d
        k_cols = offs_d
        v_cols = offs_d
    else:
        q_cols = offs_d * stride_qd
        k_cols = offs_d * stride_kd
        v_cols = offs_d * stride_vd

    q = _load_tile(q_base + offs_m[:, None] * stride_qm + q_cols[None, :],
                   offs_m, Sq, offs_d, D, True, not EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key range. Causal (bottom-right): row i sees keys j <= i + diag. Tiles wholly below the
    # diagonal of this block's first row need no per-element mask; tiles past the last row's
    # limit are never visited (that is where causal attention saves half the work).
    diag = Sk - Sq
    if CAUSAL:
        hi = tl.minimum(Sk, tl.maximum(0, start_m + BLOCK_M + diag))
        full_hi = (tl.minimum(hi, tl.maximum(0, start_m + diag + 1)) // BLOCK_N) * BLOCK_N
    else:
        hi = Sk
        full_hi = (Sk // BLOCK_N) * BLOCK_N

    for start_n in range(0, full_hi, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, m_base, start_n,
                                   offs_m, offs_d, k_cols, v_cols,
                                   stride_kn, stride_vn, stride_mm, stride_mn,
                                   Sq, Sk, D, diag, sm_scale,
                                   BLOCK_N, EVEN_D, False, CAUSAL, MASK_KIND, MASK_BCAST_M,
                                   DOT_PRECISION)
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, m_base, start_n,
                                   offs_m, offs_d, k_cols, v_cols,
                                   stride_kn, stride_vn, stride_mm, stride_mn,
                                   Sq, Sk, D, diag, sm_scale,
                                   BLOCK_N, EVEN_D, True, CAUSAL, MASK_KIND, MASK_BCAST_M,
                                   DOT_PRECISION)

    # rows that attended nothing have l = 0 and acc = 0: write 0, not 0/0
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = o_base + offs_m[:, None] * stride_om + offs_d[None, :]
    if EVEN_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < Sq)
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty),
                 mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < D))


@dataclass(frozen=True)
class Config:
    """Launch geometry: tile sizes and the num_warps / num_stages Triton compiles with."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def block_d(head_dim: int) -> int:
    """D padded to a power of two >= 16 (tl.arange needs a power of two, tl.dot K >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def pick_config(head_dim: int, seq_q: int, seq_k: int, dtype: torch.dtype, arch: int = 80,
                full_mask: bool = False) -> Config:
    """Tile sizes per (head dim, dtype, arch, mask); arch is 10 * major + minor (80 = A100,
    90 = H100). ``full_mask``: a mask that differs per query row (not a key-padding row).

    The numbers come from the budgets below and from ptxas: every (arch, fp16/bf16, D in
    {32, 64, 80, 96, 128}, causal, mask kind) was compiled for sm_80 and sm_90 and its SASS
    read (tests/test_triton_attention.py keeps four of them per arch, asserting tensor-core
    MMAs and no spills). Not measured on a GPU yet.

    * BLOCK_M = 128 query rows and 8 warps: each warp owns 16 rows (one MMA M), so row max and
      row sum need no cross-warp reduction, and K/V tiles are re-read only Sq / 128 times per
      head. With 4 warps the 128 x 64 score and accumulator tiles sit at ptxas' 255-register
      limit. For short queries (decoding: Sq <= 64) BLOCK_M shrinks to the next power of two
      >= 16 (the smallest MMA M) with 4 warps, so no MMA rows are wasted on padding.
    * BLOCK_N: registers per thread hold the fp32 accumulator (BLOCK_M x BLOCK_D), the scores
      and probabilities (BLOCK_M x BLOCK_N) and, with a full mask, one more BLOCK_M x BLOCK_N
      tile and its pointers; the last two scale with BLOCK_N. sm_80: 64 (32 with a full mask
      at D > 64). sm_90: 128 at D <= 64 (the warpgroup MMA, wgmma, likes a wide N), else 64;
      halved with a full mask.
    * Stages (K and V tiles in flight through cp.async, BLOCK_N x BLOCK_D each, plus a mask
      tile): sm_80 (A100, 163 KB of shared memory per block): 3 at D <= 64, 2 at D = 128
      (48-64 KB). sm_90 (H100, 227 KB): 3 everywhere (80-128 KB).
    * Known leftovers on sm_80 at D > 64 with a mask (D = 128 with a bool mask, D = 80 / 96
      with any mask): ptxas keeps 8-64 bytes of stack, spilled before the key loops and
      reloaded in the boundary loop (the causal diagonal and the Sk tail); the interior loop
      stays spill-free except D = 80 with a full additive mask (2 instructions). BLOCK_N = 16
      removes them but rescales the accumulator 4x as often; left for measurement.
    * fp32 inputs move twice the bytes and multiply with 3xTF32 (see ``dot_precision``), which
      keeps hi/lo halves of both operands live: BLOCK_N = 32 (16 at D > 64), 2 stages. Only
      unmasked D <= 64 is spill-free in fp32; fp32 is the exactness path, fp16/bf16 the fast
      one.
    """
    bd = block_d(head_dim)
    block_m = 128 if seq_q > 64 else max(16, triton.next_power_of_2(max(seq_q, 1)))
    if dtype == torch.float32:
        block_n, stages = (32 if bd <= 64 else 16), 2
    elif arch >= 90:
        block_n, stages = (128 if bd <= 64 else 64), 3
        if full_mask:
            block_n //= 2
    else:
        block_n, stages = 64, (3 if bd <= 64 else 2)
        if full_mask and bd > 64:
            block_n = 32
    warps = 8 if block_m > 64 else 4
    block_n = min(block_n, max(16, triton.next_power_of_2(max(seq_k, 1))))
    return Config(block_m, block_n, warps, stages)


def dot_precision(dtype: torch.dtype) -> str:
    """How tl.dot multiplies. fp16/bf16: native tensor-core MMA (the argument is ignored).
    fp32: "tf32x3" (each operand split into a TF32 high and low part, three TF32 MMAs) keeps
    close to fp32 accuracy, as torch's fp32 matmul promises by default, while still using the
    tensor cores; plain "tf32" (10-bit mantissa) only when the user opted into it through
    torch.backends.cuda.matmul.allow_tf32."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "tf32x3"


def constexprs(head_dim: int, dtype: torch.dtype, causal: bool, mask_kind: int,
               mask_bcast_m: bool, unit_d: bool, cfg: Config) -> dict:
    """The kernel's constexpr arguments for one launch (shared with the build test)."""
    bd = block_d(head_dim)
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, EVEN_D=bd == head_dim,
                UNIT_D=unit_d, CAUSAL=bool(causal), MASK_KIND=mask_kind,
                MASK_BCAST_M=mask_bcast_m, DOT_PRECISION=dot_precision(dtype))


def _fail(msg):
    raise ValueError(f"pysparse.{OP}: {msg}")


def check_args(q, k, v, mask):
    """Validate as the reference does (same messages); return (B, Hq, Sq, D, Hkv, Sk)."""
    checks.tensor(OP, "q", q, checks.FLOAT_DTYPES, ndim=4)
    checks.tensor(OP, "k", k, (q.dtype,), ndim=4, device=q.device)
    checks.tensor(OP, "v", v, (q.dtype,), ndim=4, device=q.device)
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        _fail(f"k and v must be [B={B}, Hkv, Sk, D={D}] and equal, got {tuple(k.shape)} and "
              f"{tuple(v.shape)}")
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hkv < 1 or Hq % Hkv:
        _fail(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if D > MAX_HEAD_DIM:
        _fail(f"the Triton kernel supports head_dim <= {MAX_HEAD_DIM}, got {D}")
    if B > MAX_GRID_YZ or Hq > MAX_GRID_YZ:
        _fail(f"the Triton kernel launches one grid row per head and batch, at most "
              f"{MAX_GRID_YZ} each; got B={B}, Hq={Hq}")
    if mask is not None:
        checks.tensor(OP, "mask", mask, (torch.bool,) + checks.FLOAT_DTYPES, device=q.device)
        full = (B, Hq, Sq, Sk)
        try:
            ok = tuple(torch.broadcast_shapes(mask.shape, full)) == full
        except RuntimeError:
            ok = False
        if not ok:
            _fail(f"mask of shape {tuple(mask.shape)} does not broadcast to [B, Hq, Sq, Sk] = "
                  f"{list(full)}")
    return B, Hq, Sq, D, Hkv, Sk


def _arch(device: torch.device) -> int:
    if device.type != "cuda":  # TRITON_INTERPRET=1 on CPU tensors: plan as for sm_80
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def attention_fwd(q, k, v, mask=None, causal=False, scale=None, *, config: Config | None = None):
    """softmax(q k^T * scale + mask) v with the Triton kernel; see the module docstring.

    ``config`` overrides the tile sizes picked by ``pick_config`` (tests use small tiles to
    cover multi-tile loops on tiny shapes).
    """
    B, Hq, Sq, D, Hkv, Sk = check_args(q, k, v, mask)
    out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if Sk == 0:  # no key at all: every row attends nothing
        return out.zero_()
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    if mask is None:
        mask_kind, m_arg, m_strides = NO_MASK, q, (0, 0, 0, 0)  # q stands in; never read
    else:
        # expand() is a view: broadcast dims get stride 0, nothing is copied
        m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(B, Hq, Sq, Sk)
        if mask.dtype == torch.bool:
            mask_kind, m_arg = KEEP_MASK, m4.view(torch.int8)  # same bytes, loadable by Triton
        else:
            mask_kind, m_arg = ADDITIVE_MASK, m4
        # a dim of size 1 is never indexed past 0: call its stride 0 so that, e.g., a [B,1,1,Sk]
        # mask with Sq == 1 also takes the one-row (MASK_BCAST_M) path
        m_strides = tuple(0 if n == 1 else st for n, st in zip((B, Hq, Sq, Sk), m4.stride()))
    mask_bcast_m = mask_kind != NO_MASK and m_strides[2] == 0
    cfg = config or pick_config(D, Sq, Sk, q.dtype, _arch(q.device),
                                full_mask=mask_kind != NO_MASK and not mask_bcast_m)
    unit_d = q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1

    meta = constexprs(D, q.dtype, causal, mask_kind, mask_bcast_m, unit_d, cfg)
    grid = (triton.cdiv(Sq, cfg.block_m), Hq, B)
    torch.library.wrap_triton(_attn_fwd_kernel)[grid](
        q, k, v, m_arg, out,
        *q.stride(), *k.stride(), *v.stride(), *m_strides,
        out.stride(0), out.stride(1), out.stride(2),
        Sq, Sk, D, Hq // Hkv, float(scale),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta)
    return out
