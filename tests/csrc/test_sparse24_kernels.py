"""The 2:4 CPU kernels of pysparse._C on every ISA path this CPU runs (ref, avx2, avx512_vnni;
the AVX-512 path is the VBMI gather kernel, PYSPARSE_CPU_NO_VBMI=1 forces the expand fallback of
a VNNI-without-VBMI CPU) against the references: int8 bitwise equal to int8_linear on the
decompressed weight (so the int32 sums are exact), float within the named tolerance."""
import os
import subprocess
import sys

import pytest
import torch

from pysparse.formats import int8, sparse24
from pysparse.testing import cpu_isas, native_cpu, tolerances

C = native_cpu()
pytestmark = pytest.mark.skipif(C is None, reason="pysparse._C not built")
ISAS = [i for i in (cpu_isas() or ["ref"]) if i != "amx"]
MS = [1, 2, 3, 5, 8, 9, 13, 67]
# K % 8 == 4 (a missing last group in the int8 layout), K = 4, N not a multiple of 16, N < 16
KN = [(4, 1), (8, 16), (12, 17), (20, 33), (388, 50), (512, 96)]


def _sparse(N, K, dtype=torch.float32):
    w = torch.randn(N, K)
    return sparse24.compress((w * sparse24.mask_24(w)).to(dtype))


def _int8_sparse(N, K):
    values, meta = _sparse(N, K)
    values_q, w_s = int8.quantize_weight(values)
    return values_q, meta, w_s


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K,N", KN)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse24_int8_bitwise(isa, M, K, N, dtype, bias):
    values_q, meta, w_s = _int8_sparse(N, K)
    pv, pc, cs = sparse24.pack_cpu_int8(values_q, meta)
    x = (torch.randn(M, K) * 3).to(dtype)
    b = torch.randn(N) if bias else None
    y = C.sparse24_int8_linear_packed(x, pv, pc, cs, w_s, b, N, C.isa_id(isa))
    dense_q = sparse24.decompress(values_q, meta)
    assert torch.equal(y, C.int8_linear(x, dense_q, w_s, b, C.isa_id("ref")))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K,N", KN)
@pytest.mark.parametrize("xdt,vdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse24_float(isa, M, K, N, xdt, vdt, bias):
    values, meta = _sparse(N, K, vdt)
    pv, pc = sparse24.pack_cpu_float(values, meta)
    x = torch.randn(M, K).to(xdt)
    b = torch.randn(N) if bias else None
    y = C.sparse24_linear_packed(x, pv, pc, b, N, C.isa_id(isa))
    assert y.dtype == xdt and y.shape == (M, N)
    ref = x.double() @ sparse24.decompress(values, meta).double().T
    if bias:
        ref = ref + b.double()
    torch.testing.assert_close(y, ref.to(xdt), **tolerances.FLOAT_MATMUL[xdt])


@pytest.mark.parametrize("N,K", [(1, 4), (17, 12), (50, 388), (96, 512)])
def test_cpp_pack_matches_torch_pack(N, K):
    values_q, meta, _ = _int8_sparse(N, K)
    for a, b in zip(C.pack_sparse24_int8(values_q, meta, K), sparse24.pack_cpu_int8(values_q, meta)):
        assert torch.equal(a, b)
    for dt in (torch.float32, torch.bfloat16):
        values, meta = _sparse(N, K, dt)
        for a, b in zip(C.pack_sparse24_float(values, meta, K), sparse24.pack_cpu_float(values, meta)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ISAS)
def test_nonfinite_activations(isa):
    values_q, meta, w_s = _int8_sparse(20, 16)
    pv, pc, cs = sparse24.pack_cpu_int8(values_q, meta)
    values, meta_f = _sparse(20, 16)
    fv, fc = sparse24.pack_cpu_float(values, meta_f)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(5, 16)
        x[3, 7] = bad
        with pytest.raises(ValueError, match="first at token row 3"):
            C.sparse24_int8_linear_packed(x, pv, pc, cs, w_s, None, 20, C.isa_id(isa))
        with pytest.raises(ValueError, match="first at token row 3"):
            C.sparse24_linear_packed(x, fv, fc, None, 20, C.isa_id(isa))


def test_binding_rejects_bad_buffers():
    values_q, meta, w_s = _int8_sparse(20, 16)
    pv, pc, cs = sparse24.pack_cpu_int8(values_q, meta)
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="w_values must be"):
        C.sparse24_int8_linear_packed(x, pv[:1], pc, cs, w_s, None, 20)
    with pytest.raises(ValueError, match="w_codes must be"):
        C.sparse24_int8_linear_packed(x, pv, pc.view(torch.int8), cs, w_s, None, 20)
    with pytest.raises(ValueError, match="multiple of 4"):
        C.sparse24_int8_linear_packed(torch.randn(3, 18), pv, pc, cs, w_s, None, 20)
    with pytest.raises(ValueError, match="w_values must be"):  # x's K does not match the packing
        C.sparse24_int8_linear_packed(torch.randn(3, 24), pv, pc, cs, w_s, None, 20)
    values, meta = _sparse(20, 16)
    fv, fc = sparse24.pack_cpu_float(values, meta)
    with pytest.raises(ValueError, match="w_codes must be"):
        C.sparse24_linear_packed(x, fv, fc.int(), None, 20)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        C.sparse24_linear_packed(x, fv.half(), fc, None, 20)


def test_threads_do_not_change_results():
    values_q, meta, w_s = _int8_sparse(200, 512)
    pv, pc, cs = sparse24.pack_cpu_int8(values_q, meta)
    values, meta_f = _sparse(200, 512, torch.bfloat16)
    fv, fc = sparse24.pack_cpu_float(values, meta_f)
    x = torch.randn(70, 512)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = (C.sparse24_int8_linear_packed(x, pv, pc, cs, w_s, None, 200),
             C.sparse24_linear_packed(x.bfloat16(), fv, fc, None, 200))
        torch.set_num_threads(max(2, n))
        b = (C.sparse24_int8_linear_packed(x, pv, pc, cs, w_s, None, 200),
             C.sparse24_linear_packed(x.bfloat16(), fv, fc, None, 200))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.skipif("avx512_vnni" not in ISAS, reason="needs the AVX-512 path")
def test_expand_fallback_without_vbmi():
    """The path a VNNI-but-no-VBMI CPU (Cascade Lake) takes: expand to vnni16 + dense kernel."""
    code = r"""
import torch
from pysparse.formats import int8, sparse24
from pysparse.ops.backends.cpu import _C as C
assert C.info()["sparse24"].startswith("expand"), C.info()
torch.manual_seed(0)
for M, K, N in [(1, 12, 17), (9, 388, 50), (67, 512, 96)]:
    w = torch.randn(N, K)
    values, meta = sparse24.compress(w * sparse24.mask_24(w))
    vq, ws = int8.quantize_weight(values)
    pv, pc, cs = sparse24.pack_cpu_int8(vq, meta)
    x = torch.randn(M, K)
    y = C.sparse24_int8_linear_packed(x, pv, pc, cs, ws, None, N)
    assert torch.equal(y, C.int8_linear(x, sparse24.decompress(vq, meta), ws, None, 0)), (M, K, N)
    fv, fc = sparse24.pack_cpu_float(values.bfloat16(), meta)
    y = C.sparse24_linear_packed(x.bfloat16(), fv, fc, None, N).float()
    ref = x.bfloat16().float() @ sparse24.decompress(values.bfloat16(), meta).float().T
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
print("ok")
"""
    env = dict(os.environ, PYSPARSE_CPU_NO_VBMI="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
