"""pysparse against every CPU peer, in one process, in one table: the bundled MiniLM end to end
and the Linear shapes it and a Llama-7B are made of.

MiniLM (`pysparse.models.load_minilm`) at (batch, seq) = (1,16), (1,128), (8,128), (32,128),
(1,512), every row `seq` real tokens (no padding):
  ours: w8a8, w8a8 + replace_attention, 2:4+w8a8 and 2:4 bf16 on a magnitude-2:4-pruned copy
        (no recovery: the 2:4 fidelity is the pruning's, not the kernels');
  peers: torch fp32 / bf16 eager, torch.ao quantize_dynamic (x86 engine), torchao
        Int8DynamicActivationInt8WeightConfig, ONNX Runtime fp32 and dynamic int8, OpenVINO
        fp32, default precision (bf16 on this CPU) and int8 (NNCF PTQ).
  Runners and ONNX export come from bench_minilm.py. Fidelity: mean cosine and recall@10 of
  mean-pooled sentence embeddings vs torch fp32 on 128 held-out Debian descriptions (seed 0;
  NNCF calibrates on 64 other ones).
Linear shapes N×K (out×in): MiniLM 384×384, 1536×384, 384×1536 (warm) and Llama-7B 4096×4096,
11008×4096 (cold: each implementation rotates over ≥ 256 MiB of weight copies) at M = 1, 16, 128:
  ours (the modules replace_linear installs): w8a8, 2:4+w8a8 and 2:4 bf16 on a random 2:4 weight;
  peers (bench_int8_linear.py's makers): torch fp32 / bf16 F.linear, torch.ao dynamic Linear (x86),
  torch._int_mm + per-token quantization, torchao int8 dynamic.
  Fidelity: relative output error ||y - y_fp32|| / ||y_fp32|| vs fp32 F.linear on the same weight
  (the 2:4-masked one for the 2:4 rows).

Every cell is a median of interleaved rounds (each round calls every implementation once, so load
from elsewhere on the machine falls on all of them); ratios are vs torch fp32 in the same round.
A missing peer package gives a note row.

    .venv/bin/python bench/peers.py [--quick] [--json out.json] [--md out.md]
"""
import argparse
import contextlib
import copy
import importlib.util
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import pysparse  # noqa: E402
from bench_int8_linear import (COLD_MIN_WEIGHT, _peer_makers, _rotating,  # noqa: E402
                               draw_linear)
from bench_minilm import TorchRunner, _full_batch, _pool, build_runners  # noqa: E402
from pysparse.benchmark import machine_info, time_interleaved  # noqa: E402
from pysparse.data import load_descriptions  # noqa: E402
from pysparse.formats import sparse24  # noqa: E402
from pysparse.models import load_minilm  # noqa: E402
from pysparse.nn.linear import SCHEMES  # noqa: E402
from pysparse.report import cosine_fidelity, recall_at_k  # noqa: E402

MODEL_SHAPES = ((1, 16), (1, 128), (8, 128), (32, 128), (1, 512))
LINEAR_SHAPES = {  # label: (N, K) = (out_features, in_features)
    "minilm 384×384": (384, 384), "minilm 1536×384": (1536, 384), "minilm 384×1536": (384, 1536),
    "llama 4096×4096": (4096, 4096), "llama 11008×4096": (11008, 4096),
}
LINEAR_MS = (1, 16, 128)
FP32 = "torch fp32"
# one name per implementation across the MiniLM and Linear parts of the table
LINEAR_NAMES = {"torch.ao dynamic (x86)": "torch.ao dynamic int8",
                "torch._int_mm + quant": "torch._int_mm + quant"}
ROW_ORDER = ["torch fp32", "pysparse w8a8", "pysparse w8a8 + attention",
             "pysparse 2:4+w8a8 (magnitude)", "pysparse 2:4+w8a8 + attention",
             "pysparse 2:4 bf16 (magnitude)", "torch bf16", "torch.ao dynamic int8",
             "torchao int8 dynamic", "torch._int_mm + quant", "onnxruntime fp32",
             "onnxruntime dynamic int8", "openvino fp32", "openvino default (bf16 here)",
             "openvino int8 (nncf, default precision)"]
PEER_PACKAGES = {"ort": ("onnxruntime", "onnx"), "ov": ("openvino", "nncf", "onnx"),
                 "torchao": ("torchao",)}


def _missing(key):
    return [p for p in PEER_PACKAGES.get(key, ()) if importlib.util.find_spec(p) is None]


