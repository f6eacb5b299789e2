"""The Triton flash-attention kernel (kernels/attention.py), verified without a GPU.

* interpret: numerics under TRITON_INTERPRET=1 on CPU tensors against the reference, on a
  grid of edge cases. The interpreter is chosen when ``@triton.jit`` decorates, i.e. at import,
  so the whole grid runs in one subprocess (this file run as a script); pytest reports one
  result per case from it.
* gpu_static: the kernel compiled by ptxas for sm_80 and sm_90; the SASS must contain the
  tensor-core MMA meant and no local-memory spills. Registers and shared memory are logged
  (``pytest -m gpu_static -o log_cli=true --log-cli-level=INFO``).
* the backend reports itself unusable here, and importing it never raises.
* on a CUDA machine: the op through the dispatcher, and opcheck.
"""
import importlib.util
import json
import logging
import math
import re
import subprocess
import sys

import pytest
import torch

from pysparse.ops import reference
from pysparse.testing import interpret, tolerances, triton_static

HAS_TRITON = importlib.util.find_spec("triton") is not None
LOG = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# the interpret grid: name -> case. Tiles of 16 x 16 (the smallest MMA) make 33- and 64-long
# sequences span several query blocks and key tiles, so the interior / boundary loop split,
# the diagonal and the Sk tail are all exercised on small shapes; "tiles": None uses the
# launcher's own pick_config.

F32, F16, BF16 = "float32", "float16", "bfloat16"


def _case(dtype, Sq, Sk, D, causal=False, Hq=2, Hkv=2, B=1, mask=None, layout="contiguous",
          scale=None, tiles=(16, 16)):
    return dict(dtype=dtype, B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, causal=causal, mask=mask,
                layout=layout, scale=scale, tiles=tiles)


CASES = {
    # sequence lengths {1, 7, 33, 64}, Sq != Sk both ways, causal bottom-right
    "decode_sq1_sk64_causal_gqa4to1_f16": _case(F16, 1, 64, 64, True, Hq=4, Hkv=1),
    "sq1_sk1_f32": _case(F32, 1, 1, 32),
    "sq7_sk33_causal_bf16": _case(BF16, 7, 33, 32, True),
    "sq33_sk7_causal_rows_without_keys_f32": _case(F32, 33, 7, 80, True),
    "sq7_sk1_causal_bf16": _case(BF16, 7, 1, 64, True),
    "sq33_sk33_causal_gqa4to2_d80_f16": _case(F16, 33, 33, 80, True, Hq=4, Hkv=2),
    "sq64_sk64_gqa4to2_bf16": _case(BF16, 64, 64, 64, Hq=4, Hkv=2),
    "sq64_sk64_causal_f32": _case(F32, 64, 64, 64, True),
    "sq64_sk33_causal_f16": _case(F16, 64, 33, 32, True),
    "sq33_sk64_gqa4to1_d80_bf16": _case(BF16, 33, 64, 80, Hq=4, Hkv=1),
    # masks: bool key padding [B,1,1,Sk], additive [B,1,Sq,Sk], 2-D, fully masked rows
    "keypad_b2_sq33_sk64_f16": _case(F16, 33, 64, 32, B=2, mask="keypad"),
    "keypad_causal_sq7_sk64_gqa4to1_bf16": _case(BF16, 7, 64, 64, True, Hq=4, Hkv=1,
                                                 mask="keypad"),
    "leftpad_causal_b2_sq33_sk64_f16": _case(F16, 33, 64, 32, True, B=2, mask="leftpad"),
    "decode_keypad_b2_sq1_sk33_default_tiles_bf16": _case(BF16, 1, 33, 64, True, B=2,
                                                          mask="keypad", tiles=None),
    "additive_per_head_gqa4to2_f32": _case(F32, 7, 33, 32, Hq=4, Hkv=2, mask="additive_heads"),
    "additive_sq33_sk33_d80_f32": _case(F32, 33, 33, 80, B=2, mask="additive"),
    "additive_causal_sq64_sk33_f16": _case(F16, 64, 33, 64, True, mask="additive"),
    "additive_f32_mask_on_bf16_q": _case(BF16, 33, 64, 32, mask="additive_f32"),
    "bool_2d_mask_sq33_sk64_f32": _case(F32, 33, 64, 32, mask="bool_2d"),
    "bool_full_masked_row_f16": _case(F16, 33, 33, 64, mask="bool_row_off"),
    "additive_neg_inf_row_causal_bf16": _case(BF16, 33, 64, 32, True, mask="neg_inf_row"),
    "additive_finfo_min_row_f32": _case(F32, 7, 33, 32, mask="finfo_min_row"),
    # layouts: q as a transpose view of [B, S, H, D]; q/k/v all transposed; D stride 2
    "q_transposed_causal_f16": _case(F16, 33, 33, 64, True, layout="q_transposed"),
    "qkv_transposed_gqa4to2_bf16": _case(BF16, 33, 64, 32, Hq=4, Hkv=2,
                                         layout="qkv_transposed"),
    "k_strided_d_f32": _case(F32, 33, 33, 32, layout="k_strided_d"),
    # scale, the launcher's own tiles, degenerate sizes
    "explicit_scale_f16": _case(F16, 33, 64, 64, scale=0.3),
    "default_tiles_sq64_sk64_causal_keypad_bf16": _case(BF16, 64, 64, 64, True,
                                                        mask="keypad", tiles=None),
    "default_tiles_sq33_sk64_d80_additive_f16": _case(F16, 33, 64, 80, mask="additive",
                                                      tiles=None),
    "sk0_gives_zeros_f32": _case(F32, 7, 0, 32),
    "through_op_attention_triton_f16": _case(F16, 7, 33, 32, True, Hq=4, Hkv=2,
                                             mask="keypad", layout="via_op"),
}


