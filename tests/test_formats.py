import pytest
import torch

from pysparse.formats import int8, sparse24


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 384), (13, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_weight_roundtrip(shape, dtype):
    w = torch.randn(shape, dtype=dtype)
    q, s = int8.quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (shape[0],)
    assert int(q.abs().max()) <= 127 and int(q.min()) >= -127
    # the largest |w| of each row maps to +-127 exactly
    assert bool((q.abs().amax(1) == 127).all())
    err = (int8.dequantize_weight(q, s) - w.float()).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-5)).all())  # half a quantization step


def test_int8_zero_row_and_errors():
    w = torch.zeros(2, 8)
    q, s = int8.quantize_weight(w)
    assert bool((q == 0).all()) and bool((s > 0).all())
    with pytest.raises(ValueError, match="NaN or Inf"):
        int8.quantize_weight(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="floating-point"):
        int8.quantize_weight(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        int8.quantize_weight(torch.ones(4))


@pytest.mark.parametrize("shape", [(1, 4), (5, 12), (16, 384), (7, 1540)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_sparse24_roundtrip(shape, dtype):
    w = torch.randn(shape) * 50
    w = w * sparse24.mask_24(w)
    w = w.to(dtype)
    assert sparse24.is_24(w)
    values, meta = sparse24.compress(w)
    assert values.shape == (shape[0], shape[1] // 2) and values.dtype == dtype
    assert meta.shape == (shape[0], (shape[1] + 7) // 8) and meta.dtype == torch.uint8
    assert torch.equal(sparse24.decompress(values, meta), w)


def test_sparse24_meta_layout_follows_the_spec():
    # one row, two groups: kept positions (1, 3) and (0, 2); a third group with a single
    # non-zero at position 2 keeps the lowest free position as its second entry
    w = torch.tensor([[0.0, 5, 0, 6, 7, 0, 8, 0, 0, 0, 9, 0]])
    values, meta = sparse24.compress(w)
    code = [1 | 3 << 2, 0 | 2 << 2, 0 | 2 << 2]
    assert meta.tolist() == [[code[0] | code[1] << 4, code[2]]]
    assert values.tolist() == [[5, 6, 7, 8, 0, 9]]


def test_mask_24_keeps_two_largest():
    w = torch.randn(33, 64)
    m = sparse24.mask_24(w)
    g = m.reshape(33, 16, 4)
    assert bool((g.sum(-1) == 2).all())
    a = w.abs().reshape(33, 16, 4)
    kept_min = a.masked_fill(~g, float("inf")).amin(-1)
    dropped_max = a.masked_fill(g, -1).amax(-1)
    assert bool((kept_min >= dropped_max).all())


def test_sparse24_errors():
    with pytest.raises(ValueError, match="multiple of 4"):
        sparse24.compress(torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r'pysparse.prune\(model, pattern="2:4"\)'):
        sparse24.compress(torch.ones(2, 8))
    with pytest.raises(ValueError, match="NaN or Inf"):
        sparse24.mask_24(torch.full((1, 4), float("inf")))
    with pytest.raises(ValueError, match="does not match"):
        sparse24.decompress(torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.uint8))
    bad = torch.full((1, 1), 0x00, dtype=torch.uint8)  # code 0: i0 == i1 == 0
    with pytest.raises(ValueError, match="corrupt meta"):
        sparse24.decompress(torch.zeros(1, 4), bad)


@pytest.mark.parametrize("N,K", [(1, 1), (16, 4), (17, 5), (33, 18), (384, 1536)])
def test_pack_vnni16_layout(N, K):
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    packed, colsum = int8.pack_vnni16(q)
    Np, Kp = -(-N // 16) * 16, -(-K // 4) * 4
    assert packed.shape == (Np // 16, Kp // 4, 64) and colsum.shape == (Np,)
    n, k = torch.randint(0, N, (50,)), torch.randint(0, K, (50,))
    assert torch.equal(packed[n // 16, k // 4, 4 * (n % 16) + k % 4], q[n, k])  # the spec formula
    assert torch.equal(colsum[:N], q.sum(1, dtype=torch.int32)) and not colsum[N:].any()
    assert torch.equal(int8.unpack_vnni16(packed, N, K), q)
    with pytest.raises(ValueError, match="expected"):
        int8.unpack_vnni16(packed, N + 16, K)
