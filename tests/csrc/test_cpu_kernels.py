"""Every CPU ISA path of pysparse._C (ref, avx2, avx512_vnni, amx — those this CPU runs) against
the pure-torch reference: int32 accumulation exactly, quantization bitwise, output within the
named epilogue tolerance."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pysparse.ops import reference
from pysparse.testing import cpu_isas, native_cpu, tolerances

C = native_cpu()
pytestmark = pytest.mark.skipif(C is None, reason="pysparse._C not built")
ISAS = cpu_isas() or ["ref"]
MS = [1, 2, 3, 13, 67, 128]
KS = [1, 3, 4, 17, 64, 100, 385]
NS = [1, 5, 16, 33, 67]


def _isa(name):
    return C.isa_id(name)


def _i8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("N", NS)
def test_gemm_s32_exact(isa, M, K, N):
    a, b = _i8(M, K), _i8(N, K)
    a[0, 0], b[0, 0] = -127, -127  # extreme products
    acc = C.int8_gemm_s32(a, b, _isa(isa))
    assert torch.equal(acc, a.long().matmul(b.long().T).int())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 3, 67])
@pytest.mark.parametrize("K", [1, 5, 64, 385, 1536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_bitwise(isa, M, K, dtype):
    x = (torch.randn(M, K) * torch.logspace(-3, 3, M)[:, None]).to(dtype)
    x[M // 2] = 0
    q, s = C.quantize_per_token(x, _isa(isa))
    q_ref, s_ref = reference.quantize_per_token(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K,N", [(1, 1), (17, 5), (64, 16), (100, 33), (384, 384), (385, 67)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear(isa, M, K, N, dtype, bias):
    x = torch.randn(M, K).to(dtype)
    w_q, w_s = _i8(N, K), torch.rand(N) / 100
    b = torch.randn(N) if bias else None
    y = C.int8_linear(x, w_q, w_s, b, _isa(isa))
    assert y.dtype == dtype and y.shape == (M, N)
    torch.testing.assert_close(y, reference.int8_linear(x, w_q, w_s, b),
                               **tolerances.QUANT_EPILOGUE[dtype])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_row_is_reported(isa, bad):
    x = torch.randn(5, 40)
    x[3, 39] = bad
    with pytest.raises(ValueError, match="token row 3"):
        C.int8_linear(x, _i8(7, 40), torch.ones(7), None, _isa(isa))
    with pytest.raises(ValueError, match="token row 3"):
        C.quantize_per_token(x, _isa(isa))


def test_binding_rejects_bad_tensors():
    w, s = _i8(4, 8), torch.ones(4)
    with pytest.raises(ValueError, match="contiguous 2-D"):
        C.int8_linear(torch.randn(8, 2).t(), w, s, None)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        C.int8_linear(torch.randn(2, 8, dtype=torch.float64), w, s, None)
    with pytest.raises(ValueError, match="non-empty"):
        C.int8_linear(torch.randn(0, 8), w, s, None)
    with pytest.raises(ValueError, match="w_scale"):
        C.int8_linear(torch.randn(2, 8), w, s.double(), None)
    with pytest.raises(ValueError, match="unknown ISA"):
        C.isa_id("sse9")


def test_built_with_parallel_for():
    # ATen's at::parallel_for is inline OpenMP: without -fopenmp the kernels silently use 1 thread
    assert C.info()["parallel"] is True


def test_threads_do_not_change_results():
    x, w, s = torch.randn(67, 385), _i8(333, 385), torch.rand(333)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = C.int8_linear(x, w, s, None)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, C.int8_linear(x, w, s, None))


@pytest.mark.parametrize("cap", ["ref", "avx2", "bogus"])
def test_env_caps_isa(cap):
    code = "import json, pysparse.testing as t; print(json.dumps(t.native_cpu().info()))"
    env = dict(os.environ, PYSPARSE_CPU_ISA=cap)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    info = json.loads(out)
    active, err = info["active_isa"], info["isa_error"]
    if cap == "bogus":
        assert active == C.info()["detected_isa"] and "bogus" in err
    else:
        assert active == (cap if cap in ISAS else ISAS[-1])


# ----------------------------------------------------------------------------- packed weights
def _pack_vnni16(w_q):
    """The vnni16 layout written out independently here (csrc/cpu/kernels.h):
    packed[nb, kg, 4*j + t] = w[16*nb + j, 4*kg + t], zero padded; colsum[n] = sum_k w[n, k]."""
    N, K = w_q.shape
    Np, Kp = -(-N // 16) * 16, -(-K // 4) * 4
    padded = torch.zeros(Np, Kp, dtype=torch.int8)
    padded[:N, :K] = w_q
    packed = padded.reshape(Np // 16, 16, Kp // 4, 4).permute(0, 2, 1, 3).reshape(Np // 16, Kp // 4, 64)
    return packed.contiguous(), padded.sum(dim=1, dtype=torch.int32)


def _i8_full(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)  # -128 too: the kernels take any int8


@pytest.mark.parametrize("N,K", [(1, 1), (5, 17), (16, 64), (17, 3), (33, 100), (48, 385), (67, 4)])
def test_pack_vnni16_layout(N, K):
    w = _i8_full(N, K)
    w[0, 0] = -128
    packed, colsum = C.pack_int8_vnni16(w)
    Np, Kp = -(-N // 16) * 16, -(-K // 4) * 4
    assert packed.dtype == torch.int8 and packed.shape == (Np // 16, Kp // 4, 64)
    assert colsum.dtype == torch.int32 and colsum.shape == (Np,)
    want_p, want_c = _pack_vnni16(w)
    assert torch.equal(packed, want_p) and torch.equal(colsum, want_c)
    # spot check of the index formula itself, element by element
    for n, k in [(0, 0), (N - 1, K - 1), (N // 2, K // 3)]:
        assert packed[n // 16, k // 4, 4 * (n % 16) + k % 4] == w[n, k]
    # the Python-side packer (pysparse.formats.int8) must produce the same bytes
    fmt = pytest.importorskip("pysparse.formats.int8")
    if hasattr(fmt, "pack_vnni16"):
        py_p, py_c = fmt.pack_vnni16(w)
        assert torch.equal(py_p.reshape(-1), packed.reshape(-1)) and torch.equal(py_c, colsum)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 2, 3, 13, 31, 32, 33, 67, 128])
@pytest.mark.parametrize("K,N", [(1, 1), (3, 5), (17, 16), (64, 17), (100, 33), (384, 48), (385, 67)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_packed(isa, M, K, N, dtype, bias):
    x = torch.randn(M, K).to(dtype)
    w_q, w_s = _i8_full(N, K), torch.rand(N) / 100
    b = torch.randn(N) if bias else None
    packed, colsum = _pack_vnni16(w_q)
    y = C.int8_linear_packed(x, packed, colsum, w_s, b, N, _isa(isa))
    assert y.dtype == dtype and y.shape == (M, N)
    # Same kernel contract as the canonical path: bitwise equal to its ref ISA ...
    assert torch.equal(y, C.int8_linear(x, w_q, w_s, b, _isa("ref")))
    # ... and within the named epilogue tolerance of the pure-torch reference.
    torch.testing.assert_close(y, reference.int8_linear(x, w_q, w_s, b), **tolerances.QUANT_EPILOGUE[dtype])


@pytest.mark.parametrize("isa", ISAS)
def test_int8_linear_packed_any_shape_and_long_colsum(isa):
    M, K, N = 7, 70, 40
    x, w_q, w_s = torch.randn(M, K), _i8_full(N, K), torch.rand(N)
    packed, colsum = C.pack_int8_vnni16(w_q)
    want = C.int8_linear(x, w_q, w_s, None, _isa("ref"))
    for p in (packed, packed.reshape(-1), packed.reshape(-1, 16, 4)):
        assert torch.equal(C.int8_linear_packed(x, p, colsum, w_s, None, N, _isa(isa)), want)
    # only colsum[:N] is read: [N] and [>N] buffers give the same result
    assert torch.equal(C.int8_linear_packed(x, packed, colsum[:N].clone(), w_s, None, N, _isa(isa)), want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_packed_nonfinite_row_is_reported(isa, bad):
    x = torch.randn(5, 40)
    x[3, 39] = bad
    packed, colsum = C.pack_int8_vnni16(_i8(7, 40))
    with pytest.raises(ValueError, match="int8_linear_packed: x contains NaN or Inf .*token row 3"):
        C.int8_linear_packed(x, packed, colsum, torch.ones(7), None, 7, _isa(isa))


def test_packed_binding_rejects_bad_buffers():
    M, K, N = 3, 10, 20  # Kp = 12, Np = 32: packed holds 384 bytes
    x, w_s, b = torch.randn(M, K), torch.ones(N), torch.zeros(N)
    packed, colsum = C.pack_int8_vnni16(_i8(N, K))
    assert packed.numel() == 32 * 12
    f = C.int8_linear_packed
    f(x, packed, colsum, w_s, b, N)  # the good call
    with pytest.raises(ValueError, match="int8_linear_packed: w_packed has 383 elements"):
        f(x, packed.reshape(-1)[:-1], colsum, w_s, b, N)
    with pytest.raises(ValueError, match="int8_linear_packed: w_packed has 385 elements"):
        f(x, torch.zeros(385, dtype=torch.int8), colsum, w_s, b, N)
    with pytest.raises(ValueError, match="int8_linear_packed: w_packed has"):  # x's K disagrees
        f(torch.randn(M, K + 3), packed, colsum, w_s, b, N)
    with pytest.raises(ValueError, match="int8_linear_packed: w_packed must be a contiguous CPU int8"):
        f(x, packed.view(torch.uint8), colsum, w_s, b, N)
    with pytest.raises(ValueError, match="int8_linear_packed: w_packed must be a contiguous CPU int8"):
        f(x, packed.reshape(-1, 2).t(), colsum, w_s, b, N)
    with pytest.raises(ValueError, match="int8_linear_packed: w_colsum must be a contiguous CPU int32"):
        f(x, packed, colsum[: N - 1].clone(), w_s, b, N)
    with pytest.raises(ValueError, match="int8_linear_packed: w_colsum must be a contiguous CPU int32"):
        f(x, packed, colsum.long(), w_s, b, N)
    with pytest.raises(ValueError, match="int8_linear_packed: w_colsum must be a contiguous CPU int32"):
        f(x, packed, colsum.reshape(2, -1), w_s, b, N)
    with pytest.raises(ValueError, match="int8_linear_packed: w_scale"):
        f(x, packed, colsum, torch.ones(N - 1), b, N)
    with pytest.raises(ValueError, match="int8_linear_packed: bias"):
        f(x, packed, colsum, w_s, torch.zeros(N + 1), N)
    # N disagreeing with the buffers, zero, negative or absurdly large (no size overflow)
    for bad_n in (N + 16, 0, -5, 2 ** 62, 2 ** 63 - 1):
        with pytest.raises(ValueError, match="int8_linear_packed: w_packed has"):
            f(x, packed, colsum, torch.ones(max(bad_n, 1) if bad_n < 2 ** 20 else 1), None, bad_n)
    with pytest.raises(ValueError, match="int8_linear_packed: .*contiguous 2-D"):
        f(torch.randn(K, M).t(), packed, colsum, w_s, b, N)
    with pytest.raises(ValueError, match="int8_linear_packed: the CPU kernel takes float32 or bfloat16"):
        f(x.double(), packed, colsum, w_s, b, N)
    with pytest.raises(ValueError, match="pack_int8_vnni16: w_q must be"):
        C.pack_int8_vnni16(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="pack_int8_vnni16: w_q must be"):
        C.pack_int8_vnni16(torch.zeros(0, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="pack_int8_vnni16: w_q must be"):
        C.pack_int8_vnni16(torch.zeros(8, dtype=torch.int8))
    with pytest.raises(ValueError, match="int8_peak_gops: seconds"):
        C.int8_peak_gops(0, 0.0)
    with pytest.raises(ValueError, match="unknown ISA"):
        C.int8_peak_gops(7, 0.01)


def test_packed_threads_do_not_change_results():
    x, w = torch.randn(67, 385), _i8(333, 385)
    s = torch.rand(333)
    packed, colsum = C.pack_int8_vnni16(w)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = C.int8_linear_packed(x, packed, colsum, s, None, 333)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, C.int8_linear_packed(x, packed, colsum, s, None, 333))
    assert torch.equal(one, C.int8_linear(x, w, s, None))


@pytest.mark.parametrize("isa", ISAS)
def test_int8_peak_gops_runs(isa):
    g = C.int8_peak_gops(_isa(isa), 0.01)
    assert 0.1 < g < 1e5
