"""GPU kernels against their peers, in one process, and the roofline they are held to.

Ops: int8_linear (W8A8), sparse24_linear (2:4 fp16/bf16), sparse24_int8_linear (2:4 + W8A8),
attention (flash, forward). Each runs on every GPU backend asked for (`PYSPARSE_BACKEND` is set
per call, so the dispatcher takes exactly that backend). Peers measured in the same run:
cuBLAS `F.linear` in the layer's float dtype, `torch._int_mm` (bare, and with the same
per-token quantization + epilogue done in torch), `to_sparse_semi_structured` + `F.linear`,
`F.scaled_dot_product_attention`. Timing: `triton.testing.do_bench` (L2 flushed before every
call, so weights stream from HBM as a 7B model's layers do), median and p10-p90.
The numerics check is also the warm-up: the CUDA backend re-packs 2:4 metadata into
mma.sp order on the first call and caches it, as a module holding the weight would.

    python bench/bench_gpu.py --roofline             # the predicted tables (no GPU needed)
    python bench/bench_gpu.py                        # everything, on a GPU
    python bench/bench_gpu.py --ops int8 --m 1,16 --backends cuda --md out.md --json out.json

Before timing, every (op, shape, backend) is checked once against `pysparse.ops.reference`
(SQNR floor below); a mismatch stops the run. "x floor" = median / the floor measured on this
GPU: max(bytes / copy bandwidth, ops / tensor peak), peaks measured here with cuBLAS (fp16/bf16)
and torch._int_mm (int8) on 8192^3; 2:4 math is credited with twice the measured dense peak.
"""
import argparse
import importlib
import json
import os
import sys

import torch

# ---------------------------------------------------------------------------------------------
# Shapes. Linear: name -> (N, K) of y = x @ W^T, W [N, K]. Attention: (heads, head_dim, causal).
LINEAR_SHAPES = {
    "llama7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096),
                "down": (4096, 11008)},
    "bert": {"qkv": (2304, 768), "o": (768, 768), "ffn_up": (3072, 768), "ffn_down": (768, 3072)},
}
ATTN_SHAPES = {"llama7b": (32, 128, True), "bert": (12, 64, False)}
ATTN_GRID = {"llama7b": [(1, 512), (1, 2048), (16, 512), (16, 2048)],  # (batch, seq)
             "bert": [(1, 128), (1, 512), (32, 128), (32, 512)]}
OPS = ("int8", "sparse24", "sparse24_int8", "attention")
OP_NAMES = {"int8": "int8_linear", "sparse24": "sparse24_linear",
            "sparse24_int8": "sparse24_int8_linear", "attention": "attention"}
GPU_BACKENDS = ("triton", "cuda")

# ---------------------------------------------------------------------------------------------
# Roofline. Datasheet peaks (dense; "sparse" = 2:4 on sparse tensor cores, quoted by NVIDIA as
# dense-equivalent ops): NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB) and NVIDIA H100
# Tensor Core GPU datasheet (SXM5), whose "with sparsity" figures are halved here for dense.
# mufu: exp2 per second (16 per SM per clock: A100 108 SMs x 1.41 GHz, H100 132 SMs x 1.83 GHz).
GPUS = {
    "A100-SXM4-80GB": dict(hbm_gbs=2039.0, fp16=312.0, fp16_sparse=624.0, int8=624.0,
                           int8_sparse=1248.0, mufu=108 * 16 * 1.41e9, sm=80),
    "H100-SXM5-80GB": dict(hbm_gbs=3350.0, fp16=989.4, fp16_sparse=1978.9, int8=1978.9,
                           int8_sparse=3957.8, mufu=132 * 16 * 1.83e9, sm=90),
}
# Sustained fractions (assumptions, stated in docs/GPU.md): a streaming kernel reaches ~85% of
# HBM peak; a tuned tensor-core GEMM ~75% of the datasheet peak. On sm_90 the full rate needs
# wgmma; kernels built from Ampere-style mma.sync (our CUDA C++ kernels, FlashAttention-2 in
# torch's SDPA) top out near 63% of peak (Hazy Research, "GPUs Go Brrr", 2024).
HBM_EFF = 0.85
TC_EFF = 0.75
MMA_SYNC_SM90_EFF = 0.63
INT_MM_MIN_M = 32  # torch._int_mm on CUDA needs more than 16 rows: the peer pads M to 32

