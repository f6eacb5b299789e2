"""The CUDA C++ flash-attention kernel (csrc/cuda/attention.{h,cu}), verified without a GPU.

* gpu_static: nvcc builds attention.cu for sm_80 and sm_90a; the SASS of every instantiation
  (fp16 / bf16 x head dim 64 / 128) holds the tensor-core MMA (HMMA.16816.F32[.BF16]),
  ldmatrix (LDSM, .MT88 = .trans for V) and cp.async (LDGSTS), and no local memory (no
  spills, no stack). Registers and shared memory are logged per instantiation
  (``pytest -m gpu_static -o log_cli=true --log-cli-level=INFO``).
* host logic: attention.h compiled with the host C++ compiler; its tile schedule
  (key_tiles / key_visible), CTA numbering (block_coord) and contract checks
  (attention_unsupported) compared with pysparse/testing/attention_tiles.py and with the
  reference attention's mask semantics on a grid of sizes.
* dataflow model: attention_tiles.emulate_attention re-enacts the kernel's lane-level index
  formulas (swizzle, cp.async split, ldmatrix addresses, fragment reuse, online softmax) in
  numpy against the reference; a test pins those formulas to the .cu text. What the model does
  not cover is listed in its module docstring.
* on a CUDA machine with pysparse._C_cuda built (skipped here): the real kernel through
  ``torch.ops.pysparse_cuda.attention`` against the reference.
"""
import importlib.util
import logging
import math
import os
import re
import shutil
import subprocess
import time

import pytest
import torch

from pysparse.ops import reference
from pysparse.testing import attention_tiles as model
from pysparse.testing import tolerances

LOG = logging.getLogger(__name__)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU = os.path.join(ROOT, "csrc", "cuda", "attention.cu")
HEADER = os.path.join(ROOT, "csrc", "cuda", "attention.h")


def _cuda_include():
    """Directory holding cuda_runtime_api.h (attention.h includes it), or None."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime_api.h")):
            return os.path.join(c, "include")
    return None


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    return None


# ---------------------------------------------------------------------------------------------
# gpu_static: nvcc -> cubin -> SASS

ARCHS = ["sm_80", "sm_90a"]
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}  # max shared memory per block
_BUILD_SECONDS = {}


@pytest.fixture(scope="module")
def cubins(tmp_path_factory):
    """arch -> (cubin path, ptxas -v text), built once per arch for this module."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    if _cuobjdump() is None:
        pytest.skip("cuobjdump not found (neither on PATH nor in Triton's wheel)")
    out_dir = tmp_path_factory.mktemp("cuda_attention")
    built = {}
    for arch in ARCHS:
        cubin = out_dir / f"attention_{arch}.cubin"
        start = time.perf_counter()
        proc = subprocess.run(["nvcc", "-cubin", "-O3", "-std=c++17", "-Xptxas", "-v",
                               f"-arch={arch}", CU, "-o", str(cubin)],
                              capture_output=True, text=True, timeout=600)
        _BUILD_SECONDS[arch] = time.perf_counter() - start
        if proc.returncode != 0:
            pytest.fail(f"nvcc {arch} failed:\n{proc.stderr[-4000:]}")
        built[arch] = (str(cubin), proc.stderr + proc.stdout)
    LOG.info("attention.cu nvcc build seconds: %s (total %.1f)",
             {a: round(s, 1) for a, s in _BUILD_SECONDS.items()}, sum(_BUILD_SECONDS.values()))
    return built


def _instantiation(mangled):
    """'__half' / '__nv_bfloat16' and the head dim from attention_fwd_kernel<T, D>'s name."""
    m = re.search(r"attention_fwd_kernelI(6__half|13__nv_bfloat16)Li(\d+)E", mangled)
    assert m, mangled
    return ("fp16" if m.group(1) == "6__half" else "bf16"), int(m.group(2))


