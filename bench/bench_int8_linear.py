"""int8_linear (W8A8, dynamic per-token activations) against every CPU peer, in one process.

For each shape (MiniLM, BERT-base, Llama-7B linear layers) and M, prints the median time, the
spread (p10-p90), GOP/s, GB/s and the ratio to two floors measured here: bytes that must move
(int8 weight + fp32 activations in and out) / measured stream bandwidth, and ops / measured
int8 peak of the best kernel path on this CPU. Peers: torch fp32 and bf16 F.linear, torch.ao
quantize_dynamic (fbgemm and x86 engines), torch._int_mm with the per-token quantization it
needs, torchao Int8DynamicActivationInt8Weight (if installed).

    .venv/bin/python bench/bench_int8_linear.py            # full grid (several minutes)
    .venv/bin/python bench/bench_int8_linear.py --quick    # MiniLM shapes, fewer M
    .venv/bin/python bench/bench_int8_linear.py --json out.json --md out.md
"""
import argparse
import contextlib
import copy
import io
import json
import sys
import warnings

import torch

import pysparse
from pysparse.formats import int8
from pysparse.ops.backends import cpu
from timing import timeit

SHAPES = {  # name: (K, N) of y = x @ W^T, W [N, K]
    "minilm.qkvo": (384, 384), "minilm.ffn_up": (384, 1536), "minilm.ffn_down": (1536, 384),
    "bert.qkvo": (768, 768), "bert.ffn_up": (768, 3072), "bert.ffn_down": (3072, 768),
    "llama7b.qkvo": (4096, 4096), "llama7b.up": (4096, 11008), "llama7b.down": (11008, 4096),
}
MS = (1, 8, 32, 128, 512, 2048)
# Weights at least this large (int8 bytes) are timed cold: each implementation rotates over
# enough copies of its weights (>= COLD_BYTES) that they come from DRAM, as the layers of a 7B
# model do. Smaller shapes are timed warm: a whole int8 MiniLM/BERT fits in the L3 cache.
COLD_MIN_WEIGHT = 4 << 20
COLD_BYTES = 256 << 20


def stream_bandwidth_gbs():
    """Read bandwidth: sum over a 512 MiB fp32 buffer (bytes read / time), median of 5."""
    buf = torch.ones(128 * 1024 * 1024)
    med, _, _ = timeit(lambda: buf.sum(), budget_s=1.0, min_reps=5, max_reps=5)
    return buf.numel() * 4 / med / 1e9


def int8_peak_gops():
    """Peak int8 multiply-accumulate rate of the best kernel path here (all threads)."""
    C = cpu._C
    if C is None or not hasattr(C, "int8_peak_gops"):
        return None
    isa = C.isa_id(C.info()["active_isa"])
    threads = torch.get_num_threads()
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(threads) as ex:  # the binding releases the GIL
        rates = list(ex.map(lambda _: C.int8_peak_gops(isa, 0.3), range(threads)))
    return sum(rates)