# ----------------------------------------------------------------------------------- MiniLM


def model_runners(base, tok, calib, tmp, wanted, notes):
    """bench_minilm's runners, plus torchao int8 dynamic and our 2:4 bf16 on the model."""
    logging.getLogger("nncf").setLevel(logging.ERROR)
    runners = build_runners(base, tok, calib, tmp, wanted, notes)
    if "sparse" in wanted:
        sp = copy.deepcopy(base)
        pysparse.prune(sp, pattern="2:4", progress=False)
        pysparse.replace_linear(sp, "2:4")
        runners["pysparse 2:4 bf16 (magnitude)"] = TorchRunner(sp.to(torch.bfloat16))
    if "torchao" in wanted:
        try:
            with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
                tm = copy.deepcopy(base)
                quantize_(tm, Int8DynamicActivationInt8WeightConfig())
            runners["torchao int8 dynamic"] = TorchRunner(tm)
        except Exception as exc:  # noqa: BLE001 - a peer that does not run is reported
            notes.append(f"torchao int8 dynamic (model): {type(exc).__name__}: {exc}")
    return runners


def bench_model(args, notes, log):
    base, tok = load_minilm()
    calib = load_descriptions(64, seed=123)
    texts = [t for t in load_descriptions(args.texts + 64, seed=0) if t not in set(calib)]
    texts = texts[:args.texts]
    wanted = set(args.peers)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        runners = model_runners(base, tok, calib, tmp, wanted, notes)
        log(f"# MiniLM: built {len(runners)} variants in {time.perf_counter() - t0:.0f} s")
        fid_feed = [dict(tok(texts[i:i + 32], padding=True, truncation=True, max_length=128,
                             return_tensors="np")) for i in range(0, len(texts), 32)]
        with torch.inference_mode():
            emb = {name: torch.cat([_pool(r(f), f["attention_mask"]) for f in fid_feed])
                   for name, r in runners.items()}
        ref = emb[FP32]
        rows = {name: {"impl": name, "cosine": cosine_fidelity(ref, emb[name]),
                       "recall@10": recall_at_k(ref, emb[name], 10)} for name in runners}
        for b, s in args.model_shapes:
            feed = _full_batch(tok, texts, b, s)
            t0 = time.perf_counter()
            t = time_interleaved({n: (lambda r=r: r(feed)) for n, r in runners.items()},
                                 budget_s=args.budget * len(runners), min_reps=args.min_reps,
                                 max_reps=100, warmup=1)
            for name in runners:
                rows[name][f"b{b}_s{s}"] = {
                    "median_ms": t[name]["median"] * 1e3, "p10_ms": t[name]["p10"] * 1e3,
                    "p90_ms": t[name]["p90"] * 1e3, "reps": t[name]["reps"],
                    "speedup_vs_fp32": t[FP32]["median"] / t[name]["median"]}
            log(f"# MiniLM b{b} s{s}: {t[FP32]['reps']} rounds in "
                f"{time.perf_counter() - t0:.0f} s; "
                + ", ".join(f"{n} {v['median'] * 1e3:.1f} ms" for n, v in t.items()))
    return rows


# ----------------------------------------------------------------------------------- Linear