def _per_function(text, header):
    """Split cuobjdump output into {function name: its section}."""
    parts = re.split(header, text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@pytest.mark.gpu_static
@pytest.mark.parametrize("arch", ARCHS)
def test_build_uses_tensor_cores_without_spills(cubins, arch, record_property):
    cubin, ptxas = cubins[arch]
    tool = _cuobjdump()
    sass = subprocess.run([tool, "--dump-sass", cubin], check=True, capture_output=True,
                          text=True).stdout
    usage = subprocess.run([tool, "--dump-resource-usage", cubin], check=True,
                           capture_output=True, text=True).stdout
    funcs = _per_function(sass, r"Function : (\S+)")
    resources = _per_function(usage, r"Function (\S+?):")
    kernels = {name: body for name, body in funcs.items() if "attention_fwd_kernel" in name}
    got = sorted(_instantiation(n) for n in kernels)
    assert got == [("bf16", 64), ("bf16", 128), ("fp16", 64), ("fp16", 128)], got

    # ptxas -v: every function reports no stack and no spills
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                        r"loads", ptxas)
    assert len(frames) >= 4 and all(f == ("0", "0", "0") for f in frames), ptxas[-3000:]

    for name, body in kernels.items():
        dtype, head_dim = _instantiation(name)
        opcodes = set(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)",
                                 body, re.M))
        hmma = "HMMA.16816.F32" + (".BF16" if dtype == "bf16" else "")
        assert hmma in opcodes, (name, sorted(o for o in opcodes if "MMA" in o))
        assert "LDSM.16.M88.4" in opcodes and "LDSM.16.MT88.4" in opcodes, name  # K, Q / V^T
        assert any(o.startswith("LDGSTS") for o in opcodes), name  # cp.async
        assert not {o for o in opcodes if o.startswith(("LDL", "STL"))}, name  # no local memory
        res = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", resources[name]))
        dynamic_smem = (model.BLOCK_M + 4 * model.BLOCK_N) * head_dim * 2
        info = dict(arch=arch, dtype=dtype, head_dim=head_dim, regs=int(res["REG"]),
                    static_smem=int(res["SHARED"]), dynamic_smem=dynamic_smem,
                    stack=int(res["STACK"]), local=int(res["LOCAL"]),
                    hmma=sum(1 for _ in re.finditer(r"\bHMMA\.16816", body)))
        LOG.info("attention kernel build: %s", info)
        record_property(f"{dtype}-d{head_dim}", str(info))
        assert info["stack"] == 0 and info["local"] == 0, info
        assert info["regs"] <= 255, info
        assert info["static_smem"] + info["dynamic_smem"] <= SMEM_LIMIT[arch], info
        # every k16 x n8 step of Q K^T (D/16 x 64/8) and of P V (64/16 x D/8): 2 * D/2 HMMAs
        assert info["hmma"] == head_dim, info


# ---------------------------------------------------------------------------------------------
# host logic: attention.h compiled by the host compiler, driven from here

