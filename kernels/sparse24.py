"""2:4 sparse linear in Triton: the CUDA implementation of ``pysparse::sparse24_linear`` and
``pysparse::sparse24_int8_linear``.

Contract (the same as ``pysparse.ops.reference``, which defines it):

* Weights in the canonical 2:4 format (``pysparse/formats/sparse24.py``): ``values`` [N, K/2]
  contiguous, ``meta`` uint8 [N, ceil(K/8)] contiguous, per group of 4 along K a 4-bit code
  ``i0 | i1 << 2``, two groups per byte, the earlier group in the low nibble (with an odd
  number of groups the last high nibble is padding). K is a multiple of 4.
* ``sparse24_linear(x, values, meta, bias)``: x [..., K] fp16/bf16/fp32 (any strides), values
  of x's dtype; ``y = x @ decompress(values, meta).T + bias`` accumulated in fp32, cast to
  x.dtype. fp32 x multiplies with 3xTF32 (``dot_precision``, as the attention kernel):
  error within ``tolerances.FLOAT_MATMUL[float32]``; plain TF32 only when
  ``torch.backends.cuda.matmul.allow_tf32`` is set. Non-finite x raises (as the reference).
* ``sparse24_int8_linear(x, values_q, meta, w_scale, bias)``: x quantized per token by
  ``int8_linear.quantize_rows`` (bit-exact), then as ``int8_linear`` with the int8 weight
  ``decompress(values_q, meta)``: int32 accumulation, fp32 epilogue in the reference's order.

The kernel (``_sparse24_kernel``, one for both; ``QUANT`` picks int8) never writes the dense
weight anywhere: per BLOCK_K slice a program loads the compressed values [BLOCK_N, BLOCK_K/2]
and the metadata bytes [BLOCK_N, BLOCK_K/8], expands them in registers to the dense
[BLOCK_N, BLOCK_K] tile (``expand24``: nibble split, then each of the 4 positions of a group
selects value 0, value 1 or zero) and feeds a dense ``tl.dot`` (HMMA / IMMA on sm_80,
HGMMA / IGMMA or the mma.sync forms on sm_90). The win is bytes: at decode sizes (M <= 16) the
weight stream dominates and is 0.5 + 1/16 of the dense one for fp16, 0.5 + 1/8 for int8;
at large M it is a dense GEMM with a few more ALU ops per weight tile. Tails: the values /
meta loads are masked on K/2 and ceil(K/8), so a partial last slice (and the padding nibble of
an odd group count) expands to zeros; x is masked on K. Tiles: ``candidates`` (autotuned).
"""
import torch
import triton
import triton.language as tl

from pysparse.ops import checks

from .int8_linear import (Config, all_configs, fits_int32, gemm_grid, grouped_tile, has_data,
                          m_bucket, pruner, quant_epilogue, quantize_rows, store_tile)

__all__ = ["Config", "sparse24_linear", "sparse24_int8_linear", "fits_int32"]


@triton.jit
def expand24(vals, codes_packed, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """values [BLOCK_N, BLOCK_K/2] + meta bytes [BLOCK_N, BLOCK_K/8] -> dense [BLOCK_N, BLOCK_K]
    of vals' dtype. Group g of the slice has its code in byte g // 2, nibble g % 2 (low first)."""
    G: tl.constexpr = BLOCK_K // 4
    lo = codes_packed & 0xF
    hi = (codes_packed >> 4) & 0xF
    codes = tl.reshape(tl.join(lo, hi), (BLOCK_N, G))  # [n, b, j] -> group 2b + j
    i0 = (codes & 3)[:, :, None]
    i1 = (codes >> 2)[:, :, None]
    v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, G, 2)))
    pos = tl.arange(0, 4)[None, None, :]
    zero = tl.zeros((BLOCK_N, G, 4), dtype=vals.dtype)
    dense = tl.where(pos == i0, v0[:, :, None], tl.where(pos == i1, v1[:, :, None], zero))
    return tl.reshape(dense, (BLOCK_N, BLOCK_K))


