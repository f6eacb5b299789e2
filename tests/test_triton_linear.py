"""The Triton W8A8 and 2:4 kernels (kernels/int8_linear.py, kernels/sparse24.py), verified
without a GPU.

* interpret: numerics under TRITON_INTERPRET=1 on CPU tensors against the reference, on a
  grid of edge cases (M in {1, 2, 13, 67}, N in {1, 7, 33, 64}, K in {4, 40, 100, 132}: off
  every tile; odd 2:4 group counts; 3-D and non-contiguous x). All cases run in one subprocess
  (the interpreter is chosen at import); pytest reports one result per case. Tolerances:
  quantize_per_token is bit-exact (int8 and fp32 scale); int8 GEMM outputs share the exact
  int32 accumulator and differ only in the fp32 epilogue (fma contraction) and the final
  rounding: ``tolerances.QUANT_EPILOGUE``; float 2:4: ``tolerances.FLOAT_MATMUL``.
* gpu_static: each kernel compiled by ptxas for sm_80 and sm_90; the SASS must contain the
  tensor-core MMA meant and no local-memory spills; registers and shared memory are logged
  (``pytest -m gpu_static -o log_cli=true --log-cli-level=INFO``).
* bad arguments: the launchers raise the reference's ValueError, message for message.
* on a CUDA machine: the public ops through the dispatcher, and opcheck.
"""
import importlib.util
import json
import logging
import sys

import pytest
import torch

from pysparse.formats import sparse24 as fmt24
from pysparse.ops import reference
from pysparse.testing import interpret, tolerances, triton_static

HAS_TRITON = importlib.util.find_spec("triton") is not None
LOG = logging.getLogger(__name__)

F32, F16, BF16 = "float32", "float16", "bfloat16"
SMALL = (16, 16, 32)  # forced tiles: the smallest MMA, so M, N, K of tens span several tiles
TINY_K = (16, 16, 16)  # BLOCK_K = 16: two meta bytes per slice, many K slices


def _case(kind, dtype, M, N, K, bias=True, layout="contiguous", tiles=SMALL):
    return dict(kind=kind, dtype=dtype, M=M, N=N, K=K, bias=bias, layout=layout, tiles=tiles)


def _grid(kind, dtypes):
    """The (M, N, K) edges, each value of each set met at least twice, dtypes rotating."""
    shapes = [(1, 1, 4), (2, 7, 40), (13, 33, 100), (67, 64, 132), (1, 64, 100), (2, 33, 132),
              (13, 1, 40), (67, 7, 4)]
    return {f"{kind}_m{M}_n{N}_k{K}_{dtypes[i % len(dtypes)]}":
            _case(kind, dtypes[i % len(dtypes)], M, N, K, bias=i % 2 == 0)
            for i, (M, N, K) in enumerate(shapes)}


