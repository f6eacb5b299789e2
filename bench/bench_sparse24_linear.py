"""2:4 sparse linear layers (float and W8A8) against their dense peers, in one process.

Same shapes, M grid and floors as bench_int8_linear.py. For each shape and M: median time of
  torch fp32 / bf16 F.linear on the dense weight, torch CSR (torch.sparse.mm, fp32, for the
  record; warm shapes only), pysparse 2:4 fp32 / bf16 (sparse24_linear_packed), pysparse dense
  W8A8 (int8_linear_packed) and pysparse 2:4+W8A8 (sparse24_int8_linear_packed),
and the ratios the 2:4 issue targets: 2:4 bf16 vs torch bf16, 2:4+w8a8 vs our dense int8, plus
each 2:4 kernel's time over its bytes floor (weight + activation bytes / measured bandwidth).

    .venv/bin/python bench/bench_sparse24_linear.py                 # BERT-base + Llama-7B shapes
    .venv/bin/python bench/bench_sparse24_linear.py --quick         # BERT shapes, M 1, 32, 512
    .venv/bin/python bench/bench_sparse24_linear.py --md out.md --json out.json
"""
import argparse
import json

import torch

from bench_int8_linear import COLD_BYTES, COLD_MIN_WEIGHT, MS, SHAPES, stream_bandwidth_gbs
from pysparse.formats import int8, sparse24
from pysparse.ops.backends import cpu
from timing import timeit

DEFAULT_SHAPES = [s for s in SHAPES if s.startswith(("bert", "llama"))]
OPS = torch.ops.pysparse


def _copies(nbytes, cold):
    return max(2, -(-COLD_BYTES // nbytes)) if cold else 1


def _rotate(fns):
    state = {"i": 0}

    def run(x):
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]](x)
    return run