_DRIVER = r"""
#include "attention.h"
#include <cstdio>
#include <cstring>
#include <string>
using namespace pysparse_attention;

static AttentionParams contiguous() {  // a valid call: [2, 4, 100, 64] q/o, [2, 2, 130, 64] k/v
  AttentionParams p{};
  p.q = p.k = p.v = reinterpret_cast<const void*>(uintptr_t{1} << 20);
  p.o = reinterpret_cast<void*>(uintptr_t{1} << 21);
  p.dtype = AttnDType::kFloat16;
  p.batch = 2; p.heads_q = 4; p.heads_kv = 2; p.seq_q = 100; p.seq_k = 130; p.head_dim = 64;
  p.q_stride_s = p.o_stride_s = 64; p.q_stride_h = p.o_stride_h = 6400;
  p.q_stride_b = p.o_stride_b = 25600;
  p.k_stride_s = p.v_stride_s = 64; p.k_stride_h = p.v_stride_h = 8320;
  p.k_stride_b = p.v_stride_b = 16640;
  p.mask_kind = AttnMaskKind::kNone; p.causal = true; p.scale = 0.125f;
  return p;
}

int main() {
  char cmd[16];
  while (std::scanf("%15s", cmd) == 1) {
    if (!std::strcmp(cmd, "T")) {  // T Sq Sk BM BN causal -> (end first_masked) per q block
      int sq, sk, bm, bn, c;
      std::scanf("%d %d %d %d %d", &sq, &sk, &bm, &bn, &c);
      for (int qb = 0; qb < cdiv(sq, bm); ++qb) {
        KeyTiles t = key_tiles(qb, sq, sk, bm, bn, c != 0);
        std::printf("%d %d ", t.end, t.first_masked);
      }
      std::printf("\n");
    } else if (!std::strcmp(cmd, "V")) {  // V Sq Sk causal rows cols -> key_visible bits
      int sq, sk, c, rows, cols;
      std::scanf("%d %d %d %d %d", &sq, &sk, &c, &rows, &cols);
      for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) std::putchar(key_visible(i, j, sq, sk, c != 0) ? '1' : '0');
      std::printf("\n");
    } else if (!std::strcmp(cmd, "C")) {  // C B Hq Sq BM -> num_ctas, then qb h b per CTA
      int b, h, sq, bm;
      std::scanf("%d %d %d %d", &b, &h, &sq, &bm);
      long long n = num_ctas(b, h, sq, bm);
      std::printf("%lld", n);
      for (long long i = 0; i < n; ++i) {
        BlockCoord bc = block_coord(static_cast<int>(i), cdiv(sq, bm), h);
        std::printf(" %d %d %d", bc.q_block, bc.head, bc.batch);
      }
      std::printf("\n");
    } else if (!std::strcmp(cmd, "U")) {  // U n field value ... -> attention_unsupported
      int n;
      std::scanf("%d", &n);
      AttentionParams p = contiguous();
      for (int f = 0; f < n; ++f) {
        char field[32];
        long long value;
        std::scanf("%31s %lld", field, &value);
        std::string s(field);
        if (s == "dtype") p.dtype = static_cast<AttnDType>(value);
        else if (s == "head_dim") p.head_dim = static_cast<int>(value);
        else if (s == "heads_q") p.heads_q = static_cast<int>(value);
        else if (s == "heads_kv") p.heads_kv = static_cast<int>(value);
        else if (s == "batch") p.batch = static_cast<int>(value);
        else if (s == "seq_q") p.seq_q = static_cast<int>(value);
        else if (s == "q") p.q = reinterpret_cast<const void*>(static_cast<uintptr_t>(value));
        else if (s == "q_stride_s") p.q_stride_s = value;
        else if (s == "k_stride_h") p.k_stride_h = value;
        else if (s == "mask_kind") p.mask_kind = static_cast<AttnMaskKind>(value);
        else if (s == "mask") p.mask = reinterpret_cast<const void*>(static_cast<uintptr_t>(value));
        else if (s == "mask_stride_k") p.mask_stride_k = value;
        else { std::printf("bad field %s\n", field); return 1; }
      }
      const char* why = attention_unsupported(p);
      std::printf("%s\n", why ? why : "ok");
    }
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def host_driver(tmp_path_factory):
    """Runs the attention.h driver on a list of command lines, returns its output lines."""
    cxx = shutil.which("g++") or shutil.which("c++")
    include = _cuda_include()
    if cxx is None:
        pytest.skip("no host C++ compiler")
    if include is None:
        pytest.skip("cuda_runtime_api.h not found (attention.h includes it)")
    d = tmp_path_factory.mktemp("attention_host")
    src, exe = d / "driver.cpp", d / "driver"
    src.write_text(_DRIVER)
    proc = subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{include}",
                           f"-I{os.path.dirname(HEADER)}", str(src), "-o", str(exe)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def run(lines):
        out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True,
                             text=True, timeout=300, check=True).stdout
        return out.splitlines()
    return run


SEQS_Q = [1, 2, 7, 63, 64, 65, 130]
SEQS_K = [0, 1, 7, 63, 64, 65, 200]
TILES = [(64, 64), (16, 16), (64, 32), (32, 64)]
GRID = [(sq, sk, bm, bn, c) for sq in SEQS_Q for sk in SEQS_K for bm, bn in TILES
        for c in (False, True)]


def test_tile_schedule_is_the_headers(host_driver):
    """The Python transcription returns what attention.h's key_tiles / key_visible return."""
    out = host_driver([f"T {sq} {sk} {bm} {bn} {int(c)}" for sq, sk, bm, bn, c in GRID])
    for (sq, sk, bm, bn, c), line in zip(GRID, out):
        want = [x for qb in range(model.cdiv(sq, bm))
                for x in model.key_tiles(qb, sq, sk, bm, bn, c)]
        assert [int(x) for x in line.split()] == want, (sq, sk, bm, bn, c)
    vis = [(sq, sk, c) for sq in SEQS_Q for sk in SEQS_K for c in (False, True)]
    out = host_driver([f"V {sq} {sk} {int(c)} {sq + 16} {sk + 16}" for sq, sk, c in vis])
    for (sq, sk, c), line in zip(vis, out):
        want = "".join("1" if model.key_visible(i, j, sq, sk, c) else "0"
                       for i in range(sq + 16) for j in range(sk + 16))
        assert line == want, (sq, sk, c)


