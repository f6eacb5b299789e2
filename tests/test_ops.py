"""Every op through the dispatcher on every backend usable here, against its reference, on a
shape grid hunting edges, each ending with torch.library.opcheck."""
import pytest
import torch

from pysparse.formats import int8, sparse24
from pysparse.ops import reference
from pysparse.testing import op_backends, tolerances

OPS = torch.ops.pysparse
MS = [1, 2, 3, 13, 67]
KN = [(4, 1), (16, 5), (100, 33), (384, 384), (388, 17)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=op_backends())
def backend(request, monkeypatch):
    monkeypatch.setenv("PYSPARSE_BACKEND", request.param)
    return request.param


def _int8_weight(N, K):
    return int8.quantize_weight(torch.randn(N, K))


def _sparse_weight(N, K, dtype=torch.float32):
    w = torch.randn(N, K)
    return sparse24.compress((w * sparse24.mask_24(w)).to(dtype))


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K", [1, 7, 64, 385])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_token(backend, M, K, dtype):
    x = torch.randn(M, K).to(dtype)
    x[0] = 0  # an all-zero token
    q, s = OPS.quantize_per_token(x)
    q_ref, s_ref = reference.quantize_per_token(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert bool((q[0] == 0).all())
    _opcheck(OPS.quantize_per_token.default, (x,))


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K,N", KN)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear(backend, M, K, N, dtype, bias):
    x = torch.randn(M, K).to(dtype)
    w_q, w_s = _int8_weight(N, K)
    b = torch.randn(N) if bias else None
    y = OPS.int8_linear(x, w_q, w_s, b)
    assert y.dtype == dtype and y.shape == (M, N)
    torch.testing.assert_close(y, reference.int8_linear(x, w_q, w_s, b),
                               **tolerances.QUANT_EPILOGUE[dtype])
    _opcheck(OPS.int8_linear.default, (x, w_q, w_s, b))


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K,N", KN + [(17, 48)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_packed(backend, M, K, N, dtype):
    x = torch.randn(M, K).to(dtype)
    w_q, w_s = _int8_weight(N, K)
    packed, colsum = int8.pack_vnni16(w_q)
    b = torch.randn(N)
    y = OPS.int8_linear_packed(x, packed, colsum, w_s, b)
    assert y.dtype == dtype and y.shape == (M, N)
    torch.testing.assert_close(y, reference.int8_linear(x, w_q, w_s, b),
                               **tolerances.QUANT_EPILOGUE[dtype])
    _opcheck(OPS.int8_linear_packed.default, (x, packed, colsum, w_s, b))


def test_int8_linear_packed_bad_buffers(backend):
    w_q, w_s = _int8_weight(20, 12)
    packed, colsum = int8.pack_vnni16(w_q)
    x = torch.randn(3, 12)
    with pytest.raises(ValueError, match="must hold"):
        OPS.int8_linear_packed(x, packed[:1], colsum, w_s, None)
    with pytest.raises(ValueError, match="must hold"):
        OPS.int8_linear_packed(x, packed, colsum[:16], w_s, None)
    with pytest.raises(ValueError, match="must hold"):  # x's K does not match the packing
        OPS.int8_linear_packed(torch.randn(3, 20), packed, colsum, w_s, None)
    with pytest.raises(ValueError, match="w_colsum must have dtype int32"):
        OPS.int8_linear_packed(x, packed, colsum.long(), w_s, None)


def test_int8_linear_matches_float_layer(backend):
    x, w = torch.randn(64, 384), torch.randn(256, 384)
    w_q, w_s = int8.quantize_weight(w)
    y = OPS.int8_linear(x, w_q, w_s, None)
    assert tolerances.sqnr_db(x @ w.T, y) > tolerances.W8A8_SQNR_DB


def test_int8_linear_leading_dims_strides_and_empty(backend):
    w_q, w_s = _int8_weight(9, 24)
    x = torch.randn(2, 3, 24)
    y = OPS.int8_linear(x, w_q, w_s, None)
    assert y.shape == (2, 3, 9)
    xt = torch.randn(24, 6).t()  # non-contiguous x is accepted (copied)
    torch.testing.assert_close(OPS.int8_linear(xt, w_q, w_s, None),
                               reference.int8_linear(xt.contiguous(), w_q, w_s, None))
    assert OPS.int8_linear(torch.randn(0, 24), w_q, w_s, None).shape == (0, 9)


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K,N", [(4, 1), (12, 5), (388, 17), (384, 384)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_linear(backend, M, K, N, dtype):
    x = torch.randn(M, K).to(dtype)
    values, meta = _sparse_weight(N, K, dtype)
    b = torch.randn(N)
    y = OPS.sparse24_linear(x, values, meta, b)
    assert y.dtype == dtype and y.shape == (M, N)
    dense = x.float() @ sparse24.decompress(values, meta).float().T + b
    torch.testing.assert_close(y, dense.to(dtype), **tolerances.FLOAT_MATMUL[dtype])
    _opcheck(OPS.sparse24_linear.default, (x, values, meta, b))


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K,N", [(4, 1), (12, 5), (388, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse24_int8_linear(backend, M, K, N, dtype):
    x = torch.randn(M, K).to(dtype)
    w = torch.randn(N, K)
    values, meta = sparse24.compress(w * sparse24.mask_24(w))
    values_q, w_s = int8.quantize_weight(values)
    y = OPS.sparse24_int8_linear(x, values_q, meta, w_s, None)
    dense_q = sparse24.decompress(values_q, meta)
    torch.testing.assert_close(y, reference.int8_linear(x, dense_q, w_s, None),
                               **tolerances.QUANT_EPILOGUE[dtype])
    _opcheck(OPS.sparse24_int8_linear.default, (x, values_q, meta, w_s, None))


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K,N", [(4, 1), (12, 5), (388, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse24_linear_packed(backend, M, K, N, dtype):
    x = torch.randn(M, K).to(dtype)
    values, meta = _sparse_weight(N, K, dtype)
    w_values, w_codes = sparse24.pack_cpu_float(values, meta)
    b = torch.randn(N)
    y = OPS.sparse24_linear_packed(x, w_values, w_codes, b, N)
    assert y.dtype == dtype and y.shape == (M, N)
    torch.testing.assert_close(y, reference.sparse24_linear(x, values, meta, b),
                               **tolerances.FLOAT_MATMUL[dtype])
    _opcheck(OPS.sparse24_linear_packed.default, (x, w_values, w_codes, b, N))


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K,N", [(4, 1), (12, 5), (388, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse24_int8_linear_packed(backend, M, K, N, dtype):
    x = torch.randn(M, K).to(dtype)
    values, meta = _sparse_weight(N, K)
    values_q, w_s = int8.quantize_weight(values)
    w_values, w_codes, w_colsum = sparse24.pack_cpu_int8(values_q, meta)
    y = OPS.sparse24_int8_linear_packed(x, w_values, w_codes, w_colsum, w_s, None)
    torch.testing.assert_close(y, reference.int8_linear(x, sparse24.decompress(values_q, meta),
                                                        w_s, None),
                               **tolerances.QUANT_EPILOGUE[dtype])
    _opcheck(OPS.sparse24_int8_linear_packed.default, (x, w_values, w_codes, w_colsum, w_s, None))


def test_sparse24_refusals(backend):
    """Bad input to the 2:4 ops: clear errors before any kernel runs."""
    values, meta = _sparse_weight(20, 16)
    w_values, w_codes = sparse24.pack_cpu_float(values, meta)
    x = torch.randn(3, 16)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        OPS.sparse24_linear(x, values, meta, None)
    with pytest.raises(ValueError, match="NaN or Inf"):
        OPS.sparse24_linear_packed(x, w_values, w_codes, None, 20)
    with pytest.raises(ValueError, match="must hold"):
        OPS.sparse24_linear_packed(torch.randn(3, 24), w_values, w_codes, None, 20)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        sparse24.compress(torch.randn(8, 16))
    bad_meta = meta.clone()
    bad_meta[0, 0] = 0x0F  # i0 = 3 >= i1 = 3
    with pytest.raises(ValueError, match="corrupt meta"):
        sparse24.pack_cpu_float(values, bad_meta)
    assert OPS.sparse24_linear_packed(torch.randn(0, 16), w_values, w_codes, None, 20).shape == (0, 20)


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (7, 7), (1, 9), (5, 13)])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 1), (6, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [8, 33])
def test_attention_matches_sdpa(backend, Sq, Sk, Hq, Hkv, causal, D):
    q, k, v = torch.randn(2, Hq, Sq, D), torch.randn(2, Hkv, Sk, D), torch.randn(2, Hkv, Sk, D)
    keep = torch.rand(2, 1, 1, Sk) > 0.3
    keep[..., -1] = True
    y = OPS.attention(q, k, v, keep, causal)
    kr, vr = (t.repeat_interleave(Hq // Hkv, 1) for t in (k, v))
    mask = keep & torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq) if causal else keep
    ref = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
    torch.testing.assert_close(y, ref, **tolerances.FLOAT_MATMUL[torch.float32])
    _opcheck(OPS.attention.default, (q, k, v, keep, causal, None))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_gradients(backend, causal):
    """Autograd: the forward runs the backend's kernel, the backward recomputes the reference;
    grads of q, k, v (GQA) and of an additive mask equal those of the reference and of sdpa."""
    q = torch.randn(2, 4, 9, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 12, 16, requires_grad=True) for _ in range(2))
    bias = torch.randn(1, 1, 9, 12, requires_grad=True)
    ins = (q, k, v, bias)
    OPS.attention(q, k, v, bias, causal, 0.3).square().sum().backward()
    got = [t.grad.clone() for t in ins]
    for t in ins:
        t.grad = None
    reference.attention(q, k, v, bias, causal, 0.3).square().sum().backward()
    for g, t in zip(got, ins):
        torch.testing.assert_close(g, t.grad, **tolerances.FLOAT_MATMUL[torch.float32])
    for t in ins:
        t.grad = None
    keep = torch.ones(9, 12, dtype=torch.bool).tril(3) if causal else torch.ones(9, 12, dtype=torch.bool)
    torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
        attn_mask=bias.masked_fill(~keep, float("-inf")), scale=0.3).square().sum().backward()
    for g, t in zip(got, ins):
        torch.testing.assert_close(g, t.grad, **tolerances.FLOAT_MATMUL[torch.float32])