def _mask(kind, B, Hq, Sq, Sk, dtype, gen):
    if kind is None:
        return None
    if kind == "keypad":  # per-batch valid lengths, never 0
        lengths = torch.randint(1, Sk + 1, (B,), generator=gen)
        return (torch.arange(Sk)[None, :] < lengths[:, None]).reshape(B, 1, 1, Sk)
    if kind == "leftpad":  # left padding: whole leading key tiles masked, later ones not
        pad = torch.tensor([40, 3][:B])
        return (torch.arange(Sk)[None, :] >= pad[:, None]).reshape(B, 1, 1, Sk)
    if kind in ("additive", "additive_f32"):
        dt = torch.float32 if kind == "additive_f32" else dtype
        return torch.randn(B, 1, Sq, Sk, generator=gen).to(dt)
    if kind == "additive_heads":  # one mask per query head (indexed by h, not h // group)
        return torch.randn(B, Hq, Sq, Sk, generator=gen).to(dtype)
    if kind == "bool_2d":
        m = torch.rand(Sq, Sk, generator=gen) > 0.3
        m[:, 0] = True
        return m
    if kind == "bool_row_off":
        m = torch.rand(B, 1, Sq, Sk, generator=gen) > 0.3
        m[:, :, 5] = False
        return m
    if kind == "neg_inf_row":
        m = torch.randn(B, 1, Sq, Sk, generator=gen).to(dtype)
        m[:, :, 3] = float("-inf")
        return m
    if kind == "finfo_min_row":  # a row entirely at finfo.min averages v, it is not empty
        m = torch.zeros(B, 1, Sq, Sk, dtype=dtype)
        m[:, :, 2] = torch.finfo(dtype).min
        return m
    raise ValueError(kind)


def _inputs(c, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, c["dtype"])
    B, Hq, Hkv, Sq, Sk, D = c["B"], c["Hq"], c["Hkv"], c["Sq"], c["Sk"], c["D"]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    if c["layout"] == "q_transposed":
        q = rand(B, Sq, Hq, D).transpose(1, 2)
        k, v = rand(B, Hkv, Sk, D), rand(B, Hkv, Sk, D)
    elif c["layout"] == "qkv_transposed":
        q = rand(B, Sq, Hq, D).transpose(1, 2)
        k, v = rand(B, Sk, Hkv, D).transpose(1, 2), rand(B, Sk, Hkv, D).transpose(1, 2)
    elif c["layout"] == "k_strided_d":
        q, v = rand(B, Hq, Sq, D), rand(B, Hkv, Sk, D)
        k = rand(B, Hkv, Sk, 2 * D)[..., ::2]
    else:
        q, k, v = rand(B, Hq, Sq, D), rand(B, Hkv, Sk, D), rand(B, Hkv, Sk, D)
    return q, k, v, _mask(c["mask"], B, Hq, Sq, Sk, dtype, gen)