def _reference_keep(sq, sk, causal):
    """Which (query, key) pairs the reference attends: q = k = 0, v = identity, so output
    row i is the uniform average over row i's kept keys (0 where it keeps none)."""
    q = torch.zeros(1, 1, sq, sk, dtype=torch.float32)
    v = torch.eye(sk, dtype=torch.float32).reshape(1, 1, sk, sk)
    return (reference.attention(q, q[:, :, :1].expand(1, 1, sk, sk), v, None, causal)[0, 0] > 0
            ).numpy()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tile_schedule_matches_reference_semantics(causal):
    """Visiting key tiles [0, end) with the per-element predicate on tiles >= first_masked
    attends exactly the pairs the reference attends (causal bottom-right, Sq > Sk rows with no
    key, Sk tails), and skips every tile that holds no attended pair of the block."""
    for sq in SEQS_Q:
        for sk in SEQS_K:
            if sk == 0:  # no key at all: every block visits nothing
                assert all(model.key_tiles(qb, sq, 0, bm, bn, causal)[0] == 0
                           for bm, bn in TILES for qb in range(model.cdiv(sq, bm)))
                continue
            ref = _reference_keep(sq, sk, causal)
            for bm, bn in TILES:
                keep = model.schedule_keep(sq, sk, bm, bn, causal)
                assert (keep == ref).all(), (sq, sk, bm, bn, causal)
                for qb in range(model.cdiv(sq, bm)):
                    end, _ = model.key_tiles(qb, sq, sk, bm, bn, causal)
                    block = ref[qb * bm:(qb + 1) * bm]
                    if end > 0:  # the last tile visited is needed by some row of the block
                        assert block[:, (end - 1) * bn:end * bn].any(), (sq, sk, bm, bn, qb)
                    else:
                        assert not block.any(), (sq, sk, bm, bn, qb)


def test_block_coord_covers_every_block_once(host_driver):
    shapes = [(1, 1, 1), (2, 3, 130), (3, 5, 64), (1, 32, 1000)]
    out = host_driver([f"C {b} {h} {sq} {model.BLOCK_M}" for b, h, sq in shapes])
    for (b, h, sq), line in zip(shapes, out):
        vals = [int(x) for x in line.split()]
        n, triples = vals[0], [tuple(vals[i:i + 3]) for i in range(1, len(vals), 3)]
        assert n == model.num_ctas(b, h, sq, model.BLOCK_M) == len(triples)
        qblocks = model.cdiv(sq, model.BLOCK_M)
        assert triples == [model.block_coord(i, qblocks, h) for i in range(n)]
        assert set(triples) == {(qb, hh, bb) for qb in range(qblocks) for hh in range(h)
                                for bb in range(b)}
        assert len(set(triples)) == n