def _rotating(make, nbytes, cold):
    """make() -> callable(x). Warm: one instance. Cold: enough instances to cover COLD_BYTES,
    called in turn, so every call streams its weights from memory."""
    if not cold:
        return make()
    fns = [make() for _ in range(max(2, -(-COLD_BYTES // nbytes)))]
    state = {"i": 0}

    def run(x):
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]](x)
    return run


def make_peers(K, N, names, cold=False):
    impls = {}
    for name, (make, nbytes) in _peer_makers(K, N, names).items():
        impls[name] = _rotating(make, nbytes, cold)
    return impls


def draw_linear(K, N):
    """nn.Linear(K, N) with w = randn(N, K) / sqrt(K), then b = randn(N) (these draws, in this
    order, from the current RNG: peers.py rebuilds the same layer from the same seed)."""
    w = torch.randn(N, K) / K ** 0.5
    b = torch.randn(N)
    lin = torch.nn.Linear(K, N).eval()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def _peer_makers(K, N, names):
    lin = draw_linear(K, N)
    w, b = lin.weight.detach(), lin.bias.detach()
    q, s = int8.quantize_weight(w)
    makers = {}

    def ours():
        packed, colsum = int8.pack_vnni16(q)
        return lambda x: torch.ops.pysparse.int8_linear_packed(x, packed, colsum, s, b)
    makers["pysparse"] = (ours, N * K)
    if "fp32" in names:
        def fp32():
            wc = w.clone()
            return lambda x: torch.nn.functional.linear(x, wc, b)
        makers["torch fp32"] = (fp32, 4 * N * K)
    if "bf16" in names:
        def bf16():
            wb, bb = w.bfloat16(), b.bfloat16()
            return lambda x: torch.nn.functional.linear(x.bfloat16(), wb, bb)
        makers["torch bf16"] = (bf16, 2 * N * K)
    for engine in ("fbgemm", "x86"):
        if f"ao-{engine}" in names and engine in torch.backends.quantized.supported_engines:
            def ao(engine=engine):
                torch.backends.quantized.engine = engine
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    qm = torch.ao.quantization.quantize_dynamic(
                        torch.nn.Sequential(copy.deepcopy(lin)), {torch.nn.Linear},
                        dtype=torch.qint8)

                def run(x):
                    torch.backends.quantized.engine = engine
                    return qm(x)
                return run
            makers[f"torch.ao dynamic ({engine})"] = (ao, N * K)
    if "int_mm" in names:
        def int_mm():
            qc = q.clone()

            def run(x):
                xq, xs = pysparse.ops.reference.quantize_per_token(x)
                return torch._int_mm(xq, qc.t()).float() * xs[:, None] * s[None, :] + b
            return run
        makers["torch._int_mm + quant"] = (int_mm, N * K)
    if "torchao" in names:
        try:
            with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            def tao():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tm = torch.nn.Sequential(copy.deepcopy(lin)).eval()
                    quantize_(tm, Int8DynamicActivationInt8WeightConfig())
                return tm
            makers["torchao int8 dynamic"] = (tao, N * K)
        except Exception as exc:  # noqa: BLE001 - a peer that does not run is reported
            print(f"# torchao unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
    return makers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="MiniLM shapes, M in 1, 32, 512")
    ap.add_argument("--shapes", nargs="*", choices=list(SHAPES), help="subset of shapes")
    ap.add_argument("--m", nargs="*", type=int, help="subset of M")
    ap.add_argument("--peers", nargs="*",
                    default=["fp32", "bf16", "ao-fbgemm", "ao-x86", "int_mm", "torchao"])
    ap.add_argument("--budget", type=float, default=0.25, help="seconds of timing per cell")
    ap.add_argument("--json", help="write results as JSON")
    ap.add_argument("--md", help="write the table as Markdown")
    args = ap.parse_args(argv)
    shapes = args.shapes or ([s for s in SHAPES if s.startswith("minilm")] if args.quick else SHAPES)
    ms = args.m or ((1, 32, 512) if args.quick else MS)

    bw = stream_bandwidth_gbs()
    peak = int8_peak_gops()
    info = cpu._C.info() if cpu._C is not None else {"active_isa": "none"}
    head = (f"# int8_linear bench: torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"ISA {info['active_isa']}; stream read {bw:.1f} GB/s; int8 peak "
            + (f"{peak:.0f} GOP/s" if peak else "n/a"))
    print(head)
    rows = []
    cols = f"{'shape':<16}{'M':>5}  {'impl':<26}{'median us':>11}{'p10-p90 us':>18}{'GOP/s':>8}{'GB/s':>7}{'x best peer':>12}{'x floor':>9}"
    print(cols)
    for name in shapes:
        K, N = SHAPES[name]
        cold = N * K >= COLD_MIN_WEIGHT
        impls = make_peers(K, N, set(args.peers), cold=cold)
        for M in ms:
            x = torch.randn(M, K)
            ops = 2.0 * M * K * N
            nbytes = N * K + 4 * M * K + 4 * M * N  # int8 weight + fp32 x in + fp32 y out
            floor_s = max(nbytes / (bw * 1e9), ops / (peak * 1e9) if peak else 0.0)
            res = {}
            with torch.inference_mode():
                for impl, fn in impls.items():
                    res[impl] = timeit(lambda fn=fn: fn(x), budget_s=args.budget)
            best_peer = min(v[0] for k, v in res.items() if k != "pysparse")
            for impl, (med, lo, hi) in res.items():
                row = {"shape": name, "K": K, "N": N, "M": M, "impl": impl, "median_us": med * 1e6,
                       "p10_us": lo * 1e6, "p90_us": hi * 1e6, "gops": ops / med / 1e9,
                       "gbs": nbytes / med / 1e9, "vs_best_peer": best_peer / med,
                       "vs_floor": med / floor_s}
                row["cold"] = cold
                rows.append(row)
                print(f"{name:<16}{M:>5}  {impl:<26}{med * 1e6:>11.1f}{f'{lo * 1e6:.1f}-{hi * 1e6:.1f}':>18}"
                      f"{row['gops']:>8.1f}{row['gbs']:>7.1f}{row['vs_best_peer']:>11.2f}x"
                      f"{row['vs_floor']:>8.2f}x", flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "isa": info["active_isa"], "stream_gbs": bw, "int8_peak_gops": peak}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(head.lstrip("# ") + "\n\n" + summary_markdown(rows) + "\n")
    return 0


def summary_markdown(rows):
    """One line per (shape, M): ours, the best peer (named), ratio, ours vs floor."""
    out = ["| shape | weights | M | pysparse µs | best peer | peer µs | speedup | × floor |",
           "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    cells = {}
    for r in rows:
        cells.setdefault((r["shape"], r["M"]), []).append(r)
    for (shape, M), rs in cells.items():
        ours = next(r for r in rs if r["impl"] == "pysparse")
        peer = min((r for r in rs if r["impl"] != "pysparse"), key=lambda r: r["median_us"])
        out.append(f"| {shape} | {'cold' if ours['cold'] else 'warm'} | {M} | "
                   f"{ours['median_us']:.1f} | {peer['impl']} | "
                   f"{peer['median_us']:.1f} | {peer['median_us'] / ours['median_us']:.2f}× | "
                   f"{ours['vs_floor']:.2f}× |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
