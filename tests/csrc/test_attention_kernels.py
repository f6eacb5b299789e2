"""The fused-attention CPU kernels of pysparse._C on every ISA path this CPU runs (ref and avx2:
fp32 compiler-vectorised C++; avx512_vnni: the AVX-512 micro-kernels, vdpbf16ps for bf16 where
AVX512-BF16 exists, fp32 FMA otherwise) against the fp32 reference, with the flash-attention
tolerance: max error <= 2x the error of torch's own same-dtype SDPA (tolerances.ATTENTION_*)."""
import math

import pytest
import torch
import torch.nn.functional as F

from pysparse.ops import reference
from pysparse.testing import cpu_isas, native_cpu, tolerances

C = native_cpu()
pytestmark = pytest.mark.skipif(C is None, reason="pysparse._C not built")
ISAS = [i for i in (cpu_isas() or ["ref"]) if i != "amx"]
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, scale=1.0):
    q = (torch.randn(B, Hq, Sq, D) * scale).to(dtype)
    k = (torch.randn(B, Hkv, Sk, D) * scale).to(dtype)
    v = torch.randn(B, Hkv, Sk, D).to(dtype)
    return q, k, v


def _torch_sdpa(q, k, v, keep, causal):
    """torch's own same-dtype attention (bool keep mask of [B or 1, Hq or 1, Sq, Sk])."""
    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    Sq, Sk = q.shape[2], k.shape[2]
    m = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        m = m.tril(Sk - Sq)
    if keep is not None:
        m = m & keep
    y = F.scaled_dot_product_attention(q, kr, vr, attn_mask=m)
    return torch.nan_to_num(y, nan=0.0)


def _check(y, q, k, v, mask, causal, keep_for_torch=None, scale=None):
    ref = reference.attention(q.float(), k.float(), v.float(),
                              None if mask is None else (mask if mask.dtype == torch.bool else mask.float()),
                              causal, scale)
    err = (y.float() - ref).abs().max().item()
    tol = tolerances.ATTENTION_FLOOR[q.dtype]
    ts = _torch_sdpa(q, k, v, keep_for_torch, causal).float()
    tol += tolerances.ATTENTION_VS_SDPA * (ts - ref).abs().max().item()
    assert y.dtype == q.dtype and y.shape == q.shape
    assert err <= tol, f"max error {err:.3g} > budget {tol:.3g}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [1, 7, 64, 129])
@pytest.mark.parametrize("D", [32, 64, 80, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_grid(isa, dtype, S, D, causal):
    q, k, v = _inputs(2, 4, 2, S, S, D, dtype)
    y = C.attention(q, k, v, None, causal, 1 / math.sqrt(D), C.isa_id(isa))
    _check(y, q, k, v, None, causal)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 80])
