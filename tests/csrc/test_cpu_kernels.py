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