CASES = {
    # quantize_per_token: bit-exact
    "quant_m1_k4_f32": _case("quant", F32, 1, 0, 4),
    "quant_m13_k100_bf16": _case("quant", BF16, 13, 0, 100),
    "quant_m67_k132_f16": _case("quant", F16, 67, 0, 132),
    "quant_3d_f16": _case("quant", F16, 6, 0, 40, layout="3d"),
    "quant_transposed_x_f32": _case("quant", F32, 13, 0, 40, layout="transposed"),
    "quant_strided_k_bf16": _case("quant", BF16, 7, 0, 40, layout="strided_k"),
    "quant_ties_and_zero_rows_f32": _case("quant", F32, 4, 0, 8, layout="ties"),
    "quant_two_pass_k8200_bf16": _case("quant", BF16, 2, 0, 8200),
    "quant_through_op_f16": _case("quant", F16, 13, 0, 40, layout="via_op"),
    "quant_nan_raises_f32": _case("quant", F32, 3, 0, 40, layout="nan"),
    # int8_linear
    **_grid("int8", [F16, BF16, F32]),
    "int8_3d_x_bf16": _case("int8", BF16, 13, 33, 40, layout="3d"),
    "int8_transposed_x_f16": _case("int8", F16, 13, 33, 100, layout="transposed"),
    "int8_strided_k_f32": _case("int8", F32, 7, 7, 40, layout="strided_k"),
    "int8_default_tiles_m67_f16": _case("int8", F16, 67, 64, 132, tiles=None),
    "int8_default_tiles_m1_bf16": _case("int8", BF16, 1, 33, 100, tiles=None),
    "int8_through_op_f32": _case("int8", F32, 13, 33, 40, layout="via_op"),
    "int8_nan_raises_f16": _case("int8", F16, 3, 7, 40, layout="nan"),
    # sparse24_linear (float)
    **_grid("sp24", [F16, BF16, F32]),
    "sp24_block_k16_m13_k100_f16": _case("sp24", F16, 13, 33, 100, tiles=TINY_K),
    "sp24_3d_x_bf16": _case("sp24", BF16, 13, 33, 40, layout="3d"),
    "sp24_transposed_x_f32": _case("sp24", F32, 13, 7, 100, layout="transposed"),
    "sp24_default_tiles_m67_bf16": _case("sp24", BF16, 67, 64, 132, tiles=None),
    "sp24_default_tiles_m2_f32": _case("sp24", F32, 2, 33, 100, tiles=None),
    "sp24_through_op_f16": _case("sp24", F16, 13, 33, 40, layout="via_op"),
    # sparse24_int8_linear
    **_grid("sp24i8", [BF16, F32, F16]),
    "sp24i8_block_k16_m67_k100_f16": _case("sp24i8", F16, 67, 33, 100, tiles=TINY_K),
    "sp24i8_3d_x_f32": _case("sp24i8", F32, 13, 33, 40, layout="3d"),
    "sp24i8_transposed_x_bf16": _case("sp24i8", BF16, 13, 7, 100, layout="transposed"),
    "sp24i8_default_tiles_m67_f16": _case("sp24i8", F16, 67, 64, 132, tiles=None),
    "sp24i8_default_tiles_m1_f32": _case("sp24i8", F32, 1, 64, 100, tiles=None),
    "sp24i8_through_op_bf16": _case("sp24i8", BF16, 13, 33, 40, layout="via_op"),
    "sp24i8_nan_raises_bf16": _case("sp24i8", BF16, 3, 7, 40, layout="nan"),
}