UNSUPPORTED = {  # fields changed from a valid contiguous call -> the reason's start, or "ok"
    "valid": ({}, "ok"),
    "bf16": ({"dtype": 1}, "ok"),
    "d128": ({"head_dim": 128}, "ok"),
    "fp32": ({"dtype": 2}, "dtype"),
    "d80": ({"head_dim": 80}, "head_dim"),
    "gqa_3_of_2": ({"heads_q": 3}, "heads_q must be a multiple"),
    "no_kv_head": ({"heads_kv": 0}, "negative size"),
    "q_misaligned": ({"q": (1 << 20) + 8}, "q, k, v, o must be 16-byte aligned"),
    "q_row_stride_4": ({"q_stride_s": 4}, "batch/head/seq strides"),
    "q_row_stride_4_sq1": ({"q_stride_s": 4, "seq_q": 1}, "ok"),  # unused stride
    "k_head_stride_12": ({"k_stride_h": 12}, "batch/head/seq strides"),
    "huge_row_stride": ({"q_stride_s": (1 << 24) + 8}, "seq strides must be"),
    "keep_mask": ({"mask_kind": 1, "mask": 4096, "mask_stride_k": 1}, "ok"),
    "mask_null": ({"mask_kind": 2}, "mask kind set but mask is null"),
    "mask_key_stride_0": ({"mask_kind": 4, "mask": 4096, "mask_stride_k": 0},
                          "mask key stride must be 1"),
    "mask_kind_9": ({"mask_kind": 9, "mask": 4096}, "unknown mask kind"),
    "grid_too_large": ({"batch": 1 << 20, "heads_q": 1 << 10}, "grid too large"),
}


def test_contract_checks(host_driver):
    lines = [f"U {len(f)} " + " ".join(f"{k} {v}" for k, v in f.items())
             for f, _ in UNSUPPORTED.values()]
    for (name, (_, want)), got in zip(UNSUPPORTED.items(), host_driver(lines)):
        assert got.startswith(want), (name, got)


# ---------------------------------------------------------------------------------------------
# the lane-level dataflow model against the reference

F16, BF16 = torch.float16, torch.bfloat16


def _emu_case(dtype, Sq, Sk, D, causal=False, Hq=1, Hkv=1, B=1, mask=None):
    return dict(dtype=dtype, Sq=Sq, Sk=Sk, D=D, causal=causal, Hq=Hq, Hkv=Hkv, B=B, mask=mask)


EMU_CASES = {
    "sq1_sk1_f16": _emu_case(F16, 1, 1, 64),
    "decode_sq1_sk130_causal_gqa2to1_bf16": _emu_case(BF16, 1, 130, 64, True, Hq=2),
    "sq70_sk130_causal_f16": _emu_case(F16, 70, 130, 64, True),
    "sq130_sk7_causal_rows_without_keys_bf16": _emu_case(BF16, 130, 7, 64, True),
    "sq65_sk65_d128_bf16": _emu_case(BF16, 65, 65, 128),
    "sq64_sk128_causal_d128_f16": _emu_case(F16, 64, 128, 128, True),
    "keypad_b2_causal_sq7_sk100_f16": _emu_case(F16, 7, 100, 64, True, B=2, mask="keypad"),
    "additive_sq33_sk70_bf16": _emu_case(BF16, 33, 70, 64, mask="additive"),
    "bool_row_off_f16": _emu_case(F16, 20, 33, 64, mask="row_off"),
    "finfo_min_row_f16": _emu_case(F16, 9, 40, 64, mask="finfo_min_row"),
    "finfo_min_row_causal_d128_bf16": _emu_case(BF16, 9, 40, 128, True, mask="finfo_min_row"),
    "sk0_zeros_bf16": _emu_case(BF16, 5, 0, 64),
}