@triton.jit
def _sparse24_kernel(X, V, Meta, XS, WS, Bias, Y, M, N, K, stride_xm, stride_xk, stride_ym,
                     M_BUCKET, QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Y[M, N] = X[M, K] @ decompress(V, Meta)^T (+ epilogue). Grid: (cdiv(M, BLOCK_M) *
    cdiv(N, BLOCK_N),) in grouped order. QUANT: X is the int8 quantized activation, V int8,
    int32 accumulation and the scale epilogue (XS, WS); else float with fp32 accumulation
    (XS, WS unused). M_BUCKET is only the autotune key."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, BLOCK_K // 2)
    offs_b = tl.arange(0, BLOCK_K // 8)
    half = K // 2  # values row stride
    nbytes = (K + 7) // 8  # meta row stride
    rows = offs_m % M  # rows / channels past M / N wrap: loaded, never stored
    chans = offs_n % N
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    v_ptrs = V + chans[:, None] * half + offs_h[None, :]
    m_ptrs = Meta + chans[:, None] * nbytes + offs_b[None, :]
    if QUANT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptrs, mask=offs_k[None, :] < K - k0, other=0)
        vals = tl.load(v_ptrs, mask=offs_h[None, :] < half - k0 // 2, other=0)
        code = tl.load(m_ptrs, mask=offs_b[None, :] < nbytes - k0 // 8, other=0)
        w = expand24(vals, code, BLOCK_N, BLOCK_K)
        if QUANT:
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        v_ptrs += BLOCK_K // 2
        m_ptrs += BLOCK_K // 8
    if QUANT:
        y = quant_epilogue(acc, XS, WS, Bias, offs_m, offs_n, M, N, HAS_BIAS)
    else:
        y = acc
        if HAS_BIAS:
            y = y + tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    store_tile(Y, y, offs_m, offs_n, M, N, stride_ym)


def candidates(bucket: int, arch: int, k_bytes: int = 2) -> list:
    """Tile configs for the 2:4 kernel (``k_bytes``: 1 int8, 2 fp16/bf16, 4 fp32); the first
    is the interpreter's pick. Smaller than the dense int8 GEMM's: the expanded weight tile,
    its codes and the select masks live in registers next to the accumulator, so BLOCK_N *
    BLOCK_K stays <= 8192 (16 K slices of a 128 x 128 int8 tile would spill). ptxas spills at 16 x 128 x 128
    int8 and at 128 x 128 x 64 with 4 warps (sm_80 and sm_90); these lists avoid both, and
    every candidate here was built for sm_80 and sm_90 and found spill-free (the gpu_static
    test keeps the first decode and large pick of fp16/bf16 and int8).
    fp32 runs 3xTF32 (hi/lo operand halves): BLOCK_K 32."""
    s = 1 if arch < 90 else 2
    if k_bytes == 4:
        if bucket <= 16:
            return [Config(16, 64, 32, 1, 4, 2 + s), Config(16, 32, 64, 1, 4, 2 + s)]
        if bucket <= 64:
            return [Config(bucket, 64, 32, 8, 4, 2 + s), Config(64, 32, 32, 8, 4, 2 + s)]
        return [Config(128, 64, 32, 8, 8, 1 + s), Config(64, 64, 32, 8, 4, 2 + s)]
    if bucket <= 16:
        return [Config(16, 64, 128, 1, 4, 2 + s), Config(16, 64, 64, 1, 4, 3 + s),
                Config(16, 32, 128, 1, 4, 3 + s)]
    if bucket <= 64:
        return [Config(bucket, 64, 64, 8, 4, 2 + s), Config(64, 64, 128 // k_bytes, 8, 4, 2 + s)]
    return [Config(128, 128, 64, 8, 8, 1 + s), Config(128, 64, 128 // k_bytes, 8, 8, 1 + s),
            Config(128, 128, 32, 8, 8, 2 + s)]


def _tuned(k_bytes):
    def cands(bucket, arch):
        return candidates(bucket, arch, k_bytes)
    return triton.autotune(
        configs=[c.triton() for c in all_configs(cands)], key=["M_BUCKET", "N", "K"],
        prune_configs_by={"early_config_prune": pruner(cands, "X")})(_sparse24_kernel)


# one autotuner per operand width: each has its own candidate list and cache
_TUNED = {1: _tuned(1), 2: _tuned(2), 4: _tuned(4)}


def dot_precision(dtype: torch.dtype) -> str:
    """fp32: "tf32x3" (close to fp32, on tensor cores), "tf32" only when the user allowed it
    through torch.backends.cuda.matmul.allow_tf32; fp16/bf16/int8 ignore it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "tf32x3"


def _launch(x2, values, meta, xs, w_scale, bias, y, quant, config):
    M, K = x2.shape
    N = values.shape[0]
    args = (x2, values, meta, xs, w_scale, w_scale if bias is None else bias, y, M, N, K,
            x2.stride(0), x2.stride(1), y.stride(0), m_bucket(M))
    meta_kw = dict(QUANT=quant, HAS_BIAS=bias is not None,
                   DOT_PRECISION=dot_precision(x2.dtype))
    if config is None:
        kernel = _TUNED[x2.element_size()]
        torch.library.wrap_triton(kernel)[gemm_grid(M, N)](*args, **meta_kw)
    else:
        torch.library.wrap_triton(_sparse24_kernel)[gemm_grid(M, N)(config.meta())](
            *args, **meta_kw, num_warps=config.num_warps, num_stages=config.num_stages,
            **config.meta())


def check_float_args(x, values, meta, bias):
    """Validate as reference.sparse24_linear does (same messages, finiteness included);
    return (N, K)."""
    op = "sparse24_linear"
    checks.tensor(op, "x", x, checks.FLOAT_DTYPES)
    N, K = checks.sparse24_weight(op, values, meta, x.device, checks.FLOAT_DTYPES)
    checks.activation(op, x, K)
    checks.bias(op, bias, N, x.device)
    if has_data(x):
        checks.sparse_finite(op, x, K)
    return N, K


def check_int8_args(x, values_q, meta, w_scale, bias):
    """Validate as reference.sparse24_int8_linear does (same messages); return (N, K)."""
    op = "sparse24_int8_linear"
    checks.tensor(op, "x", x, checks.FLOAT_DTYPES)
    N, K = checks.sparse24_weight(op, values_q, meta, x.device, (torch.int8,))
    checks.tensor(op, "w_scale", w_scale, checks.FLOAT_DTYPES, ndim=1, device=x.device)
    if w_scale.shape[0] != N:
        raise ValueError(f"pysparse.{op}: w_scale must have shape [{N}], got "
                         f"{tuple(w_scale.shape)}")
    checks.activation(op, x, K)
    checks.bias(op, bias, N, x.device)
    return N, K


def sparse24_linear(x, values, meta, bias=None, *, config: Config | None = None):
    """The Triton pysparse::sparse24_linear; values must have x's dtype (the backend sends
    mixed dtypes to the reference). ``config`` forces the tiles; None autotunes."""
    N, K = check_float_args(x, values, meta, bias)
    if values.dtype != x.dtype:
        raise ValueError(f"pysparse.sparse24_linear: the Triton kernel needs values of x's dtype "
                         f"({x.dtype}), got {values.dtype}")
    x2 = x.reshape(-1, K)
    y = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _launch(x2, values, meta, values, values, bias, y, False, config)
    return y.reshape(*x.shape[:-1], N)


def sparse24_int8_linear(x, values_q, meta, w_scale, bias=None, *,
                         config: Config | None = None):
    """The Triton pysparse::sparse24_int8_linear. ``config`` forces the tiles; None autotunes."""
    op = "sparse24_int8_linear"
    N, K = check_int8_args(x, values_q, meta, w_scale, bias)
    x2 = x.reshape(-1, K)
    y = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        xq, xs = quantize_rows(op, x2)
        _launch(xq, values_q, meta, xs, w_scale, bias, y, True, config)
    return y.reshape(*x.shape[:-1], N)