def make_impls(K, N, cold):
    """name -> (callable(x fp32), input dtype, weight bytes)."""
    w = torch.randn(N, K) / K ** 0.5
    w = w * sparse24.mask_24(w)
    b = torch.randn(N)
    values, meta = sparse24.compress(w)
    values_q, s = int8.quantize_weight(values)
    q_dense = sparse24.decompress(values_q, meta)
    packed, colsum = int8.pack_vnni16(q_dense)
    sv, sc, scs = sparse24.pack_cpu_int8(values_q, meta)
    fv32, fc = sparse24.pack_cpu_float(values, meta)
    fv16 = fv32.bfloat16()
    spec = {
        "torch fp32": (lambda: (lambda x, wc=w.clone(): torch.nn.functional.linear(x, wc, b)),
                       torch.float32, 4 * N * K),
        "torch bf16": (lambda: (lambda x, wc=w.bfloat16(), bb=b.bfloat16():
                                torch.nn.functional.linear(x, wc, bb)), torch.bfloat16, 2 * N * K),
        "2:4 fp32": (lambda: (lambda x, v=fv32.clone(), c=fc.clone():
                              OPS.sparse24_linear_packed(x, v, c, b, N)), torch.float32,
                     2 * N * K + N * K // 8),
        "2:4 bf16": (lambda: (lambda x, v=fv16.clone(), c=fc.clone():
                              OPS.sparse24_linear_packed(x, v, c, b, N)), torch.bfloat16,
                     N * K + N * K // 8),
        "int8 dense": (lambda: (lambda x, p=packed.clone(), cs=colsum.clone():
                                OPS.int8_linear_packed(x, p, cs, s, b)), torch.float32, N * K),
        "2:4+w8a8": (lambda: (lambda x, v=sv.clone(), c=sc.clone():
                              OPS.sparse24_int8_linear_packed(x, v, c, scs, s, b)),
                     torch.float32, N * K // 2 + N * K // 8),
    }
    impls = {}
    for name, (make, dtype, nbytes) in spec.items():
        impls[name] = (_rotate([make() for _ in range(_copies(nbytes, cold))]), dtype, nbytes)
    if not cold:
        csr = w.to_sparse_csr()
        impls["torch CSR fp32"] = (lambda x: torch.sparse.mm(csr, x.T).T + b, torch.float32,
                                   int(csr.values().numel() * 4 + csr.col_indices().numel() * 8))
    return impls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="BERT shapes, M in 1, 32, 512")
    ap.add_argument("--shapes", nargs="*", choices=list(SHAPES), help="subset of shapes")
    ap.add_argument("--m", nargs="*", type=int, help="subset of M")
    ap.add_argument("--budget", type=float, default=0.25, help="seconds of timing per cell")
    ap.add_argument("--json", help="write results as JSON")
    ap.add_argument("--md", help="write the table as Markdown")
    args = ap.parse_args(argv)
    shapes = args.shapes or ([s for s in DEFAULT_SHAPES if s.startswith("bert")] if args.quick
                             else DEFAULT_SHAPES)
    ms = args.m or ((1, 32, 512) if args.quick else MS)
    C = cpu._C
    info = C.info() if C is not None else {}
    bw = stream_bandwidth_gbs()
    print(f"# threads={torch.get_num_threads()} isa={info.get('active_isa')} "
          f"sparse24={info.get('sparse24')} stream={bw:.1f} GB/s")
    rows = []
    head = ("shape", "M", "torch fp32", "torch bf16", "torch CSR fp32", "2:4 fp32", "2:4 bf16",
            "int8 dense", "2:4+w8a8", "bf16 speedup", "w8a8 speedup", "2:4 bf16/floor",
            "2:4+w8a8/floor")
    print(" | ".join(head))
    for shape in shapes:
        K, N = SHAPES[shape]
        cold = N * K >= COLD_MIN_WEIGHT
        impls = make_impls(K, N, cold)
        for M in ms:
            x = torch.randn(M, K)
            t = {}
            for name, (fn, dtype, nbytes) in impls.items():
                if name == "torch CSR fp32" and M * N * K > 2 ** 31:
                    continue  # minutes per call; the record is made at the smaller sizes
                xi = x.to(dtype)
                t[name] = timeit(lambda: fn(xi), budget_s=args.budget)[0]
            floor = lambda name: (impls[name][2] + M * K * impls[name][1].itemsize  # noqa: E731
                                  + M * N * impls[name][1].itemsize) / (bw * 1e9)
            row = {"shape": shape, "M": M, "K": K, "N": N, "cold": cold,
                   "ms": {k: v * 1e3 for k, v in t.items()},
                   "bf16_speedup": t["torch bf16"] / t["2:4 bf16"],
                   "w8a8_speedup": t["int8 dense"] / t["2:4+w8a8"],
                   "bf16_floor": t["2:4 bf16"] / floor("2:4 bf16"),
                   "w8a8_floor": t["2:4+w8a8"] / floor("2:4+w8a8")}
            rows.append(row)
            cells = [shape + (" (cold)" if cold else ""), str(M)]
            cells += [f"{row['ms'][h]:.3f}" if h in row["ms"] else "-" for h in head[2:9]]
            cells += [f"{row['bf16_speedup']:.2f}x", f"{row['w8a8_speedup']:.2f}x",
                      f"{row['bf16_floor']:.2f}", f"{row['w8a8_floor']:.2f}"]
            print(" | ".join(cells), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "stream_gbs": bw, "rows": rows}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
            for r in rows:
                cells = [r["shape"] + (" (cold)" if r["cold"] else ""), str(r["M"])]
                cells += [f"{r['ms'][h]:.3f}" if h in r["ms"] else "-" for h in head[2:9]]
                cells += [f"{r['bf16_speedup']:.2f}x", f"{r['w8a8_speedup']:.2f}x",
                          f"{r['bf16_floor']:.2f}", f"{r['w8a8_floor']:.2f}"]
                f.write("| " + " | ".join(cells) + " |\n")


if __name__ == "__main__":
    main()
