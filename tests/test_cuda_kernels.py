"""CUDA C++ kernels (csrc/cuda/) checked without a GPU, plus numerics where one is present.

* Re-pack: formats.sparse24.pack_cuda_meta + the kernels' register read pattern, fed through
  the PTX model in pysparse.testing.ptx_sparse, must reproduce decompress(values, meta).
* gpu_static: nvcc builds every .cu for sm_80 and sm_90a; the SASS holds the tensor-core
  instructions meant and no kernel spills or uses local memory.
* On a CUDA machine with pysparse._C_cuda built: the wrappers in ops/backends/cuda.py against
  the reference over a shape grid.
"""
import glob
import logging
import os
import re
import shutil
import subprocess
import time

import pytest
import torch

from pysparse.formats import sparse24 as sp24
from pysparse.ops import reference
from pysparse.ops.backends import cuda as cuda_backend
from pysparse.testing import ptx_sparse, tolerances

log = logging.getLogger(__name__)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")


# ----------------------------------------------------------------------------- re-pack


def _random_24(N, K, dtype=torch.float32, sparse_groups=True):
    w = torch.randn(N, K)
    w = w * sp24.mask_24(w)
    if sparse_groups:  # some groups with one or no non-zero
        g = w.reshape(N, K // 4, 4)
        drop = torch.rand(N, K // 4) < 0.2
        g[drop] = 0.0
        one = torch.rand(N, K // 4) < 0.2
        g[..., 0][one] = 0.0
        g[..., 1][one] = 0.0
        g[..., 2][one] = 0.0
        w = g.reshape(N, K)
    if dtype == torch.int8:
        return torch.clamp((w * 40).round(), -127, 127).to(torch.int8)
    return w.to(dtype)


def _kernel_meta_word(kind, lane):
    """The word index the kernels read for ``lane`` (csrc/cuda/gemm_sm80.cuh, meta_word)."""
    return 2 * (lane >> 2) + (lane & 1) if kind == "f16" else lane


def _model_dense(values, words, N, K, kind):
    """Run the PTX model over every (16-row tile, k-step) of the packed weight."""
    kstep = ptx_sparse.SHAPES[kind][0]
    NT, KT, _ = words.shape
    Kp = KT * kstep
    vals = torch.zeros(NT * 16, Kp // 2, dtype=torch.float64)
    vals[:N, : K // 2] = values.double()
    out = torch.zeros(NT * 16, Kp, dtype=torch.float64)
    for nt in range(NT):
        for kt in range(KT):
            tile = vals[16 * nt: 16 * nt + 16, kt * kstep // 2: (kt + 1) * kstep // 2]
            regs = ptx_sparse.a_fragments(tile, kind)
            meta_regs = [int(words[nt, kt, _kernel_meta_word(kind, lane)]) for lane in range(32)]
            out[16 * nt: 16 * nt + 16, kt * kstep: (kt + 1) * kstep] = ptx_sparse.dense_a_tile(
                regs, meta_regs, kind)
    return out[:N, :K], out


@pytest.mark.parametrize("kind,dtype", [("f16", torch.float16), ("f16", torch.bfloat16),
                                        ("int8", torch.int8)])
@pytest.mark.parametrize("N,K", [(16, 32), (16, 64), (20, 36), (70, 132), (64, 260), (3, 4)])
def test_repack_through_ptx_model(kind, dtype, N, K):
    w = _random_24(N, K, dtype)
    values, meta = sp24.compress(w)
    words = sp24.pack_cuda_meta(meta, K, kind)
    assert tuple(words.shape) == sp24.cuda_meta_shape(N, K, kind)
    assert words.dtype == torch.int32
    dense, padded = _model_dense(values, words, N, K, kind)
    torch.testing.assert_close(dense, sp24.decompress(values, meta).double(), rtol=0, atol=0)
    assert not padded[N:].any() and not padded[:, K:].any()
    torch.testing.assert_close(sp24.unpack_cuda_meta(words, N, K, kind), meta, rtol=0, atol=0)


def test_ptx_model_matches_hand_example():
    # one f16 tile: row 0 keeps columns 1 and 3 of chunk 0, row 8 keeps 0 and 2 of chunk 5
    tile = torch.zeros(16, 32)
    tile[0, 1], tile[0, 3], tile[8, 20], tile[8, 22] = 1.0, 2.0, 3.0, 4.0
    values, meta = sp24.compress(tile)
    regs = ptx_sparse.a_fragments(values.double(), "f16")
    lane_t0 = regs[0]  # lane 0: a0, a1 = row 0 compressed columns 0, 1
    assert lane_t0[0] == 1.0 and lane_t0[1] == 2.0
    words = sp24.pack_cuda_meta(meta, 32, "f16")
    w0 = int(words[0, 0, 0]) & 0xFFFFFFFF
    assert w0 & 0xF == 0b1101  # i0=1, i1=3 for row 0, chunk 0
    w1 = int(words[0, 0, 1]) & 0xFFFFFFFF  # lane 1: chunks 4..7, row 8 in the high half
    assert (w1 >> 16 + 4) & 0xF == 0b1000  # chunk 5 of row 8: i0=0, i1=2
    dense = ptx_sparse.dense_a_tile(regs, [int(words[0, 0, _kernel_meta_word("f16", ln)])
                                           for ln in range(32)], "f16")
    torch.testing.assert_close(dense, tile.double(), rtol=0, atol=0)


def test_ptx_model_rejects_unordered_metadata():
    regs = torch.zeros(32, 8)
    with pytest.raises(ValueError, match="not ordered"):
        ptx_sparse.dense_a_tile(regs, [0] * 32, "f16")


def test_repack_bad_inputs():
    w = _random_24(16, 32)
    values, meta = sp24.compress(w)
    with pytest.raises(ValueError, match="kind"):
        sp24.pack_cuda_meta(meta, 32, "fp8")
    with pytest.raises(ValueError, match="does not match K"):
        sp24.pack_cuda_meta(meta, 64, "f16")
    with pytest.raises(ValueError, match="uint8"):
        sp24.pack_cuda_meta(meta.int(), 32, "f16")
    bad = meta.clone()
    bad[0, 0] = 0x00  # i0 == i1
    with pytest.raises(ValueError, match="corrupt"):
        sp24.pack_cuda_meta(bad, 32, "f16")
    words = sp24.pack_cuda_meta(meta, 32, "int8")
    with pytest.raises(ValueError, match="expected int32 words"):
        sp24.unpack_cuda_meta(words, 16, 32, "f16")
    with pytest.raises(ValueError, match="multiple of 4"):
        sp24.unpack_cuda_meta(words, 16, 30, "int8")


# The kernels' ldmatrix addressing (csrc/cuda/gemm_sm80.cuh load_a / load_b64, int8_gemm.cu
# Int8Mma), written out again here and checked against the PTX fragment formulas.
def _load_a_addr(lane, ks=0):
    return lane % 16, ks * 32 + (lane // 16) * 16


def _load_b64_addr(lane, ks=0, j=0):
    return 8 * j + lane % 8, ks * 64 + (lane // 8) * 16


def _as_bytes(t):
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], -1)


@pytest.mark.parametrize("kind", ["f16", "int8"])
def test_ldmatrix_addressing_gives_ptx_fragments(kind):
    dt = torch.float16 if kind == "f16" else torch.int8
    esz = 2 if kind == "f16" else 1
    k = ptx_sparse.SHAPES[kind][0]
    tile = (torch.randn(16, k // 2) * 50).to(dt)  # compressed A tile: 16 rows x 32 bytes
    regs = ptx_sparse.ldmatrix_x4(_as_bytes(tile), _load_a_addr)
    want = ptx_sparse.a_fragments(tile.to(torch.float64), kind)
    got = regs.reshape(32, 16).view(dt).reshape(32, 16 // esz).to(torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # B: 8 tokens x k (row-major activations, 64 bytes per k-step)
    xt = (torch.randn(8, k) * 50).to(dt)
    regs = ptx_sparse.ldmatrix_x4(_as_bytes(xt), _load_b64_addr)
    got = regs.reshape(32, 16).view(dt).reshape(32, 16 // esz)
    for lane in range(32):
        for i in range(16 // esz):
            kk, n = ptx_sparse.b_element_position(kind, lane, i)
            assert got[lane, i] == xt[n, kk]


def test_ldmatrix_addressing_dense_int8_b():
    # Int8Mma: one ldmatrix.x4 feeds two n8 tiles of m16n8k32 (b0: k 4t..4t+3, b1: k 16+4t..)
    xt = (torch.randn(16, 32) * 50).to(torch.int8)
    regs = ptx_sparse.ldmatrix_x4(_as_bytes(xt),
                                  lambda ln: (8 * (ln // 16) + ln % 8, ((ln // 8) % 2) * 16))
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for tile in range(2):
            for r in range(2):
                want = xt[8 * tile + g, 16 * r + 4 * t: 16 * r + 4 * t + 4]
                assert torch.equal(regs[lane, 2 * tile + r].view(torch.int8), want)



# ----------------------------------------------------------------------------- gpu_static
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc")
                                else None)
ARCHS = ("sm_80", "sm_90a")
# .cu file -> the SASS tensor-core instruction its GEMM kernel must contain
SASS_OPS = {"int8_gemm": r"IMMA\.16832\.S8\.S8", "sparse24_gemm": r"HMMA\.SP\.16832\.F32",
            "sparse24_int8_gemm": r"IMMA\.SP\.16864\.S8\.S8"}


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="module")
def cubins(tmp_path_factory):
    """The GEMM sources (SASS_OPS; other csrc/cuda files have their own tests) built once per
    arch: {(name, arch): (cubin path, ptxas log)}."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("cubins")
    built, t0 = {}, time.perf_counter()
    for name in sorted(SASS_OPS):
        src = os.path.join(CUDA_DIR, name + ".cu")
        for arch in ARCHS:
            cubin = out / f"{name}.{arch}.cubin"
            proc = subprocess.run([NVCC, "-cubin", f"-arch={arch}", "-O3", "-std=c++17",
                                   "-Xptxas", "-v", src, "-o", str(cubin)],
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"nvcc {name} {arch} failed:\n{proc.stderr}"
            built[(name, arch)] = (str(cubin), proc.stderr)
    log.info("nvcc: %d cubins in %.1f s", len(built), time.perf_counter() - t0)
    return built


def _ptxas_kernels(text):
    """[(mangled kernel, registers, smem bytes, spill stores + loads, stack bytes)]."""
    rows = []
    for m in re.finditer(r"Function properties for (\S+)\n\s+(\d+) bytes stack frame, (\d+) bytes "
                         r"spill stores, (\d+) bytes spill loads\n.*?Used (\d+) registers"
                         r"(?:.*?(\d+) bytes smem)?", text):
        rows.append((m.group(1), int(m.group(5)), int(m.group(6) or 0),
                     int(m.group(3)) + int(m.group(4)), int(m.group(2))))
    return rows


@pytest.mark.gpu_static
def test_cuda_sources_build_for_sm80_and_sm90a(cubins):
    names = {os.path.splitext(os.path.basename(p))[0]
             for p in glob.glob(os.path.join(CUDA_DIR, "*.cu"))}
    assert set(SASS_OPS) <= names
    assert set(cubins) == {(n, a) for n in SASS_OPS for a in ARCHS}


@pytest.mark.gpu_static
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(SASS_OPS))
def test_sass_has_tensor_core_instructions(cubins, name, arch):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (install triton or the CUDA toolkit)")
    sass = subprocess.run([tool, "--dump-sass", cubins[(name, arch)][0]], capture_output=True,
                          text=True, check=True).stdout
    assert re.search(SASS_OPS[name], sass), f"{name} {arch}: no {SASS_OPS[name]} in the SASS"
    if name == "int8_gemm":
        assert ".SP." not in sass  # the dense GEMM must not pick a sparse instruction
    assert "LDGSTS" in sass and "LDSM" in sass  # cp.async pipeline and ldmatrix fragments


@pytest.mark.gpu_static
@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_do_not_spill(cubins, arch):
    tool = _cuobjdump()
    for name in sorted({n for n, _ in cubins}):
        cubin, ptxas = cubins[(name, arch)]
        kernels = _ptxas_kernels(ptxas)
        assert kernels, f"no ptxas -v report for {name}"
        # e.g. plain mma.sp instead of mma.sp::ordered_metadata draws an advisory
        assert "Advisory" not in ptxas and "warning" not in ptxas.lower(), ptxas
        for kernel, regs, smem, spills, stack in kernels:
            short = re.sub(r"^_ZN13pysparse_cuda\d+_GLOBAL__N__\w+?_cu_[0-9a-f]+\d+", "", kernel)
            log.info("%s %s %s: %d registers, %d B smem, %d B spills, %d B stack", arch, name,
                     short, regs, smem, spills, stack)
            assert spills == 0 and stack == 0, f"{kernel} ({arch}) spills or uses a stack"
        if tool is not None:
            usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True,
                                   text=True, check=True).stdout
            assert re.findall(r"LOCAL:(\d+)", usage) and all(
                v == "0" for v in re.findall(r"LOCAL:(\d+)", usage)), usage


# ----------------------------------------------------------------------------- backend module


def test_cuda_backend_status_never_raises():
    ok, why = cuda_backend.status()
    assert isinstance(ok, bool) and why
    if not torch.cuda.is_available():
        assert not ok


def test_cuda_wrappers_fall_back_on_cpu():
    x = torch.randn(3, 64)
    w = _random_24(24, 64)
    values, meta = sp24.compress(w)
    b = torch.randn(24)
    torch.testing.assert_close(cuda_backend.sparse24_linear(x, values, meta, b),
                               reference.sparse24_linear(x, values, meta, b))
    wq = (torch.randn(24, 64) * 40).clamp(-127, 127).to(torch.int8)
    ws = torch.rand(24) + 0.01
    torch.testing.assert_close(cuda_backend.int8_linear(x, wq, ws, b),
                               reference.int8_linear(x, wq, ws, b))
    vq, mq = sp24.compress(_random_24(24, 64, torch.int8))
    torch.testing.assert_close(cuda_backend.sparse24_int8_linear(x, vq, mq, ws, b),
                               reference.sparse24_int8_linear(x, vq, mq, ws, b))


# ----------------------------------------------------------------------------- on a GPU
needs_kernels = pytest.mark.skipif(not cuda_backend.status()[0],
                                   reason=f"CUDA kernels not usable: {cuda_backend.status()[1]}")
SHAPES = [(M, N, K) for M in (1, 2, 13, 67) for N, K in ((24, 64), (100, 160), (130, 96),
                                                         (64, 4096), (72, 264))]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_linear_cuda_matches_reference(M, N, K, dtype):
    dev = "cuda"
    x = torch.randn(M, K, device=dev).to(dtype)
    wq = (torch.randn(N, K, device=dev) * 40).clamp(-127, 127).to(torch.int8)
    ws = torch.rand(N, device=dev) * 0.01 + 1e-4
    b = torch.randn(N, device=dev)
    for bias in (b, None):
        got = cuda_backend.int8_linear(x, wq, ws, bias)
        want = reference.int8_linear(x, wq, ws, bias)
        # same quantization, exact int32 sums, the reference's epilogue order without fma
        torch.testing.assert_close(got, want, **tolerances.QUANT_EPILOGUE[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_sparse24_linear_cuda_matches_reference(M, N, K, dtype):
    dev = "cuda"
    w = _random_24(N, K, dtype).to(dev)
    values, meta = sp24.compress(w)
    x = torch.randn(2, M, K, device=dev).to(dtype)
    b = torch.randn(N, device=dev).to(dtype)
    got = cuda_backend.sparse24_linear(x, values, meta, b)
    want = reference.sparse24_linear(x, values, meta, b)
    # fp32 accumulation in another order, then one rounding to x.dtype
    torch.testing.assert_close(got.float(), want.float(), **tolerances.FLOAT_MATMUL[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [s for s in SHAPES if s[2] % 32 == 0] + [(5, 40, 96)])
def test_sparse24_int8_linear_cuda_matches_reference(M, N, K, dtype):
    dev = "cuda"
    vq, mq = sp24.compress(_random_24(N, K, torch.int8))
    vq, mq = vq.to(dev), mq.to(dev)
    x = torch.randn(M, K, device=dev).to(dtype)
    ws = torch.rand(N, device=dev) * 0.01 + 1e-4
    b = torch.randn(N, device=dev)
    got = cuda_backend.sparse24_int8_linear(x, vq, mq, ws, b)
    want = reference.sparse24_int8_linear(x, vq, mq, ws, b)
    torch.testing.assert_close(got, want, **tolerances.QUANT_EPILOGUE[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_per_token_cuda_matches_reference(dtype):
    x = (torch.randn(3, 5, 67, device="cuda") * 3).to(dtype)
    x[0, 1] = 0.0  # an all-zero row: scale 1e-12 / 127
    q, s = cuda_backend.quantize_per_token(x)
    rq, rs = reference.quantize_per_token(x)
    torch.testing.assert_close(q, rq, rtol=0, atol=0)
    torch.testing.assert_close(s, rs, rtol=0, atol=0)


@needs_kernels
def test_cuda_wrappers_refuse_non_finite():
    x = torch.randn(3, 64, device="cuda")
    x[1, 5] = float("nan")
    wq = torch.ones(16, 64, dtype=torch.int8, device="cuda")
    with pytest.raises(ValueError, match="NaN or Inf"):
        cuda_backend.int8_linear(x, wq, torch.ones(16, device="cuda"))


def test_metadata_words_hand_examples():
    # every chunk keeps positions 0 and 2 (code 0b1000): the f16 words are 0x88888888, as in
    # LLVM's executed sparse-mma-2-4-f16.mlir test (0x8888 per row half)
    w = torch.zeros(16, 64)
    w[:, 0::4] = 1.0
    w[:, 2::4] = 2.0
    values, meta = sp24.compress(w)
    f16 = sp24.pack_cuda_meta(meta, 64, "f16")
    assert bool(((f16[:1] & 0xFFFFFFFF) == 0x88888888 - 2 ** 32).all())
    # int8: row 9, chunk 10 (columns 40..43) lives in lane 4*1 + 2*1 + 1 = 7, bits 8..11
    w = torch.zeros(16, 64)
    w[:, 0::4] = 1.0
    w[:, 1::4] = 1.0
    w[9, 40:44] = torch.tensor([0.0, 3.0, 0.0, 4.0])
    values, meta = sp24.compress(w)
    i8 = sp24.pack_cuda_meta(meta, 64, "int8")
    assert ptx_sparse.metadata_owner("int8", 9, 10) == (7, 8)
    assert (int(i8[0, 0, 7]) >> 8) & 0xF == 0b1101  # i0=1, i1=3
    assert int(i8[0, 0, 6]) & 0xFFFFFFFF == 0x44444444  # row 1, chunks 8..15: code 0b0100


# A CPU walk through the 2:4 kernels' launch geometry: the grid, load_stage's byte ranges and
# zero-fill, the metadata offsets, load_a / load_b64 / meta_word per warp and k-step, the MMA as
# the PTX model defines it, and the epilogue's (row, token) mapping (gemm_sm80.cuh), against
# the reference product.
def _emulate_sparse_kernel(x_bytes, w_bytes, words, M, N, kind, dt):
    kstep = ptx_sparse.SHAPES[kind][0]
    esz = 2 if kind == "f16" else 1
    nk = -(-w_bytes.shape[1] // 64)
    out = torch.zeros(M, N, dtype=torch.float64)
    for n0 in range(0, -(-N // 64) * 64, 64):
        for t0 in range(0, -(-M // 32) * 32, 32):
            acc = torch.zeros(64, 32, dtype=torch.float64)
            for kt in range(nk):
                ws = torch.zeros(64, 64, dtype=torch.uint8)
                rows = w_bytes[n0: n0 + 64, kt * 64: kt * 64 + 64]
                ws[: rows.shape[0], : rows.shape[1]] = rows
                xs = torch.zeros(32, 128, dtype=torch.uint8)
                rows = x_bytes[t0: t0 + 32, kt * 128: kt * 128 + 128]
                xs[: rows.shape[0], : rows.shape[1]] = rows
                for warp in range(4):
                    for ks in range(2):
                        a = ptx_sparse.ldmatrix_x4(
                            ws, lambda ln: (16 * warp + ln % 16, ks * 32 + (ln // 16) * 16))
                        a = a.reshape(32, 16).view(dt).reshape(32, 16 // esz).double()
                        e = [int(words[n0 // 16 + warp, 2 * kt + ks, _kernel_meta_word(kind, ln)])
                             for ln in range(32)]
                        dense_a = ptx_sparse.dense_a_tile(a, e, kind)
                        for j in range(4):
                            b = ptx_sparse.ldmatrix_x4(
                                xs, lambda ln: (8 * j + ln % 8, ks * 64 + (ln // 8) * 16))
                            b = b.reshape(32, 16).view(dt).reshape(32, 16 // esz).double()
                            dense_b = torch.zeros(kstep, 8, dtype=torch.float64)
                            for ln in range(32):
                                for i in range(16 // esz):
                                    kk, n = ptx_sparse.b_element_position(kind, ln, i)
                                    dense_b[kk, n] = b[ln, i]
                            acc[16 * warp: 16 * warp + 16, 8 * j: 8 * j + 8] += dense_a @ dense_b
            nn, tt = min(64, N - n0), min(32, M - t0)
            out[t0: t0 + tt, n0: n0 + nn] = acc[:nn, :tt].T
    return out


@pytest.mark.parametrize("kind,dt,M,N,K", [("f16", torch.float16, 5, 70, 80),
                                           ("int8", torch.int8, 3, 20, 160)])
def test_sparse_kernel_geometry_emulation(kind, dt, M, N, K):
    w = _random_24(N, K, dt)
    values, meta = sp24.compress(w)
    words = sp24.pack_cuda_meta(meta, K, kind)
    if dt == torch.int8:
        x = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    else:
        x = torch.randn(M, K).to(dt)
    got = _emulate_sparse_kernel(_as_bytes(x), _as_bytes(values), words, M, N, kind, dt)
    want = x.double() @ sp24.decompress(values, meta).double().T
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# the CUDA kernel chain of the public ops: CUDA C++ -> Triton -> reference


def test_backend_chain_covers_the_same_ops_and_falls_back_in_order(monkeypatch):
    """Where the CUDA C++ kernels do not apply (here: CPU tensors, no _C_cuda), each wrapper
    hands the call to FALLBACK[op] (the Triton kernel that register_all puts there), and to the
    reference when there is none."""
    from pysparse.ops.backends import triton

    cuda = cuda_backend
    assert set(cuda.CUDA_KERNELS) == set(triton.CUDA_KERNELS)
    calls = []

    def spy(op):
        def fn(*args):
            calls.append(op)
            return getattr(reference, op)(*args)
        return fn

    monkeypatch.setattr(cuda, "FALLBACK", {op: spy(op) for op in cuda.CUDA_KERNELS})
    x = torch.randn(3, 32)
    w = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    ws = torch.rand(8) / 100
    dense = torch.randn(8, 32)
    vals, meta = sp24.compress(dense * sp24.mask_24(dense))
    vq = torch.randint(-127, 128, vals.shape, dtype=torch.int8)
    q = torch.randn(1, 2, 5, 64, dtype=torch.float16)
    torch.testing.assert_close(cuda.int8_linear(x, w, ws), reference.int8_linear(x, w, ws))
    cuda.quantize_per_token(x)
    cuda.sparse24_linear(x, vals, meta)
    cuda.sparse24_int8_linear(x, vq, meta, ws)
    cuda.attention(q, q, q, None, True)
    assert calls == ["int8_linear", "quantize_per_token", "sparse24_linear",
                     "sparse24_int8_linear", "attention"]
    monkeypatch.setattr(cuda, "FALLBACK", {})
    torch.testing.assert_close(cuda.attention(q, q, q, None, True),
                               reference.attention(q, q, q, None, True))