# implementation -> (bytes model, math kind, instruction family)
#   math kind picks the peak; "mma.sync" is derated on sm_90, "wgmma" (cuBLAS, cuSPARSELt,
#   Triton's tl.dot on sm_90) is not.
LINEAR_IMPLS = {
    "int8": {"triton": ("int8", "int8", "wgmma"), "cuda": ("int8", "int8", "mma.sync")},
    "sparse24": {"triton": ("sparse24", "fp16", "wgmma"),        # expand in registers, dense dot
                 "cuda": ("sparse24", "fp16_sparse", "mma.sync")},  # mma.sp: half the math
    "sparse24_int8": {"triton": ("sparse24_int8", "int8", "wgmma"),
                      "cuda": ("sparse24_int8", "int8_sparse", "mma.sync")},
}
PEERS = {  # name -> (bytes model, math kind, family)
    "cublas": ("fp16", "fp16", "wgmma"),
    "int_mm": ("int_mm", "int8", "wgmma"),
    "semi_structured": ("sparse24", "fp16_sparse", "wgmma"),
}
OP_PEER = {"int8": "int_mm", "sparse24": "semi_structured", "sparse24_int8": "int_mm"}
PEER_LABEL = {"cublas": "cuBLAS fp16", "int_mm": "torch._int_mm",
              "semi_structured": "2:4 semi-structured"}


def linear_bytes(model, M, N, K, act=2):
    """Bytes that must move for y[M, N] = x[M, K] @ W^T: weights + metadata + scales + x + y.
    act: bytes per activation element (fp16/bf16 = 2)."""
    xy = act * M * K + act * M * N
    # W8A8 kernels here quantize x in a first launch (reads x, writes int8 x + fp32 scales) and
    # the GEMM reads the int8 x (re-reads by other N tiles come from L2)
    quant = 2 * M * K + 4 * M
    if model == "fp16":
        return 2 * N * K + xy
    if model == "int_mm":  # int8 x in, int32 y out, M padded
        Mp = max(M, INT_MM_MIN_M)
        return N * K + Mp * K + 4 * Mp * N
    if model == "int8":  # int8 weight + fp32 per-channel scale; x in and y out in fp16
        return N * K + 4 * N + xy + quant
    if model == "sparse24":  # values [N, K/2] fp16 + 4-bit code per group of 4
        return N * K + N * K // 8 + xy
    if model == "sparse24_int8":
        return N * K // 2 + N * K // 8 + 4 * N + xy + quant
    raise ValueError(model)


def _eff(gpu, family):
    return MMA_SYNC_SM90_EFF if family == "mma.sync" and gpu["sm"] >= 90 else TC_EFF


def predict(nbytes, ops, gpu, kind, family, extra_s=0.0):
    """Roofline time at sustained rates: max(bytes / (85% HBM), ops / (eff x peak) + extra)."""
    t_mem = nbytes / (gpu["hbm_gbs"] * 1e9 * HBM_EFF)
    t_math = ops / (gpu[kind] * 1e12 * _eff(gpu, family)) + extra_s
    return dict(bytes=nbytes, ops=ops, t_mem_us=t_mem * 1e6, t_math_us=t_math * 1e6,
                us=max(t_mem, t_math) * 1e6, bound="mem" if t_mem >= t_math else "math")


def linear_model(impl, M, N, K, gpu_name, op=None):
    """Predicted cost of one linear implementation: impl is a backend ("triton"/"cuda", with op)
    or a peer name ("cublas", "int_mm", "semi_structured")."""
    model, kind, family = LINEAR_IMPLS[op][impl] if op else PEERS[impl]
    Mp = max(M, INT_MM_MIN_M) if model == "int_mm" else M
    return predict(linear_bytes(model, M, N, K), 2.0 * Mp * N * K, GPUS[gpu_name], kind, family)


def attention_model(impl, B, H, S, D, causal, gpu_name):
    """Flash-attention forward: bytes of q, k, v, o in fp16; 4 B H S^2 D FLOPs (/2 causal);
    the softmax's B H S^2 exp2 (/2 causal) on the MUFU, not overlapped with the MMAs (as in
    FlashAttention-2-style kernels). impl: "triton" (tl.dot: wgmma on sm_90), "cuda" and
    "sdpa" (mma.sync)."""
    gpu = GPUS[gpu_name]
    frac = 0.5 if causal else 1.0
    family = "wgmma" if impl == "triton" else "mma.sync"
    exp_s = B * H * S * S * frac / gpu["mufu"]
    return predict(8 * B * H * S * D, 4.0 * B * H * S * S * D * frac, gpu, "fp16", family, exp_s)