def test_attention_long(isa, dtype, causal, D):
    q, k, v = _inputs(1, 2, 1, 1024, 1024, D, dtype)
    y = C.attention(q, k, v, None, causal, 1 / math.sqrt(D), C.isa_id(isa))
    _check(y, q, k, v, None, causal)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 130), (3, 70), (65, 64), (100, 30), (7, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_sq_ne_sk(isa, dtype, Sq, Sk, causal):
    """Decoding / prefill against a KV cache: bottom-right causal; Sq > Sk leaves early rows empty (0)."""
    q, k, v = _inputs(1, 3, 1, Sq, Sk, 64, dtype)
    y = C.attention(q, k, v, None, causal, 0.125, C.isa_id(isa))
    _check(y, q, k, v, None, causal, scale=0.125)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_attention_key_padding_and_additive_bias(isa, dtype, causal, side):
    """Key padding (the kernel skips the -inf margins) and full additive biases."""
    B, H, S, D = 3, 4, 177, 64
    q, k, v = _inputs(B, H, 2, S, S, D, dtype)
    lengths = torch.tensor([177, 40, 1])
    pos = torch.arange(S)[None, :] if side == "right" else S - 1 - torch.arange(S)[None, :]
    keep = (pos < lengths[:, None])[:, None, None, :]  # [B, 1, 1, S]
    bias = torch.zeros(B, 1, 1, S).masked_fill(~keep, float("-inf"))
    y = C.attention(q, k, v, bias.expand(B, H, S, S), causal, D ** -0.5, C.isa_id(isa))
    _check(y, q, k, v, keep, causal, keep_for_torch=keep)
    # a full additive [B, H, Sq, Sk] bias with finite values, and one strided along queries
    full = torch.randn(B, H, S, S)
    y = C.attention(q, k, v, full, causal, D ** -0.5, C.isa_id(isa))
    ref = reference.attention(q.float(), k.float(), v.float(), full, causal)
    torch.testing.assert_close(y.float(), ref, **tolerances.FLOAT_MATMUL[dtype])


@pytest.mark.parametrize("isa", ISAS)
def test_attention_empty_rows_and_nan(isa):
    q, k, v = _inputs(1, 2, 2, 9, 20, 32, torch.float32)
    keep = torch.ones(1, 1, 9, 20, dtype=torch.bool)
    keep[..., 3, :] = False  # row 3 sees nothing -> 0
    bias = torch.zeros(1, 1, 9, 20).masked_fill(~keep, float("-inf")).expand(1, 2, 9, 20)
    y = C.attention(q, k, v, bias, False, 0.2, C.isa_id(isa))
    assert torch.equal(y[..., 3, :], torch.zeros_like(y[..., 3, :]))
    torch.testing.assert_close(y, reference.attention(q, k, v, keep, False, 0.2), rtol=1e-4, atol=1e-5)
    # a finite "min" bias on every key (HF's additive masks) is NOT empty: uniform softmax
    fmin = torch.full((1, 2, 9, 20), torch.finfo(torch.float32).min)
    y = C.attention(q, k, v, fmin, False, 0.2, C.isa_id(isa))
    torch.testing.assert_close(y, reference.attention(q, k, v, fmin, False, 0.2), rtol=1e-4, atol=1e-5)
    # NaN in q row 5 -> that row is NaN; NaN in v key 7 -> every row that sees key 7 is NaN
    q[0, 1, 5, 0] = float("nan")
    y = C.attention(q, k, v, None, False, 0.2, C.isa_id(isa))
    assert torch.isnan(y[0, 1, 5]).all() and not torch.isnan(y[0, 1, 4]).any()
    assert not torch.isnan(y[0, 0]).any()
    v[0, 0, 7, 3] = float("nan")
    y = C.attention(q, k, v, None, True, 0.2, C.isa_id(isa))
    off = 20 - 9  # bottom-right causal: row i sees keys <= i + 11, all rows see key 7
    assert torch.isnan(y[0, 0, :, 3]).all() and off >= 0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_strided_inputs(isa, dtype):
    """q/k/v as views of a fused [B, S, 3, H, D] projection (the layout models produce)."""
    B, S, H, D = 2, 50, 4, 64
    qkv = torch.randn(B, S, 3, H, D).to(dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    y = C.attention(q, k, v, None, True, D ** -0.5, C.isa_id(isa))
    _check(y, q.contiguous(), k.contiguous(), v.contiguous(), None, True)


def test_attention_bad_input():
    q, k, v = _inputs(1, 4, 2, 8, 8, 32, torch.float32)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        C.attention(q, k[:, :1].expand(1, 3, 8, 32), v[:, :1].expand(1, 3, 8, 32), None, False, 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        C.attention(q, k.bfloat16(), v, None, False, 1.0)
    with pytest.raises(ValueError, match="bias"):
        C.attention(q, k, v, torch.zeros(1, 4, 8, 9), False, 1.0)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        C.attention(q.half(), k.half(), v.half(), None, False, 1.0)
    assert "attention" in C.info()


def test_attention_thread_invariance():
    q, k, v = _inputs(2, 4, 4, 200, 200, 64, torch.bfloat16)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = C.attention(q, k, v, None, True, 0.125)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(y1, C.attention(q, k, v, None, True, 0.125))


def test_attention_memory_does_not_grow_with_seq_squared():
    """S = 16384: the scores would be 1 GiB in fp32; the kernel's peak RSS growth stays small
    (inputs + K/V packs + per-thread 64 x 64 blocks). Measured in a fresh process."""
    import subprocess
    import sys
    code = (
        "import resource, torch, pysparse, sys\n"
        "from pysparse.testing import native_cpu\n"
        "C = native_cpu()\n"
        "q, k, v = (torch.randn(1, 1, 16384, 64).bfloat16() for _ in range(3))\n"
        "C.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], None, False, 0.125)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "y = C.attention(q, k, v, None, True, 0.125)\n"
        "grow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "assert torch.isfinite(y.float()).all()\n"
        "print(grow)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grow_mib = int(out.stdout.split()[-1]) / 1024
    assert grow_mib < 128, f"peak RSS grew by {grow_mib:.0f} MiB for S=16384 (S^2 fp32 = 1024 MiB)"