def _emu_inputs(c, seed):
    gen = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Sq, Sk, D = c["B"], c["Hq"], c["Hkv"], c["Sq"], c["Sk"], c["D"]
    dtype = c["dtype"]
    q = torch.randn(B, Hq, Sq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=gen).to(dtype)
    mask = None
    if c["mask"] == "keypad":
        lengths = torch.tensor([Sk, 3])[:B]
        mask = (torch.arange(Sk)[None, :] < lengths[:, None]).reshape(B, 1, 1, Sk)
    elif c["mask"] == "additive":
        mask = torch.randn(B, 1, Sq, Sk, generator=gen).to(dtype)
    elif c["mask"] == "row_off":
        mask = torch.rand(B, 1, Sq, Sk, generator=gen) > 0.3
        mask[:, :, 4] = False
    elif c["mask"] == "finfo_min_row":
        mask = torch.zeros(B, 1, Sq, Sk, dtype=dtype)
        mask[:, :, 2] = torch.finfo(dtype).min
    return q, k, v, mask


@pytest.mark.parametrize("name", list(EMU_CASES))
def test_emulated_kernel_matches_reference(name):
    c = EMU_CASES[name]
    q, k, v, mask = _emu_inputs(c, seed=list(EMU_CASES).index(name))
    out = model.emulate_attention(q, k, v, mask, c["causal"])
    ref = reference.attention(q, k, v, mask, c["causal"])
    assert out.dtype == q.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), **tolerances.FLOAT_MATMUL[q.dtype])
    assert not bool(out.isnan().any())
    empty = ref.float().abs().amax(dim=-1) == 0
    assert bool((out.float().abs().amax(dim=-1)[empty] == 0).all())


def _squash(text):
    return re.sub(r"\s+", "", text)


# index formulas the model transcribes, as they must read in attention.cu (whitespace aside)
MIRRORED = [
    "(row * (D / 8) + (chunk ^ (row & 7))) * 16",
    "kChunks = D / 8, kRowsPerPass = kThreads / kChunks",
    "const int row = tid / kChunks, chunk = tid % kChunks",
    "const int r = row + i * kRowsPerPass",
    "swz<D>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4))",
    "swz<D>(n2 * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1))",
    "swz<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, d2 * 2 + (lane >> 4))",
    "mma16816<T>(s[2 * n2], qf, b[0], b[1]); mma16816<T>(s[2 * n2 + 1], qf, b[2], b[3]);",
    "mma16816<T>(acc[2 * d2], a, b[0], b[1]); mma16816<T>(acc[2 * d2 + 1], a, b[2], b[3]);",
    "{Elem<T>::pack(s[2 * kk][0], s[2 * kk][1]), Elem<T>::pack(s[2 * kk][2], s[2 * kk][3]),"
    " Elem<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),"
    " Elem<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])}",
    "const int row_a = row0 + warp * 16 + g;",
    "const int key0 = t * BN + 2 * quad;",
    "const int i = row_a + (e >> 1) * 8; const int j = key0 + n * 8 + (e & 1);",
    "if (has_mask || t >= tiles.first_masked)",
    "const float base = mx == -INFINITY ? 0.f : mx;",
    "const float alpha = ex2((row_max[h] - base) * kLog2e);",
    "row_sum[h] = row_sum[h] * alpha + sum;",
    "const float inv = l == 0.f ? 0.f : 1.f / l;",
    "T* out = o + i * p.o_stride_s + 2 * quad;",
]


def test_model_mirrors_the_kernel_source():
    """The formulas emulate_attention re-enacts are the ones attention.cu contains."""
    with open(CU) as f:
        src = _squash(f.read())
    missing = [m for m in MIRRORED if _squash(m) not in src]
    assert not missing, missing


# ---------------------------------------------------------------------------------------------
# on a CUDA machine with the extension built (skipped here)

