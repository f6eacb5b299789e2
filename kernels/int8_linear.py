"""W8A8 linear in Triton: the CUDA implementation of ``pysparse::quantize_per_token`` and
``pysparse::int8_linear``.

Contract (the same as ``pysparse.ops.reference``, which defines it):

* ``quantize_per_token(x)``: x [..., K] fp32/bf16/fp16, any strides -> (q int8 [..., K]
  contiguous, scale fp32 [...]); ``scale = max(amax, 1e-12) / 127`` and
  ``q = clamp(round_half_even(x / scale), -127, 127)``, both divisions IEEE round-to-nearest
  (``div_rn``: Triton's plain ``/`` on fp32 is the 2-ulp ``div.full``), so q and scale are
  bit-exact against the reference. NaN/Inf rows raise the reference's ValueError.
* ``int8_linear(x, w_q, w_scale, bias)``: x [..., K]; w_q int8 [N, K] contiguous; w_scale [N];
  bias [N] or None. ``y = int32(xq @ w_q.T) * x_scale[:, None] * w_scale[None, :] + bias`` in
  fp32 in that order, cast to x.dtype; output a new contiguous [..., N]. The int32 sum is exact
  for K < 2**31 / 127**2 (~133 000). Offsets are 32-bit: M*K, N*K and M*N must be < 2**31
  (``fits_int32``; the backend runs the reference beyond that).

Two launches, not one fused kernel: the per-token scale needs the whole row before any element
can be quantized, so a fused GEMM would recompute each row's amax in every one of the
cdiv(N, BLOCK_N) programs that read it and re-read x in 2-4 bytes per element there. The
prologue reads x once (M*K*2 bytes), writes int8 (M*K bytes) that every N tile then reads at 1
byte per element; next to the N*K weight bytes this is small at decode sizes (M <= 16) and
at large M the GEMM is compute-bound anyway. It costs one extra launch (~3 us).

The quantize kernel (one program per row, ``_quantize_kernel``): rows up to 8192 elements are
held in registers (one load); longer rows are read twice in BLOCK_K chunks, the second pass
from L2. Rounding is done in integers (truncate |v|, compare the exact fraction with 0.5,
round to even), exact for |v| < 2**23 and identical under the interpreter and on the GPU
(libdevice ``rint`` has no interpreter implementation).

The GEMM (``_int8_gemm_kernel``): ``tl.dot(int8, int8) -> int32`` (IMMA on sm_80, IGMMA /
IMMA on sm_90) over BLOCK_K slices, K tail masked; fp32 epilogue; launch order grouped by
GROUP_M (consecutive programs share a band of GROUP_M row tiles, so the weight tile a program
loads is reused from L2 by its neighbours). Tile sizes are autotuned among ``candidates``
(keyed on the M bucket, N, K); ``config=`` forces one (tests run small tiles under the
interpreter, where the first candidate is used without benchmarking).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pysparse.ops import checks

OP = "int8_linear"
QMAX = tl.constexpr(127.0)
EPS = tl.constexpr(1e-12)  # pysparse.formats.int8.EPS
INT32_LIMIT = 2 ** 31
QUANT_SINGLE_PASS_MAX_K = 8192


# ------------------------------------------------------------------------- quantize prologue

@triton.jit
def _round_half_even_clamp(v):
    """clamp(round_half_even(v), -127, 127) as int32, exact for |v| < 2**23: the fraction
    a - trunc(a) of a = |v| is exact in fp32, so the tie test is exact."""
    a = tl.abs(v)
    t = a.to(tl.int32)  # truncation toward zero
    d = a - t.to(tl.float32)
    up = (d > 0.5) | ((d == 0.5) & ((t & 1) == 1))
    qa = tl.minimum(t + up.to(tl.int32), 127)
    return tl.where(v < 0, -qa, qa)


@triton.jit
def _quantize_kernel(X, Q, S, K, stride_xm, stride_xk, stride_qm,
                     BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr):
    """Grid (M,): one row per program. NaN is counted as +inf in amax, so a row holding NaN or
    Inf gets a non-finite scale, which the launcher reports (Triton's max drops NaN)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    q_row = Q + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if SINGLE_PASS:
        x = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        a = tl.abs(x)
        amax = tl.max(tl.where(a == a, a, float("inf")), 0)
        scale = tl.math.div_rn(tl.maximum(amax, EPS), QMAX)
        q = _round_half_even_clamp(tl.math.div_rn(x, scale))
        tl.store(q_row + offs, q.to(tl.int8), mask=offs < K)
    else:
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + (k0 + offs) * stride_xk, mask=offs < K - k0, other=0.0)
            a = tl.abs(x.to(tl.float32))
            acc = tl.maximum(acc, tl.where(a == a, a, float("inf")))
        amax = tl.max(acc, 0)
        scale = tl.math.div_rn(tl.maximum(amax, EPS), QMAX)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + (k0 + offs) * stride_xk, mask=offs < K - k0, other=0.0)
            q = _round_half_even_clamp(tl.math.div_rn(x.to(tl.float32), scale))
            tl.store(q_row + k0 + offs, q.to(tl.int8), mask=offs < K - k0)
    tl.store(S + row, scale)