def _fmt_us(us):
    return f"{us:.1f}" if us < 1000 else f"{us:.0f}"


def roofline_markdown(shapes="llama7b", ms=(1, 16, 256), ops=OPS):
    """The predicted tables of docs/GPU.md, as Markdown."""
    out = ["Peaks used (datasheet; sustained = "
           f"{HBM_EFF:.0%} of HBM, {TC_EFF:.0%} of tensor peak, "
           f"{MMA_SYNC_SM90_EFF:.0%} for mma.sync on sm_90):", "",
           "| GPU | HBM GB/s | fp16/bf16 TFLOPS dense / 2:4 | int8 TOPS dense / 2:4 |",
           "| --- | ---: | ---: | ---: |"]
    for name, g in GPUS.items():
        out.append(f"| {name} | {g['hbm_gbs']:.0f} | {g['fp16']:.1f} / {g['fp16_sparse']:.1f} "
                   f"| {g['int8']:.1f} / {g['int8_sparse']:.1f} |")
    out.append("")
    for op in ops:
        if op == "attention":
            continue
        peer = OP_PEER[op]
        for gname in GPUS:
            out += [f"#### {OP_NAMES[op]} on {gname} ({shapes}, fp16 activations)", "",
                    f"| shape N×K | M | MB moved | GOP | ops/B | bound T/C | Triton µs | CUDA µs "
                    f"| cuBLAS fp16 µs | {PEER_LABEL[peer]} µs | × fp16 T/C | × {PEER_LABEL[peer]} T/C |",
                    "| --- | ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for sname, (N, K) in LINEAR_SHAPES[shapes].items():
                for M in ms:
                    t = linear_model("triton", M, N, K, gname, op)
                    c = linear_model("cuda", M, N, K, gname, op)
                    f = linear_model("cublas", M, N, K, gname)
                    p = linear_model(peer, M, N, K, gname)
                    out.append(
                        f"| {sname} {N}×{K} | {M} | {t['bytes'] / 1e6:.1f} | {t['ops'] / 1e9:.2f} "
                        f"| {t['ops'] / t['bytes']:.1f} | {t['bound']}/{c['bound']} "
                        f"| {_fmt_us(t['us'])} | {_fmt_us(c['us'])} | {_fmt_us(f['us'])} "
                        f"| {_fmt_us(p['us'])} | {f['us'] / t['us']:.2f} / {f['us'] / c['us']:.2f} "
                        f"| {p['us'] / t['us']:.2f} / {p['us'] / c['us']:.2f} |")
            out.append("")
    if "attention" in ops:
        H, D, causal = ATTN_SHAPES[shapes]
        out += [f"#### attention forward ({shapes}: {H} heads × {D}, "
                f"{'causal' if causal else 'not causal'}, fp16)", "",
                "| GPU | batch | seq | MB moved | GFLOP | FLOP/B | bound | Triton µs | CUDA µs "
                "| SDPA µs | × SDPA T/C |",
                "| --- | ---: | ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: | ---: |"]
        for gname in GPUS:
            for B, S in ATTN_GRID[shapes]:
                t, c, s = (attention_model(i, B, H, S, D, causal, gname)
                           for i in ("triton", "cuda", "sdpa"))
                out.append(f"| {gname} | {B} | {S} | {t['bytes'] / 1e6:.1f} | {t['ops'] / 1e9:.1f} "
                           f"| {t['ops'] / t['bytes']:.0f} | {t['bound']} | {_fmt_us(t['us'])} "
                           f"| {_fmt_us(c['us'])} | {_fmt_us(s['us'])} "
                           f"| {s['us'] / t['us']:.2f} / {s['us'] / c['us']:.2f} |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Measurement (CUDA only; everything below imports triton / pysparse lazily)
DEVICE = "cuda"  # tests point this at "cpu" to run the plumbing without a GPU
NUMERICS_SQNR_DB = 40.0  # a kernel that computes the op is > 60 dB from the reference; a wrong
#                          layout or metadata order is ~0 dB


def _do_bench(fn, cudagraph):
    import triton.testing as tt
    q = [0.5, 0.1, 0.9]
    if cudagraph:
        return tt.do_bench_cudagraph(fn, quantiles=q)
    return tt.do_bench(fn, quantiles=q)


def measured_floors(dtype, cudagraph=False):
    """(copy GB/s, {kind: peak ops/s}) measured on this GPU."""
    n = 256 << 20
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = _do_bench(lambda: dst.copy_(src), cudagraph)[0]
    bw = 2 * n / (ms * 1e-3)
    S = 8192
    a = torch.randn(S, S, device=DEVICE, dtype=dtype)
    b = torch.randn(S, S, device=DEVICE, dtype=dtype)
    ms = _do_bench(lambda: a @ b, cudagraph)[0]
    fp = 2.0 * S ** 3 / (ms * 1e-3)
    ai = torch.randint(-127, 128, (S, S), device=DEVICE, dtype=torch.int8)
    bi = torch.randint(-127, 128, (S, S), device=DEVICE, dtype=torch.int8).t()
    ms = _do_bench(lambda: torch._int_mm(ai, bi), cudagraph)[0]
    i8 = 2.0 * S ** 3 / (ms * 1e-3)
    return bw, {"fp16": fp, "fp16_sparse": 2 * fp, "int8": i8, "int8_sparse": 2 * i8}


def _forced(backend, fn):
    def run():
        old = os.environ.get("PYSPARSE_BACKEND")
        os.environ["PYSPARSE_BACKEND"] = backend
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["PYSPARSE_BACKEND"]
            else:
                os.environ["PYSPARSE_BACKEND"] = old
    return run


def backend_status(backend, op):
    """(usable, reason) for running pysparse::<op> on CUDA tensors with ``backend``."""
    from pysparse.ops import backends
    ok, why = backends.availability()[backend]
    if not ok:
        return False, why
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pysparse::{op}", "CUDA"):
        return False, f"no CUDA kernel registered for pysparse::{op} (it would run the reference)"
    return True, why


def check_numerics(name, out, ref):
    from pysparse.testing.tolerances import sqnr_db
    db = sqnr_db(ref.float(), out.float())
    if not db >= NUMERICS_SQNR_DB:
        raise SystemExit(f"bench_gpu: NUMERICS MISMATCH in {name}: SQNR {db:.1f} dB against "
                         f"pysparse.ops.reference (floor {NUMERICS_SQNR_DB} dB); not timing a "
                         "kernel that computes something else")
    return db


def _torch_quant(x):
    """The per-token quantization of the reference, in torch ops (the _int_mm peer's prologue)."""
    xf = x.float()
    xs = xf.abs().amax(dim=-1).clamp_min(1e-12) / 127
    return torch.round(xf / xs[:, None]).clamp_(-127, 127).to(torch.int8), xs


def linear_cases(op, N, K, dtype):
    """(call(x), ref(x), peers) for one weight: call runs pysparse::<op> (the backend is picked
    by PYSPARSE_BACKEND), ref the reference; peers maps name -> (make(x) -> timed callable,
    bytes model, math kind). Weights are built with pysparse.formats, as the modules do."""
    import torch.nn.functional as F

    from pysparse.formats import int8 as f_int8
    from pysparse.formats import sparse24 as f_sp24
    from pysparse.ops import reference

    torch.manual_seed(0)
    w = (torch.randn(N, K, device=DEVICE) / K ** 0.5).to(dtype)
    peers = {"cublas": (lambda x: lambda: F.linear(x, w), "fp16", "fp16")}
    if op == "int8":
        q, s = f_int8.quantize_weight(w)
        args = (q, s, None)
    else:
        w = w * f_sp24.mask_24(w)
        if op == "sparse24":
            args = (*f_sp24.compress(w), None)
            try:
                from torch.sparse import to_sparse_semi_structured
                ws = to_sparse_semi_structured(w)
                peers["semi_structured"] = (lambda x: lambda: F.linear(x, ws), "sparse24",
                                            "fp16_sparse")
            except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported
                print(f"# 2:4 semi-structured peer unavailable: {type(exc).__name__}: {exc}")
        else:
            q, s = f_int8.quantize_weight(w)
            args = (*f_sp24.compress(q), s, None)
    if op in ("int8", "sparse24_int8"):
        qd, sd = f_int8.quantize_weight(w)  # dense int8 weight (2:4-masked for sparse24_int8)
        qt = qd.t()

        def padded(xq):
            M = xq.shape[0]
            return F.pad(xq, (0, 0, 0, INT_MM_MIN_M - M)) if M < INT_MM_MIN_M else xq

        def int_mm_quant(x):
            def run():
                xq, xs = _torch_quant(x)
                acc = torch._int_mm(padded(xq), qt)[:x.shape[0]]
                return (acc.float() * xs[:, None] * sd[None, :]).to(x.dtype)
            return run

        def int_mm_bare(x):
            xq = padded(_torch_quant(x)[0])
            return lambda: torch._int_mm(xq, qt)
        peers["int_mm + quant"] = (int_mm_quant, "int_mm", "int8")
        peers["int_mm"] = (int_mm_bare, "int_mm", "int8")
    opfn = getattr(torch.ops.pysparse, OP_NAMES[op])
    return (lambda x: opfn(x, *args)), (lambda x: getattr(reference, OP_NAMES[op])(x, *args)), peers


def bench_linear(op, shapes, ms, dtype, backends, floors, cudagraph):
    bw, peaks = floors
    rows = []
    for sname, (N, K) in LINEAR_SHAPES[shapes].items():
        call, ref, peers = linear_cases(op, N, K, dtype)
        usable = {b: backend_status(b, OP_NAMES[op]) for b in backends}
        checked = set()
        for M in ms:
            x = torch.randn(M, K, device=DEVICE, dtype=dtype)
            res = {}
            for b in backends:
                ok, why = usable[b]
                if not ok:
                    if M == ms[0]:
                        print(f"# {OP_NAMES[op]} {sname} backend {b}: skipped: {why}")
                    continue
                fn = _forced(b, lambda x=x: call(x))
                if b not in checked:  # once per shape and backend, before any timing
                    db = check_numerics(f"{OP_NAMES[op]} {sname} M={M} backend={b}", fn(), ref(x))
                    print(f"# {OP_NAMES[op]} {sname} backend {b}: SQNR {db:.1f} dB vs reference")
                    checked.add(b)
                model, kind, _ = LINEAR_IMPLS[op][b]
                res[f"pysparse {b}"] = (_do_bench(fn, cudagraph), linear_bytes(model, M, N, K), kind)
            for p, (make, model, kind) in peers.items():
                res[p] = (_do_bench(make(x), cudagraph), linear_bytes(model, M, N, K), kind)
            rows += _rows(op, f"{sname} {N}x{K}", M, 2.0 * M * N * K, res, bw, peaks)
    return rows


def bench_attention(shapes, dtype, backends, floors, cudagraph):
    import torch.nn.functional as F

    from pysparse.ops import reference
    bw, peaks = floors
    H, D, causal = ATTN_SHAPES[shapes]
    usable = {b: backend_status(b, "attention") for b in backends}
    rows = []
    for B, S in ATTN_GRID[shapes]:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, S, D, device=DEVICE, dtype=dtype) for _ in range(3))
        ops = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
        nbytes = 8 * B * H * S * D
        res = {}
        for b in backends:
            ok, why = usable[b]
            if not ok:
                print(f"# attention backend {b}: skipped: {why}")
                continue
            fn = _forced(b, lambda: torch.ops.pysparse.attention(q, k, v, None, causal, None))
            if B == ATTN_GRID[shapes][0][0] and S == ATTN_GRID[shapes][0][1]:
                db = check_numerics(f"attention B={B} S={S} backend={b}", fn(),
                                    reference.attention(q, k, v, None, causal, None))
                print(f"# attention backend {b}: SQNR {db:.1f} dB vs reference")
            res[f"pysparse {b}"] = (_do_bench(fn, cudagraph), nbytes, "fp16")
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
        res["sdpa"] = (_do_bench(sdpa, cudagraph), nbytes, "fp16")
        rows += _rows("attention", f"B{B} H{H} S{S} D{D}", B, ops, res, bw, peaks, peer="sdpa")
    return rows