def _check_case(c, seed):
    """Run one case through the kernel (in this process: interpreter mode); raise on mismatch."""
    from pysparse.kernels.attention import Config, attention_fwd

    q, k, v, mask = _inputs(c, seed)
    if c["layout"] in ("q_transposed", "qkv_transposed"):
        assert not q.is_contiguous() and q.stride(-1) == 1
    if c["layout"] == "k_strided_d":
        assert k.stride(-1) == 2
    if c["layout"] == "via_op":
        out = torch.ops.pysparse.attention_triton(q, k, v, mask, c["causal"], c["scale"])
        # fake-tensor and AOT checks cannot run the interpreter: they run on CUDA only
        torch.library.opcheck(torch.ops.pysparse.attention_triton.default,
                              (q, k, v, mask, c["causal"], c["scale"]),
                              test_utils=("test_schema",))
    else:
        cfg = None if c["tiles"] is None else Config(*c["tiles"], num_warps=4, num_stages=1)
        out = attention_fwd(q, k, v, mask, c["causal"], c["scale"], config=cfg)
    ref = reference.attention(q, k, v, mask, c["causal"], c["scale"])
    assert out.dtype == q.dtype and out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out.float(), ref.float(), **tolerances.FLOAT_MATMUL[q.dtype])
    # rows with nothing to attend are exactly 0 (no NaN from 0/0)
    empty = ref.float().abs().amax(dim=-1) == 0
    assert bool((out.float().abs().amax(dim=-1)[empty] == 0).all())
    assert not bool(out.isnan().any())


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

_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# (dtype, head_dim, causal, mask kind, Sq): what real models run. Sq = 4096 is a prefill
# (BLOCK_M = 128); Sq = 1 a decoding step (BLOCK_M = 16).
BUILDS = [
    (torch.float16, 64, True, "none", 4096),
    (torch.bfloat16, 64, False, "keypad", 4096),
    (torch.bfloat16, 128, True, "additive", 4096),
    (torch.float16, 64, True, "keypad", 1),
]


def _signature(kernel, elem, mask_kind):
    """Argument types as Triton's launcher would specialise them for aligned tensors."""
    sig, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in ("Q", "K", "V", "Out"):
            sig[p.name] = "*" + elem
        elif p.name == "Mask":
            sig[p.name] = {"none": "*" + elem, "keypad": "*i8", "additive": "*" + elem}[mask_kind]
        elif p.name == "sm_scale":
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
        # 16-byte aligned pointers and strides divisible by 16 elements, the common case the
        # launcher specialises on at run time (what lets loads vectorise and use cp.async)
        if sig[p.name].startswith("*") or p.name.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _build(arch, dtype, head_dim, causal, mask_kind, seq_q):
    import triton
    from triton.backends.compiler import GPUTarget

    from pysparse.kernels import attention as attn

    kind = {"none": attn.NO_MASK, "keypad": attn.KEEP_MASK, "additive": attn.ADDITIVE_MASK}
    bcast = mask_kind == "keypad"
    cfg = attn.pick_config(head_dim, seq_q, 4096, dtype, arch,
                           full_mask=mask_kind == "additive")
    meta = attn.constexprs(head_dim, dtype, causal, kind[mask_kind], bcast, True, cfg)
    sig, attrs = _signature(attn._attn_fwd_kernel, _TORCH_TO_TRITON[dtype], mask_kind)
    src = triton.compiler.ASTSource(fn=attn._attn_fwd_kernel, signature=sig, constexprs=meta,
                                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                           enable_fp_fusion=True))
    return cfg, compiled


@pytest.mark.gpu_static
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype,head_dim,causal,mask_kind,seq_q", BUILDS,
                         ids=[f"{_TORCH_TO_TRITON[b[0]]}-d{b[1]}-{'causal' if b[2] else 'full'}"
                              f"-{b[3]}-sq{b[4]}" for b in BUILDS])