def _ours_makers(N, K, b):
    """Our modules on a random 2:4 weight (and w8a8 on the dense one is made in linear_impls)."""
    w = torch.randn(N, K) / K ** 0.5
    w24 = w * sparse24.mask_24(w)
    lin24 = torch.nn.Linear(K, N).eval()
    with torch.no_grad():
        lin24.weight.copy_(w24)
        lin24.bias.copy_(b)

    def sp_int8():
        return SCHEMES["2:4+w8a8"].from_linear(lin24).eval()

    def sp_bf16():
        m = SCHEMES["2:4"].from_linear(lin24).eval().to(torch.bfloat16)
        return lambda x: m(x.bfloat16())
    return lin24, {"pysparse 2:4+w8a8 (magnitude)": (sp_int8, N * K // 2 + N * K // 8),
                   "pysparse 2:4 bf16 (magnitude)": (sp_bf16, N * K + N * K // 8)}


def linear_impls(N, K, wanted, cold, notes):
    """name -> (callable(x), reference key): 'dense' impls compare with torch fp32's output,
    '2:4' ones with fp32 F.linear on the 2:4 weight."""
    names = {"fp32", "bf16", "ao-x86", "int_mm"} | ({"torchao"} if "torchao" in wanted else set())
    seed = N * 7 + K
    torch.manual_seed(seed)
    with contextlib.redirect_stderr(io.StringIO()) as err:
        makers = _peer_makers(K, N, names)  # draws via draw_linear(K, N)
    if err.getvalue().strip() and not any("torchao (linear)" in n for n in notes):
        notes.append("torchao (linear): " + err.getvalue().strip().lstrip("# "))
    makers.pop("pysparse", None)  # the op-level call; ours below are the modules users get
    # w8a8 on the same dense weight as the peers: the same draws again (its rel err checks it)
    torch.manual_seed(seed)
    lin = draw_linear(K, N)
    b = lin.bias.detach()
    ours = {"pysparse w8a8": (lambda: SCHEMES["w8a8"].from_linear(lin).eval(), N * K)}
    lin24, sp = _ours_makers(N, K, b)
    if "sparse" in wanted:
        ours.update(sp)
    impls = {}
    for name, (make, nbytes) in {**makers, **ours}.items():
        key = "2:4" if "2:4" in name else "dense"
        impls[LINEAR_NAMES.get(name, name)] = (_rotating(make, nbytes, cold), key)
    return impls, lin24


def bench_linear(args, notes, log):
    rows = []
    wanted = set(args.peers)
    for label in args.linear_shapes:
        N, K = LINEAR_SHAPES[label]
        cold = N * K >= COLD_MIN_WEIGHT
        t0 = time.perf_counter()
        impls, lin24 = linear_impls(N, K, wanted, cold, notes)
        for M in args.linear_ms:
            x = torch.randn(M, K)
            with torch.inference_mode():
                outs = {n: fn(x).float() for n, (fn, _) in impls.items()}
                ref = {"dense": outs[FP32], "2:4": lin24(x)}
                t = time_interleaved({n: (lambda fn=fn: fn(x)) for n, (fn, _) in impls.items()},
                                     budget_s=args.linear_budget * len(impls),
                                     min_reps=args.min_reps, max_reps=200)
            for n, (_, key) in impls.items():
                r = ref[key]
                rows.append({"shape": label, "N": N, "K": K, "M": M, "cold": cold, "impl": n,
                             "median_us": t[n]["median"] * 1e6, "p10_us": t[n]["p10"] * 1e6,
                             "p90_us": t[n]["p90"] * 1e6, "reps": t[n]["reps"],
                             "speedup_vs_fp32": t[FP32]["median"] / t[n]["median"],
                             "rel_err": float((outs[n] - r).norm() / r.norm().clamp_min(1e-30)),
                             "reference": "fp32 on the 2:4 weight" if key == "2:4" else "fp32"})
        del impls, lin24
        log(f"# Linear {label} ({'cold' if cold else 'warm'}): {time.perf_counter() - t0:.0f} s")
    return rows


# ------------------------------------------------------------------------------------ table


def _geomean(v):
    v = [x for x in v if x and x > 0]
    return math.exp(sum(map(math.log, v)) / len(v)) if v else None


def markdown(result, args):
    m = result["machine"]
    model_rows, lin_rows = result["model_rows"], result["linear_rows"]
    head = (f"{m['cpu']}, {m['torch_threads']} torch threads ({m['os_cpus']} CPUs), "
            f"ISA {m['isa']}, "
            f"torch {m['torch']}; load average at the end {m.get('loadavg_1m') or 0:.2f} "
            f"(other work on the machine); MiniLM fidelity on {args.texts} held-out texts")
    groups = {"minilm": [s for s in args.linear_shapes if s.startswith("minilm")],
              "llama": [s for s in args.linear_shapes if s.startswith("llama")]}
    lin_cols = [(g, M) for g in groups if groups[g] for M in args.linear_ms]
    names = [n for n in ROW_ORDER if n in model_rows or any(r["impl"] == n for r in lin_rows)]
    names += [n for n in list(model_rows) + [r["impl"] for r in lin_rows] if n not in names]
    names = list(dict.fromkeys(names))
    cols = ["impl"] + [f"MiniLM b{b} s{s} ms (× fp32)" for b, s in args.model_shapes] + [
        "cosine", "recall@10"] + [f"Linear {g} M={M} × fp32" for g, M in lin_cols] + [
        "Linear rel err (max)"]
    md = [head, "", "| " + " | ".join(cols) + " |", "| --- |" + " ---: |" * (len(cols) - 1)]
    for n in names:
        cells = [n]
        mr = model_rows.get(n)
        for b, s in args.model_shapes:
            c = mr and mr.get(f"b{b}_s{s}")
            cells.append(f"{c['median_ms']:.1f} ({c['speedup_vs_fp32']:.2f}×)" if c else "–")
        cells += [f"{mr['cosine']:.4f}" if mr else "–", f"{mr['recall@10']:.3f}" if mr else "–"]
        lr = [r for r in lin_rows if r["impl"] == n]
        for g, M in lin_cols:
            gm = _geomean([r["speedup_vs_fp32"] for r in lr
                           if r["M"] == M and r["shape"] in groups[g]])
            cells.append(f"{gm:.2f}×" if gm else "–")
        cells.append(f"{max(r['rel_err'] for r in lr):.1e}" if lr else "–")
        md.append("| " + " | ".join(cells) + " |")
    for note in result["notes"]:
        md.append(f"| {note} |" + " |" * (len(cols) - 1))
    md += ["", "Linear columns: geometric mean over the group's shapes of torch fp32 median / "
           "impl median (same interleaved rounds); per-shape cells below. 2:4 rows: MiniLM "
           "magnitude-pruned without recovery, Linear on a random 2:4 weight (rel err vs fp32 on "
           "that weight)."]
    if lin_rows:
        impls = [n for n in names if any(r["impl"] == n for r in lin_rows)]
        md += ["", "| N×K | M | " + " | ".join(f"{n} µs (× fp32)" for n in impls) + " |",
               "| --- | ---: |" + " ---: |" * len(impls)]
        cell = {(r["shape"], r["M"], r["impl"]): r for r in lin_rows}
        for label in args.linear_shapes:
            for M in args.linear_ms:
                cs = []
                for n in impls:
                    r = cell.get((label, M, n))
                    cs.append(f"{r['median_us']:.1f} ({r['speedup_vs_fp32']:.2f}×)"
                              if r else "–")
                N, K = LINEAR_SHAPES[label]
                cold = " (cold)" if N * K >= COLD_MIN_WEIGHT else ""
                md.append(f"| {label}{cold} | {M} | " + " | ".join(cs) + " |")
    return "\n".join(md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 32 texts, MiniLM (1,16) and (1,128), Linear 384×384 at "
                         "M=1,16, one round per cell")
    ap.add_argument("--peers", nargs="*",
                    default=["attn", "sparse", "bf16", "ao", "torchao", "ort", "ov"],
                    help="attn = our w8a8 + replace_attention; sparse = our 2:4 rows")
    ap.add_argument("--texts", type=int, default=128, help="held-out texts for fidelity")
    ap.add_argument("--budget", type=float, default=1.0,
                    help="seconds of MiniLM timing per implementation per shape")
    ap.add_argument("--linear-budget", type=float, default=0.2,
                    help="seconds of Linear timing per implementation per cell")
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--no-model", action="store_true", help="Linear shapes only")
    ap.add_argument("--no-linear", action="store_true", help="MiniLM only")
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args(argv)
    args.model_shapes, args.linear_ms = MODEL_SHAPES, LINEAR_MS
    args.linear_shapes = list(LINEAR_SHAPES)
    if args.quick:
        args.texts, args.budget, args.linear_budget, args.min_reps = 32, 0.0, 0.0, 1
        args.model_shapes, args.linear_ms = ((1, 16), (1, 128)), (1, 16)
        args.linear_shapes = ["minilm 384×384"]
    if args.texts < 11:
        ap.error("--texts must be at least 11 (recall@10)")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    notes = []
    for key in ("ort", "ov", "torchao"):
        miss = _missing(key)
        if key in args.peers and miss:
            notes.append(f"{key}: not installed ({', '.join(miss)}); "
                         f"`pip install {' '.join(miss)}`")
            args.peers = [p for p in args.peers if p != key]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_rows = {} if args.no_model else bench_model(args, notes, log)
        lin_rows = [] if args.no_linear else bench_linear(args, notes, log)
    result = {"machine": machine_info(),
              "command": " ".join(["bench/peers.py"] + (argv or sys.argv[1:])),
              "wall_s": time.perf_counter() - t0,
              "model_shapes": [list(s) for s in args.model_shapes],
              "linear_shapes": {k: LINEAR_SHAPES[k] for k in args.linear_shapes},
              "linear_ms": list(args.linear_ms), "texts": args.texts,
              "model_rows": model_rows, "linear_rows": lin_rows, "notes": notes}
    md = markdown(result, args)
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