def _x(c, gen):
    dtype = getattr(torch, c["dtype"])
    M, K = c["M"], c["K"]
    layout = c["layout"]
    if layout == "3d":
        return (torch.randn(M, 3, K, generator=gen) * 3).to(dtype)[:, :2]  # [M, 2, K], strided
    if layout == "transposed":  # the K axis is not the last in memory
        x = (torch.randn(K, M, generator=gen) * 3).to(dtype).t()
        assert x.stride(-1) != 1
        return x
    if layout == "strided_k":
        return (torch.randn(M, 2 * K, generator=gen) * 3).to(dtype)[:, ::2]
    if layout == "ties":  # x / scale lands on .5 exactly (scale = 1): round half to even
        x = torch.tensor([[0.5, 1.5, 2.5, -2.5, -0.5, 3.5, 126.5, 127.0],
                          [0.0] * 8,  # scale = 1e-12 / 127
                          [-127.0, 4.5, -4.5, 5.5, 0.25, -0.75, 100.5, 1.0],
                          [1e-30, -1e-30, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=dtype)
        return x
    x = (torch.randn(M, K, generator=gen) * 3).to(dtype)
    if layout == "nan":
        x[1, 5] = float("nan")
    return x


def _sparse_weight(N, K, dtype, gen):
    """A random 2:4 weight with some groups holding fewer than 2 non-zeros, compressed."""
    if dtype == torch.int8:
        w = torch.randint(-127, 128, (N, K), generator=gen).float()
    else:
        w = torch.randn(N, K, generator=gen)
    w = w * fmt24.mask_24(w)
    w[torch.rand(N, K, generator=gen) < 0.25] = 0
    values, meta = fmt24.compress(w.to(dtype))
    return values, meta


def _expect_same_error(fn, ref_fn):
    with pytest.raises(ValueError) as want:
        ref_fn()
    with pytest.raises(ValueError) as got:
        fn()
    assert str(got.value) == str(want.value)


def _check_case(c, seed):
    """Run one case through the kernel (in this process: interpreter mode); raise on mismatch."""
    from pysparse.kernels import int8_linear as k8
    from pysparse.kernels import sparse24 as k24

    gen = torch.Generator().manual_seed(seed)
    x = _x(c, gen)
    dtype, N, K = x.dtype, c["N"], c["K"]
    cfg = None if c["tiles"] is None else k8.Config(*c["tiles"], group_m=2, num_warps=4,
                                                    num_stages=1)
    via_op = c["layout"] == "via_op"
    kind = c["kind"]
    if kind == "quant":
        if c["layout"] == "nan":
            return _expect_same_error(lambda: k8.quantize_per_token(x),
                                      lambda: reference.quantize_per_token(x))
        if via_op:
            q, s = torch.ops.pysparse.quantize_per_token_triton(x)
            torch.library.opcheck(torch.ops.pysparse.quantize_per_token_triton.default, (x,),
                                  test_utils=("test_schema",))
        else:
            q, s = k8.quantize_per_token(x)
        rq, rs = reference.quantize_per_token(x)
        assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.is_contiguous()
        assert torch.equal(s, rs), (s - rs).abs().max()
        assert torch.equal(q, rq), (q.int() - rq.int()).abs().max()
        return None

    bias = torch.randn(N, generator=gen).to(dtype) if c["bias"] else None
    if kind == "int8":
        w = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
        w_scale = torch.rand(N, generator=gen) * 0.02 + 1e-3
        args = (x, w, w_scale, bias)
        ref, run, op = reference.int8_linear, k8.int8_linear, "int8_linear_triton"
    elif kind == "sp24":
        values, meta = _sparse_weight(N, K, dtype, gen)
        args = (x, values, meta, bias)
        ref, run, op = reference.sparse24_linear, k24.sparse24_linear, "sparse24_linear_triton"
    else:
        values, meta = _sparse_weight(N, K, torch.int8, gen)
        w_scale = torch.rand(N, generator=gen) * 0.02 + 1e-3
        args = (x, values, meta, w_scale, bias)
        ref, run, op = (reference.sparse24_int8_linear, k24.sparse24_int8_linear,
                        "sparse24_int8_linear_triton")
    if c["layout"] == "nan":
        return _expect_same_error(lambda: run(*args, config=cfg), lambda: ref(*args))
    if via_op:
        out = getattr(torch.ops.pysparse, op)(*args)
        # fake-tensor and AOT checks cannot run the interpreter: they run on CUDA only
        torch.library.opcheck(getattr(torch.ops.pysparse, op).default, args,
                              test_utils=("test_schema",))
    else:
        out = run(*args, config=cfg)
    want = ref(*args)
    assert out.dtype == dtype and out.shape == want.shape and out.is_contiguous()
    tol = tolerances.FLOAT_MATMUL[dtype] if kind == "sp24" else tolerances.QUANT_EPILOGUE[dtype]
    torch.testing.assert_close(out.float(), want.float(), **tol)
    return None


@pytest.fixture(scope="module")
def interpret_results(tmp_path_factory):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return interpret.run_script(__file__, tmp_path_factory.mktemp("interpret"))


@pytest.mark.interpret
@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference(interpret_results, name):
    err = interpret_results[name]
    assert err is None, err


# ---------------------------------------------------------------------------------------------
# gpu_static: ptxas for sm_80 / sm_90, SASS inspected with the cuobjdump in Triton's wheel

_TT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# (name, kernel kind, x dtype, M): M = 1 is a decoding step, M = 4096 a prefill; K = 4096
BUILDS = [
    ("quantize-fp16", "quant", torch.float16, 1),
    ("int8-m1", "int8", torch.float16, 1),
    ("int8-m4096", "int8", torch.bfloat16, 4096),
    ("sp24-fp16-m1", "sp24", torch.float16, 1),
    ("sp24-bf16-m4096", "sp24", torch.bfloat16, 4096),
    ("sp24i8-m1", "sp24i8", torch.float16, 1),
    ("sp24i8-m4096", "sp24i8", torch.bfloat16, 4096),
]
K_BUILD = 4096


def _build(kind, dtype, M, arch):
    from pysparse.kernels import int8_linear as k8
    from pysparse.kernels import sparse24 as k24

    el = _TT[dtype]
    if kind == "quant":
        block_k, single, warps = k8.quantize_config(K_BUILD)
        meta = dict(BLOCK_K=block_k, SINGLE_PASS=single)
        info = triton_static.build(k8._quantize_kernel, {"X": "*" + el, "Q": "*i8", "S": "*fp32"},
                                   meta, arch, warps, 1, divisible=("K",))
        return meta, info
    if kind == "int8":
        cfg = k8.candidates(k8.m_bucket(M), arch)[0]
        kernel, meta = k8._int8_gemm_kernel, dict(HAS_BIAS=True, **cfg.meta())
        types = {"A": "*i8", "B": "*i8", "XS": "*fp32", "WS": "*fp32", "Bias": "*" + el,
                 "Y": "*" + el}
    else:
        quant = kind == "sp24i8"
        cfg = k24.candidates(k8.m_bucket(M), arch, 1 if quant else dtype.itemsize)[0]
        kernel = k24._sparse24_kernel
        meta = dict(QUANT=quant, HAS_BIAS=True, DOT_PRECISION=k24.dot_precision(dtype),
                    **cfg.meta())
        a = "*i8" if quant else "*" + el
        types = {"X": a, "V": a, "Meta": "*u8", "XS": "*fp32", "WS": "*fp32", "Bias": "*" + el,
                 "Y": "*" + el}
    info = triton_static.build(kernel, types, meta, arch, cfg.num_warps, cfg.num_stages,
                               divisible=("K", "N"))
    return dict(meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages), info


@pytest.mark.gpu_static
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name,kind,dtype,M", BUILDS, ids=[b[0] for b in BUILDS])
def test_build_uses_tensor_cores_without_spills(arch, name, kind, dtype, M, record_property):
    why = triton_static.skip_reason(arch)
    if why:
        pytest.skip(why)
    meta, info = _build(kind, dtype, M, arch)
    summary = dict(kernel=name, arch=f"sm_{arch}", regs=info["regs"],
                   static_smem_bytes=info["static_smem_bytes"],
                   dynamic_smem_bytes=info["dynamic_smem_bytes"], stack_bytes=info["stack_bytes"],
                   local_bytes=info["local_bytes"], mma=info["mma"], config=meta)
    record_property("resources", json.dumps(summary))
    LOG.info("linear kernel build: %s", json.dumps(summary))

    if kind in ("int8", "sp24i8"):
        want = ("IMMA",) if arch < 90 else ("IGMMA", "IMMA")
    elif kind == "sp24":
        want = ("HMMA",) if arch < 90 else ("HGMMA", "HMMA")
    else:
        want = ()
    if want:
        assert any(o.startswith(want) for o in info["mma"]), \
            f"no {' / '.join(want)} in SASS; MMA opcodes: {info['mma']}"
    assert triton_static.spill_free(info), summary
    used = info["dynamic_smem_bytes"] + info["static_smem_bytes"]
    assert used <= triton_static.MAX_SHARED[arch], summary


# ---------------------------------------------------------------------------------------------
# bad arguments: the launchers' checks run before any launch (no GPU, no interpreter needed)


def _bad_calls():
    f16 = torch.float16
    x = torch.randn(3, 40, dtype=f16)
    w = torch.randint(-127, 128, (7, 40), dtype=torch.int8)
    ws = torch.rand(7)
    v, m = fmt24.compress(torch.zeros(7, 40, dtype=f16))
    vq, mq = fmt24.compress(torch.zeros(7, 40, dtype=torch.int8))
    nan_x = x.clone()
    nan_x[2, 3] = float("inf")
    return {
        "quant_int_x": ("quantize_per_token", (x.int(),)),
        "quant_k0": ("quantize_per_token", (x[:, :0],)),
        "int8_wrong_w_dtype": ("int8_linear", (x, w.float(), ws, None)),
        "int8_k_mismatch": ("int8_linear", (x[:, :36], w, ws, None)),
        "int8_scale_shape": ("int8_linear", (x, w, ws[:5], None)),
        "int8_bias_shape": ("int8_linear", (x, w, ws, torch.zeros(6))),
        "sp24_k_not_multiple_of_4": ("sparse24_linear",
                                     (x[:, :38], torch.zeros(7, 19, dtype=f16),
                                      torch.zeros(7, 5, dtype=torch.uint8), None)),
        "sp24_meta_shape": ("sparse24_linear", (x, v, m[:, :4].contiguous(), None)),
        "sp24_inf_x": ("sparse24_linear", (nan_x, v, m, None)),
        "sp24_k_mismatch": ("sparse24_linear", (x[:, :36], v, m, None)),
        "sp24i8_values_dtype": ("sparse24_int8_linear", (x, v, m, ws, None)),
        "sp24i8_scale_shape": ("sparse24_int8_linear", (x, vq, mq, ws[:3], None)),
        "sp24i8_k_not_multiple_of_4": ("sparse24_int8_linear",
                                       (x[:, :38], torch.zeros(7, 19, dtype=torch.int8),
                                        torch.zeros(7, 5, dtype=torch.uint8), ws, None)),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_launchers_raise_the_reference_errors(case):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from pysparse.kernels import int8_linear as k8
    from pysparse.kernels import sparse24 as k24

    op, args = _bad_calls()[case]
    launcher = getattr(k8, op, None) or getattr(k24, op)
    _expect_same_error(lambda: launcher(*args), lambda: getattr(reference, op)(*args))


def test_cuda_dispatch_choices():
    """The "where Triton applies" rules the CUDA kernels use (host logic, any machine)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from pysparse.ops.backends import triton as tb

    x = torch.randn(3, 40, dtype=torch.float16)
    w = torch.zeros(7, 40, dtype=torch.int8)
    assert tb._use_triton_quantize(x) and tb._use_triton_linear(x, w)
    v = torch.zeros(7, 20, dtype=torch.float16)
    assert tb._use_triton_sparse24_float(x, v)
    assert not tb._use_triton_sparse24_float(x, v.float())  # mixed dtypes: the reference
    big = torch.empty(2 ** 20, 4096, dtype=torch.float16, device="meta")
    assert not tb._use_triton_linear(big, torch.empty(4096, 4096, device="meta"))
    assert not tb._use_triton_linear(x, torch.zeros(7))  # malformed: the reference raises


def test_cuda_dispatch_respects_forced_backend(monkeypatch):
    from pysparse.ops.backends import triton as tb

    x = torch.randn(3, 40)
    monkeypatch.setenv("PYSPARSE_BACKEND", "reference")
    assert not tb._use_triton_quantize(x)
    monkeypatch.setenv("PYSPARSE_BACKEND", "triton")
    assert tb._use_triton_quantize(x)


# ---------------------------------------------------------------------------------------------
# on a CUDA machine (skipped here): the real kernels through the dispatcher


def _cuda_or_skip():
    from pysparse.ops.backends import triton as triton_backend
    ok, why = triton_backend.status()
    if not ok:
        pytest.skip(why)


CUDA_SHAPES = [(1, 4096, 4096), (13, 1000, 772), (333, 512, 1028), (2048, 768, 3072)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,N,K", CUDA_SHAPES)
def test_cuda_int8_ops_match_reference(dtype, M, N, K):
    _cuda_or_skip()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
    q, s = torch.ops.pysparse.quantize_per_token(x)
    rq, rs = reference.quantize_per_token(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    w = torch.randint(-127, 128, (N, K), device="cuda", generator=gen, dtype=torch.int8)
    ws = torch.rand(N, device="cuda", generator=gen) * 0.02
    bias = torch.randn(N, device="cuda", generator=gen).to(dtype)
    out = torch.ops.pysparse.int8_linear(x, w, ws, bias)
    torch.testing.assert_close(out.float(), reference.int8_linear(x, w, ws, bias).float(),
                               **tolerances.QUANT_EPILOGUE[dtype])
    values, meta = _sparse_weight(N, K, torch.int8, torch.Generator().manual_seed(1))
    values, meta = values.cuda(), meta.cuda()
    out = torch.ops.pysparse.sparse24_int8_linear(x, values, meta, ws, bias)
    want = reference.sparse24_int8_linear(x, values, meta, ws, bias)
    torch.testing.assert_close(out.float(), want.float(), **tolerances.QUANT_EPILOGUE[dtype])
    for op, args in (("quantize_per_token", (x,)), ("int8_linear", (x, w, ws, bias)),
                     ("sparse24_int8_linear", (x, values, meta, ws, bias))):
        torch.library.opcheck(getattr(torch.ops.pysparse, op + "_triton").default, args)
        torch.library.opcheck(getattr(torch.ops.pysparse, op).default, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,N,K", CUDA_SHAPES)
def test_cuda_sparse24_linear_matches_reference(dtype, M, N, K):
    _cuda_or_skip()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
    values, meta = _sparse_weight(N, K, dtype, torch.Generator().manual_seed(1))
    values, meta = values.cuda(), meta.cuda()
    bias = torch.randn(N, device="cuda", generator=gen).to(dtype)
    out = torch.ops.pysparse.sparse24_linear(x, values, meta, bias)
    want = reference.sparse24_linear(x, values, meta, bias)
    torch.testing.assert_close(out.float(), want.float(), **tolerances.FLOAT_MATMUL[dtype])
    args = (x, values, meta, bias)
    torch.library.opcheck(torch.ops.pysparse.sparse24_linear_triton.default, args)
    torch.library.opcheck(torch.ops.pysparse.sparse24_linear.default, args)


if __name__ == "__main__":
    interpret.run_grid(CASES, _check_case, sys.argv[1])