def _rows(op, shape, M, ops, res, bw, peaks, peer=None):
    peer = peer or {"int8": "int_mm + quant", "sparse24": "semi_structured",
                    "sparse24_int8": "int_mm + quant"}[op]
    ref_us = {p: res[p][0][0] * 1e3 for p in (peer, "cublas") if p in res}
    rows = []
    for impl, ((med, lo, hi), nbytes, kind) in res.items():
        us = med * 1e3
        floor_us = max(nbytes / bw, ops / peaks[kind]) * 1e6
        rows.append(dict(op=op, shape=shape, M=M, impl=impl, median_us=us, p10_us=lo * 1e3,
                         p90_us=hi * 1e3, tops=ops / us / 1e6, gbs=nbytes / us / 1e3,
                         vs_peer=ref_us[peer] / us if peer in ref_us else None,
                         vs_cublas=ref_us["cublas"] / us if "cublas" in ref_us else None,
                         vs_floor=us / floor_us))
    return rows


def markdown(rows, peer_note):
    head = ("| op | shape | M/batch | impl | median µs | p10-p90 µs | TFLOP/s or TOP/s | GB/s "
            f"| × peer ({peer_note}) | × cuBLAS | × floor |")
    out = [head, "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    f = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        out.append(f"| {r['op']} | {r['shape']} | {r['M']} | {r['impl']} | {r['median_us']:.1f} "
                   f"| {r['p10_us']:.1f}-{r['p90_us']:.1f} | {r['tops']:.1f} | {r['gbs']:.0f} "
                   f"| {f(r['vs_peer'])} | {f(r['vs_cublas'])} | {f(r['vs_floor'])} |")
    return "\n".join(out)