def test_build_uses_tensor_cores_without_spills(arch, dtype, head_dim, causal, mask_kind, seq_q,
                                               record_property):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if triton_static.tool("cuobjdump") is None:
        pytest.skip("cuobjdump not found (neither in Triton's wheel nor TRITON_CUOBJDUMP_PATH)")
    ptxas = "ptxas" if arch < 90 else "ptxas_blackwell"  # Triton's choice for sm_90+
    if triton_static.tool(ptxas) is None:
        pytest.skip(f"{ptxas} not found (neither in Triton's wheel nor TRITON_*_PATH)")

    cfg, compiled = _build(arch, dtype, head_dim, causal, mask_kind, seq_q)
    cubin = compiled.asm["cubin"]
    sass = triton_static.cuobjdump("--dump-sass", cubin)
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", triton_static.cuobjdump("--dump-resource-usage",
                                                                            cubin)))
    opcodes = set(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)",
                             sass, re.M))
    mma = sorted(o for o in opcodes if o.startswith(("HMMA", "HGMMA")))
    info = dict(arch=f"sm_{arch}", dtype=str(dtype).replace("torch.", ""), head_dim=head_dim,
                causal=causal, mask=mask_kind, block_m=cfg.block_m, block_n=cfg.block_n,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, regs=int(usage["REG"]),
                stack_bytes=int(usage["STACK"]), local_bytes=int(usage["LOCAL"]),
                dynamic_smem_bytes=compiled.metadata.shared,
                static_smem_bytes=int(usage["SHARED"]), mma=mma)
    record_property("resources", json.dumps(info))
    LOG.info("attention kernel build: %s", json.dumps(info))

    # sm_80: mma.sync -> HMMA.16816.F32{,.BF16}. sm_90: Triton emits wgmma (HGMMA) when a
    # warpgroup (4 warps) has >= 64 rows, i.e. BLOCK_M >= 64; the 16-row decoding tile stays
    # on mma.sync (HMMA), which sm_90 also runs on its tensor cores.
    want = "HGMMA" if arch >= 90 and cfg.block_m >= 64 else "HMMA"
    assert any(o.startswith(want + ".") for o in mma), f"no {want} in SASS; MMA opcodes: {mma}"
    # no register spills: no local-memory traffic and no stack frame
    assert not opcodes & {"STL", "LDL", "STL.64", "LDL.64", "STL.128", "LDL.128"}, opcodes
    assert info["stack_bytes"] == 0 and info["local_bytes"] == 0, info
    limit = 163 * 1024 if arch == 80 else 227 * 1024  # max shared memory per block
    assert info["dynamic_smem_bytes"] + info["static_smem_bytes"] <= limit, info


# ---------------------------------------------------------------------------------------------
# the backend on this machine


def test_backend_status_and_import_are_safe():
    from pysparse.ops.backends import availability
    from pysparse.ops.backends import triton as triton_backend

    ok, why = triton_backend.status()
    assert isinstance(ok, bool) and isinstance(why, str) and why
    assert availability()["triton"] == (ok, why)
    if not torch.cuda.is_available():
        assert not ok and "CUDA" in why
    # the registration does not change the CPU path
    q = torch.randn(1, 2, 5, 32)
    torch.testing.assert_close(torch.ops.pysparse.attention(q, q, q, None, True, None),
                               reference.attention(q, q, q, None, True, None))


def test_backend_import_without_triton():
    """With triton unimportable, the backend module imports, says why, and registers nothing."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import pysparse\n"
            "from pysparse.ops.backends import triton as t, availability\n"
            "ok, why = t.status()\n"
            "assert not ok and 'triton is not importable' in why, why\n"
            "assert availability()['triton'] == (ok, why)\n"
            "assert not t.register()\n"
            "assert not hasattr(__import__('torch').ops.pysparse, 'attention_triton')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_launcher_rejects_bad_arguments():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from pysparse.kernels.attention import attention_fwd

    q = torch.randn(1, 4, 8, 32, dtype=torch.float16)
    kv = torch.randn(1, 3, 8, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        attention_fwd(q, kv, kv)
    with pytest.raises(ValueError, match="dtype"):
        attention_fwd(q, q.float(), q.float())
    with pytest.raises(ValueError, match="does not broadcast"):
        attention_fwd(q, q, q, torch.ones(2, 1, 8, 8, dtype=torch.bool))
    big = torch.randn(1, 1, 4, 256, dtype=torch.float16)
    with pytest.raises(ValueError, match="head_dim <= 128"):
        attention_fwd(big, big, big)


# ---------------------------------------------------------------------------------------------
# on a CUDA machine (skipped here): the real kernel through the dispatcher


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("Sq,Sk,D", [(1, 577, 64), (333, 333, 80), (1000, 1000, 128)])
def test_cuda_op_matches_reference(dtype, Sq, Sk, D):
    from pysparse.ops.backends import triton as triton_backend
    ok, why = triton_backend.status()
    if not ok:
        pytest.skip(why)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, Sq, D, device="cuda", generator=gen).to(dtype)
    k = torch.randn(2, 2, Sk, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(2, 2, Sk, D, device="cuda", generator=gen).to(dtype)
    keep = torch.arange(Sk, device="cuda")[None, None, None, :] < torch.tensor(
        [Sk, max(1, Sk // 3)], device="cuda").reshape(2, 1, 1, 1)
    out = torch.ops.pysparse.attention(q, k, v, keep, True, None)
    torch.testing.assert_close(out.float(),
                               reference.attention(q, k, v, keep, True, None).float(),
                               **tolerances.FLOAT_MATMUL[dtype])
    torch.library.opcheck(torch.ops.pysparse.attention_triton.default,
                          (q, k, v, keep, True, 1 / math.sqrt(D)))


if __name__ == "__main__":
    interpret.run_grid(CASES, _check_case, sys.argv[1])
