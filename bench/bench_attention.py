"""Fused attention on the CPU: pysparse's flash kernel against torch's SDPA and eager attention.

For each dtype, sequence length and causal flag (batch 1, 12 heads, head_dim 64 by default):
median time of
  pysparse   torch.ops.pysparse.attention (the C++ flash kernel; vdpbf16ps for bf16 on AVX512-BF16)
  sdpa       torch.nn.functional.scaled_dot_product_attention (torch's own CPU flash kernel)
  eager      q k^T -> (+ causal mask) -> softmax in fp32 -> @ v, as transformers' eager path
the ratios the attention issue targets (sdpa / pysparse and eager / pysparse, > 1 = we are faster),
our rate in GFLOP/s (4 * S^2 * D * H, halved when causal) and its fraction of the machine's
measured dense-matmul rate in the same dtype (torch.matmul on 2048^3, the practical ceiling), and
the largest error of each against the fp32 reference.

Memory: the kernel holds K and V re-packed once (O(S * D) per head) plus one 64 x 64 score block
per thread, never S x S; eager materialises B * H * S^2 scores (reported as `eager MB`).

    .venv/bin/python bench/bench_attention.py                   # bf16 and fp32, S 512/2048/4096
    .venv/bin/python bench/bench_attention.py --quick           # bf16, S 512 only
    .venv/bin/python bench/bench_attention.py --md out.md --json out.json
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F

import pysparse  # noqa: F401  (registers torch.ops.pysparse)
from pysparse.ops import reference
from pysparse.ops.backends import cpu
from timing import timeit

OPS = torch.ops.pysparse


def eager(q, k, v, causal):
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        S = q.shape[-2]
        s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def matmul_rate(dtype):
    a = torch.randn(2048, 2048).to(dtype)
    med, _, _ = timeit(lambda: a @ a, budget_s=0.5)
    return 2 * 2048 ** 3 / med


def run(dtypes, seqs, B, H, D, budget):
    rows = []
    for dtype in dtypes:
        peak = matmul_rate(dtype)
        for S in seqs:
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, H, S, D).to(dtype) for _ in range(3))
            for causal in (False, True):
                impls = {
                    "pysparse": lambda: OPS.attention(q, k, v, None, causal, None),
                    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                    "eager": lambda: eager(q, k, v, causal),
                }
                ref = reference.attention(q.float(), k.float(), v.float(), None, causal) if S <= 2048 else None
                t, err = {}, {}
                for name, fn in impls.items():
                    t[name] = timeit(fn, budget_s=budget, min_reps=3)[0]
                    err[name] = None if ref is None else (fn().float() - ref).abs().max().item()
                flops = 4 * B * H * S * S * D / (2 if causal else 1)
                rows.append(dict(
                    dtype=str(dtype).replace("torch.", ""), S=S, causal=causal,
                    pysparse_ms=t["pysparse"] * 1e3, sdpa_ms=t["sdpa"] * 1e3, eager_ms=t["eager"] * 1e3,
                    vs_sdpa=t["sdpa"] / t["pysparse"], vs_eager=t["eager"] / t["pysparse"],
                    gflops=flops / t["pysparse"] / 1e9, of_matmul=flops / t["pysparse"] / peak,
                    matmul_gflops=peak / 1e9, eager_mb=B * H * S * S * 4 / 2 ** 20,
                    err_pysparse=err["pysparse"], err_sdpa=err["sdpa"], err_eager=err["eager"]))
                r = rows[-1]
                print(f"{r['dtype']:8s} S={S:5d} causal={causal!s:5s}  pysparse {r['pysparse_ms']:8.1f} ms  "
                      f"sdpa {r['sdpa_ms']:8.1f}  eager {r['eager_ms']:8.1f}  "
                      f"x{r['vs_sdpa']:.2f} vs sdpa  x{r['vs_eager']:.2f} vs eager  "
                      f"{r['gflops']:.0f} GF/s ({r['of_matmul']:.0%} of matmul)", flush=True)
    return rows


def _fmt_err(e):
    return "-" if e is None else f"{e:.1e}"


def markdown(rows, B, H, D):
    out = [f"B={B}, H={H}, D={D}; times are medians in ms; x = peer time / pysparse time.", "",
           "| dtype | S | causal | pysparse | sdpa | eager | x sdpa | x eager | GF/s | of matmul | "
           "max err (ours / sdpa / eager) | eager S² MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['dtype']} | {r['S']} | {r['causal']} | {r['pysparse_ms']:.1f} | {r['sdpa_ms']:.1f} | "
                   f"{r['eager_ms']:.1f} | **{r['vs_sdpa']:.2f}** | {r['vs_eager']:.2f} | {r['gflops']:.0f} | "
                   f"{r['of_matmul']:.0%} | {_fmt_err(r['err_pysparse'])} / {_fmt_err(r['err_sdpa'])} / "
                   f"{_fmt_err(r['err_eager'])} | {r['eager_mb']:.0f} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="bf16, S=512 only")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--seqs", default="512,2048,4096")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per cell")
    ap.add_argument("--md")
    ap.add_argument("--json")
    a = ap.parse_args()
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
    seqs = [int(s) for s in a.seqs.split(",")]
    if a.quick:
        dtypes, seqs = [torch.bfloat16], [512]
    ok, why = cpu.status()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; pysparse cpu backend: {why}; "
          f"attention kernel: {cpu._C.attention_kernel() if cpu._C else 'reference'}")
    rows = run(dtypes, seqs, a.batch, a.heads, a.head_dim, a.budget)
    md = markdown(rows, a.batch, a.heads, a.head_dim)
    print()
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