def pow2_at_least(n, cap: int) -> int:
    """min(next power of two >= n, cap) by comparisons only, so a symbolic size (torch.compile
    with dynamic shapes) guards on a bucket instead of failing on bit operations."""
    b = 1
    while b < cap and n > b:
        b *= 2
    return b


def quantize_config(K: int):
    """(BLOCK_K, SINGLE_PASS, num_warps) of the quantize kernel for rows of K elements."""
    block_k = pow2_at_least(K, QUANT_SINGLE_PASS_MAX_K)
    # about 16 elements per thread: a 4096-long row gets 8 warps, rows <= 512 one warp
    return block_k, bool(K <= block_k), max(1, min(8, block_k // 512))


def quantize_rows(op: str, x2: torch.Tensor):
    """x2 [M, K] float (any strides) -> (q int8 [M, K], scale fp32 [M]); no argument checks
    beyond finiteness (the reference's message, op-prefixed)."""
    M, K = x2.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x2.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x2.device)
    if M == 0:
        return q, scale
    block_k, single, warps = quantize_config(K)
    torch.library.wrap_triton(_quantize_kernel)[(M,)](
        x2, q, scale, K, x2.stride(0), x2.stride(1), q.stride(0),
        BLOCK_K=block_k, SINGLE_PASS=single, num_warps=warps)
    if has_data(scale):
        checks.finite_rows(op, scale)
    return q, scale


def has_data(t: torch.Tensor) -> bool:
    """Whether data-dependent checks (one host sync) can run: not while torch.compile traces
    the op nor under fake tensors (opcheck, shape propagation), which carry no values."""
    from torch._subclasses.fake_tensor import is_fake
    return not torch.compiler.is_compiling() and not is_fake(t)


def quantize_per_token(x: torch.Tensor):
    """The Triton pysparse::quantize_per_token; see the module docstring."""
    op = "quantize_per_token"
    checks.tensor(op, "x", x, checks.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"pysparse.{op}: x must be [..., K] with K >= 1, got {tuple(x.shape)}")
    K = x.shape[-1]
    q, scale = quantize_rows(op, x.reshape(-1, K))
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


# ------------------------------------------------------------------------- shared GEMM parts

@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid in grouped order: GROUP_M row tiles walk the N tiles
    together, so a weight tile is read from DRAM once per group instead of once per row tile."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def quant_epilogue(acc, XS, WS, Bias, offs_m, offs_n, M, N, HAS_BIAS: tl.constexpr):
    """fp32 (acc * x_scale[:, None]) * w_scale[None, :] + bias: the reference's order."""
    xs = tl.load(XS + offs_m, mask=offs_m < M, other=0.0)
    ws = tl.load(WS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * xs[:, None]
    y = y * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def store_tile(Y, y, offs_m, offs_n, M, N, stride_ym):
    ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(ptrs, y.to(Y.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@dataclass(frozen=True)
class Config:
    """Launch geometry of the GEMM kernels (this module's and sparse24's)."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                    GROUP_M=self.group_m)

    def triton(self):
        return triton.Config(self.meta(), num_warps=self.num_warps, num_stages=self.num_stages)


def m_bucket(M: int) -> int:
    """The autotune key for M: next power of two, capped (every M above 256 tunes alike)."""
    return pow2_at_least(M, 512)


def candidates(bucket: int, arch: int) -> list:
    """Tile configs worth timing for the int8 GEMM on an M bucket on sm_80 / sm_90 (``arch`` =
    10*major+minor); the first is the pick used without benchmarking (interpreter).

    * Decode (M <= 16): BLOCK_M = 16, the smallest MMA M (int8 mma.sync is m16n8k32). The
      weight stream is all that matters: narrow N tiles (32-128) so that >= 2 programs per SM
      are in flight for N = 4096 on 108/132 SMs, and long K slices (128-256 bytes) with 4-6
      stages (a 16 x 64 x 256 stage is 20 KB) to keep enough weight loads in flight.
      (Pipelining with cp.async needs K % 16 == 0, which Triton specialises on; other K run
      unpipelined, masked element by element.)
    * M in (16, 64]: BLOCK_M = the bucket (32 or 64), 4 warps.
    * M > 64: 128 x 128 tiles (and 128 x 256 on sm_90), the compute-bound shapes; 128 rows
      is also what sm_90's warpgroup MMA (IGMMA, 64 rows per warpgroup) wants. On sm_80 the
      mma.sync accumulator lives in registers: 128 x 256 (8 warps) and 128 x 128 with 4 warps
      spill there (ptxas, 544-560 bytes of stack), so sm_80 keeps 128 x 128 on 8 warps.
      Stages: sm_80 has 163 KB of shared memory per block, sm_90 227 KB; a 128 x 128 x 128
      int8 stage is 32 KB: 3 stages (sm_80), 4 (sm_90).

    Every candidate of every bucket was built for sm_80 and sm_90 and found spill-free; the
    gpu_static test keeps the first of the decode and the large bucket.
    """
    s = 1 if arch < 90 else 2  # extra stages on sm_90
    if bucket <= 16:
        out = [Config(16, 64, 256, 1, 4, 2 + s), Config(16, 128, 128, 1, 4, 3 + s),
               Config(16, 32, 256, 1, 4, 3 + s), Config(16, 64, 128, 1, 4, 3 + s)]
    elif bucket <= 64:
        out = [Config(bucket, 64, 128, 8, 4, 2 + s), Config(bucket, 128, 128, 8, 4, 2 + s),
               Config(64, 64, 128, 8, 4, 2 + s)]
    elif arch < 90:  # mma.sync keeps the accumulator in registers: 128 x 128 needs 8 warps
        out = [Config(128, 128, 128, 8, 8, 3), Config(128, 128, 64, 8, 8, 4),
               Config(64, 128, 128, 8, 4, 3)]
    else:
        out = [Config(128, 128, 128, 8, 8, 4), Config(128, 256, 64, 8, 8, 4),
               Config(128, 128, 64, 8, 4, 5), Config(64, 128, 128, 8, 4, 4)]
    return list(dict.fromkeys(out))


BUCKETS = (16, 32, 64, 512)  # one representative M per candidate list


def all_configs(cands) -> list:
    """Every config ``cands(bucket, arch)`` can return: the autotuner's list (pruned per call)."""
    out = []
    for arch in (80, 90):
        for bucket in BUCKETS:
            out += cands(bucket, arch)
    return list(dict.fromkeys(out))


def arch_of(device: torch.device) -> int:
    if device.type != "cuda":  # TRITON_INTERPRET=1 on CPU tensors: plan as for sm_80
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def pruner(cands, a_name: str):
    """early_config_prune for triton.autotune: keep ``cands(bucket, arch)`` for the device's
    arch; off CUDA (the interpreter) only the first, so nothing is benchmarked."""
    def prune(configs, named_args, **kwargs):
        a = named_args[a_name]
        want = cands(named_args["M_BUCKET"], arch_of(a.device))
        if a.device.type != "cuda":
            want = want[:1]
        keep = {str(c.triton()) for c in want}
        picked = [c for c in configs if str(c) in keep]
        return picked or [want[0].triton()]
    return prune


def fits_int32(M: int, N: int, K: int) -> bool:
    return max(M * K, N * K, M * N) < INT32_LIMIT


# ------------------------------------------------------------------------- int8 GEMM

@triton.jit
def _int8_gemm_body(A, B, XS, WS, Bias, Y, M, N, K, stride_am, stride_bn, stride_ym,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows / columns past M / N wrap around (their results are never stored), so the loads
    # need a mask on K only
    rows = offs_m % M
    cols = offs_n % N
    a_ptrs = A + rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + cols[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] of w_q^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    y = quant_epilogue(acc, XS, WS, Bias, offs_m, offs_n, M, N, HAS_BIAS)
    store_tile(Y, y, offs_m, offs_n, M, N, stride_ym)


@triton.jit
def _int8_gemm_kernel(A, B, XS, WS, Bias, Y, M, N, K, stride_am, stride_bn, stride_ym,
                      M_BUCKET, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Y[M, N] = epilogue(A[M, K] int8 @ B[N, K]^T int8). Grid: (cdiv(M, BLOCK_M) *
    cdiv(N, BLOCK_N),) in grouped order. M_BUCKET is only the autotune key."""
    _int8_gemm_body(A, B, XS, WS, Bias, Y, M, N, K, stride_am, stride_bn, stride_ym,
                    HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


_int8_gemm_tuned = triton.autotune(
    configs=[c.triton() for c in all_configs(candidates)], key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": pruner(candidates, "A")})(_int8_gemm_kernel)


def gemm_grid(M, N):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def check_args(x, w_q, w_scale, bias):
    """Validate as the reference does (same messages); return (N, K)."""
    checks.tensor(OP, "x", x, checks.FLOAT_DTYPES)
    N, K = checks.int8_weight(OP, w_q, w_scale, x.device)
    checks.activation(OP, x, K)
    checks.bias(OP, bias, N, x.device)
    return N, K


def int8_linear(x, w_q, w_scale, bias=None, *, config: Config | None = None):
    """The Triton pysparse::int8_linear (see the module docstring). ``config`` forces the GEMM
    tiles; None autotunes among ``candidates``."""
    N, K = check_args(x, w_q, w_scale, bias)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*x.shape[:-1], N)
    xq, xs = quantize_rows(OP, x2)
    launch_int8_gemm(xq, w_q, xs, w_scale, bias, y, config)
    return y.reshape(*x.shape[:-1], N)


def launch_int8_gemm(xq, w_q, xs, w_scale, bias, y, config=None):
    M, K = xq.shape
    N = w_q.shape[0]
    args = (xq, w_q, xs, w_scale, w_scale if bias is None else bias, y, M, N, K,
            xq.stride(0), w_q.stride(0), y.stride(0), m_bucket(M))
    if config is None:
        torch.library.wrap_triton(_int8_gemm_tuned)[gemm_grid(M, N)](
            *args, HAS_BIAS=bias is not None)
    else:
        torch.library.wrap_triton(_int8_gemm_kernel)[gemm_grid(M, N)(config.meta())](
            *args, HAS_BIAS=bias is not None, num_warps=config.num_warps,
            num_stages=config.num_stages, **config.meta())