def _csv(kind, choices=None):
    def parse(s):
        items = [i.strip() for i in s.split(",") if i.strip()]
        if kind is int:
            return [int(i) for i in items]
        bad = [i for i in items if i not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}; got {s!r}")
        return items
    return parse


NO_GPU = ("bench_gpu: no CUDA GPU here (torch {tv}, CUDA {cv}); the measured benchmark needs "
          "an NVIDIA GPU (sm_80+) and a CUDA build of torch. `--roofline` prints the predicted "
          "tables without one.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--roofline", action="store_true",
                    help="print the predicted A100/H100 tables (Markdown) and exit; no GPU needed")
    ap.add_argument("--ops", type=_csv(str, OPS), default=list(OPS), help="comma list of " + ",".join(OPS))
    ap.add_argument("--m", type=_csv(int), default=[1, 16, 256], help="batch rows M, comma list")
    ap.add_argument("--shapes", choices=list(LINEAR_SHAPES), default="llama7b")
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    ap.add_argument("--backends", type=_csv(str, GPU_BACKENDS), default=list(GPU_BACKENDS),
                    help="comma list of triton,cuda (forced through PYSPARSE_BACKEND)")
    ap.add_argument("--cudagraph", action="store_true",
                    help="time with do_bench_cudagraph (hides host overhead; ops must not sync)")
    ap.add_argument("--json", help="write the measured rows as JSON")
    ap.add_argument("--md", help="write the measured table as Markdown")
    args = ap.parse_args(argv)

    if args.roofline:
        print(roofline_markdown(args.shapes, tuple(args.m), tuple(args.ops)))
        return 0
    if not torch.cuda.is_available():
        print(NO_GPU.format(tv=torch.__version__, cv=torch.version.cuda or "not built"),
              file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"bench_gpu: triton is not importable ({exc}); `pip install pysparse[gpu]`",
              file=sys.stderr)
        return 2
    importlib.import_module("pysparse")  # registers the ops and backends
    from pysparse.ops import backends as _backends

    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    floors = measured_floors(dtype, args.cudagraph)
    name = torch.cuda.get_device_name()
    cap = torch.cuda.get_device_capability()
    print(f"# bench_gpu: {name} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}, triton {triton.__version__}; {args.dtype}; measured copy "
          f"{floors[0] / 1e9:.0f} GB/s, {args.dtype} {floors[1]['fp16'] / 1e12:.0f} TFLOP/s, "
          f"int8 {floors[1]['int8'] / 1e12:.0f} TOP/s; timer "
          f"{'do_bench_cudagraph' if args.cudagraph else 'do_bench'}")
    for b in args.backends:
        print(f"# backend {b}: {_backends.availability()[b]}")
    rows = []
    for op in args.ops:
        if op == "attention":
            rows += bench_attention(args.shapes, dtype, args.backends, floors, args.cudagraph)
        else:
            rows += bench_linear(op, args.shapes, args.m, dtype, args.backends, floors,
                                 args.cudagraph)
    md = markdown(rows, "int8 ops: _int_mm + quant; 2:4: semi-structured; attention: SDPA")
    print(md)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(md + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "capability": cap, "dtype": args.dtype,
                       "copy_gbs": floors[0] / 1e9,
                       "peaks_tops": {k: v / 1e12 for k, v in floors[1].items()},
                       "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