def _cuda_op():
    if not torch.cuda.is_available():
        return None
    try:
        importlib.import_module("pysparse._C_cuda")  # registers torch.ops.pysparse_cuda
    except ImportError:
        return None
    return getattr(getattr(torch.ops, "pysparse_cuda", None), "attention", None)


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if _cuda_op() is None:
        return "pysparse._C_cuda with torch.ops.pysparse_cuda.attention is not built"
    if torch.cuda.get_device_capability() < (8, 0):
        return "the kernel needs sm_80+ (mma.sync m16n8k16 bf16, cp.async)"
    return None


CUDA_GRID = [  # (B, Hq, Hkv, Sq, Sk, D, causal, mask kind, layout)
    (1, 1, 1, 1, 1, 64, False, None, "contiguous"),
    (2, 8, 2, 1, 577, 64, True, "keypad", "contiguous"),
    (2, 4, 4, 333, 333, 128, True, None, "contiguous"),
    (1, 4, 1, 130, 7, 64, True, None, "contiguous"),
    (2, 4, 2, 200, 1000, 128, False, "keypad", "q_transposed"),
    (1, 2, 2, 65, 130, 64, False, "additive", "qkv_transposed"),
    (2, 4, 2, 257, 257, 128, True, "additive_f32", "contiguous"),
    (1, 2, 1, 100, 100, 64, False, "row_off", "contiguous"),
]


@pytest.mark.skipif(_cuda_skip_reason() is not None, reason=str(_cuda_skip_reason()))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", CUDA_GRID, ids=[
    f"b{c[0]}h{c[1]}to{c[2]}-sq{c[3]}-sk{c[4]}-d{c[5]}-{'causal' if c[6] else 'full'}-"
    f"{c[7] or 'nomask'}-{c[8]}" for c in CUDA_GRID])
def test_cuda_kernel_matches_reference(dtype, case):
    B, Hq, Hkv, Sq, Sk, D, causal, mask_kind, layout = case
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    if layout == "contiguous":
        q, k, v = rand(B, Hq, Sq, D), rand(B, Hkv, Sk, D), rand(B, Hkv, Sk, D)
    elif layout == "q_transposed":
        q = rand(B, Sq, Hq, D).transpose(1, 2)
        k, v = rand(B, Hkv, Sk, D), rand(B, Hkv, Sk, D)
    else:
        q = rand(B, Sq, Hq, D).transpose(1, 2)
        k, v = rand(B, Sk, Hkv, D).transpose(1, 2), rand(B, Sk, Hkv, D).transpose(1, 2)
    mask = None
    if mask_kind == "keypad":
        lengths = torch.tensor([Sk, max(1, Sk // 3)][:B], device="cuda")
        mask = (torch.arange(Sk, device="cuda")[None, :] < lengths[:, None]).reshape(B, 1, 1, Sk)
    elif mask_kind == "additive":
        mask = rand(B, 1, Sq, Sk)
    elif mask_kind == "additive_f32":
        mask = torch.randn(B, Hq, Sq, Sk, device="cuda", generator=gen)
    elif mask_kind == "row_off":
        mask = torch.rand(B, 1, Sq, Sk, device="cuda", generator=gen) > 0.3
        mask[:, :, 5] = False
    scale = 0.3 if mask_kind == "additive" else None
    out = _cuda_op()(q, k, v, mask, causal, scale)
    ref = reference.attention(q, k, v, mask, causal, scale)
    assert out.dtype == dtype and out.shape == (B, Hq, Sq, D)
    torch.testing.assert_close(out.float(), ref.float(), **tolerances.FLOAT_MATMUL[dtype])
    assert not bool(out.isnan().any())
    empty = ref.float().abs().amax(dim=-1) == 0
    assert bool((out.float().abs().amax(dim=-1)[empty] == 0).all())
    if mask_kind is None and not causal:  # the default scale is 1/sqrt(D)
        explicit = _cuda_op()(q, k, v, None, False, 1 / math.sqrt(D))
        torch.testing.assert_close(out, explicit, rtol=0, atol=0)