def test_attention_additive_mask_and_fully_masked_rows(backend):
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    add = torch.randn(1, 1, 3, 4)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=add, scale=0.5)
    torch.testing.assert_close(OPS.attention(q, k, v, add, False, 0.5), ref)
    none = torch.zeros(1, 1, 1, 4, dtype=torch.bool)
    assert bool((OPS.attention(q, k, v, none) == 0).all())


BAD = [
    (lambda w, s: (torch.randn(2, 8, dtype=torch.float64), w, s, None), "dtype"),
    (lambda w, s: (torch.randn(2, 7), w, s, None), r"shape \[\.\.\., 8\]"),
    (lambda w, s: (torch.randn(2, 8), w.float(), s, None), "w_q must have dtype int8"),
    (lambda w, s: (torch.randn(2, 8), torch.zeros(8, 4, dtype=torch.int8).t(), s, None),
     "contiguous"),
    (lambda w, s: (torch.randn(2, 8), w, s[:2], None), r"w_scale must have shape \[4\]"),
    (lambda w, s: (torch.randn(2, 8), w, s, torch.randn(3)), r"bias must have shape \[4\]"),
    (lambda w, s: (torch.full((2, 8), float("nan")), w, s, None), "NaN or Inf"),
    (lambda w, s: (torch.tensor([[1.0] * 7 + [float("inf")]]), w, s, None), "NaN or Inf"),
]


@pytest.mark.parametrize("make,msg", BAD)
def test_int8_linear_bad_input(backend, make, msg):
    w_q, w_s = _int8_weight(4, 8)
    with pytest.raises(ValueError, match=msg):
        OPS.int8_linear(*make(w_q, w_s))


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("PYSPARSE_BACKEND", "gpu9000")
    w_q, w_s = _int8_weight(4, 8)
    with pytest.raises(ValueError, match="PYSPARSE_BACKEND"):
        OPS.int8_linear(torch.randn(2, 8), w_q, w_s, None)
