"""Accuracy of every compression method on the bundled MiniLM and bundled real text.

For each pruning method x pattern (2:4, 50% unstructured, 25% of attention heads, 25% of FFN
neurons) and each quantization scheme (dynamic / static (symmetric int8 or asymmetric uint8) /
SmoothQuant W8A8, weight-only w8 and w4 group-128 (round-to-nearest, GPTQ, AWQ + GPTQ), and
2:4 + W8A8), one-shot with no fine-tuning: embedding fidelity against the fp32
model on held-out text (mean cosine of the sentence embeddings and recall@10 of their nearest
neighbours), bytes of the model's parameters and buffers, and the time the compression took.

Texts: the bundled Debian package descriptions, one deterministic shuffle split into a held-out
evaluation set (first --eval texts) and a disjoint calibration set (the next --calib texts).

    .venv/bin/python bench/bench_accuracy.py                  # everything (a few minutes)
    .venv/bin/python bench/bench_accuracy.py --only prune     # or: quant, structured
    .venv/bin/python bench/bench_accuracy.py --only quant --calib 256   # RESULTS' quant table
    .venv/bin/python bench/bench_accuracy.py --md out.md --json out.json
"""
import argparse
import copy
import json
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import pysparse  # noqa: E402
from pysparse.data import load_descriptions  # noqa: E402
from pysparse.models import embed, load_minilm  # noqa: E402
from pysparse.quant.awq import awq_smooth  # noqa: E402
from pysparse.quant.gptq import gptq_quantize  # noqa: E402
from pysparse.report import cosine_fidelity, recall_at_k  # noqa: E402

PRUNE_METHODS = ("magnitude", "random", "wanda", "taylor", "sparsegpt")
STRUCTURED_METHODS = ("magnitude", "taylor")


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def variants(kind):
    """name -> (group, fn(model, tok, calib) applied in place)."""
    v = {}
    if kind in ("all", "prune"):
        for pat, kw in (("2:4", dict(pattern="2:4")), ("50%", dict(sparsity=0.5))):
            for m in PRUNE_METHODS:
                v[f"prune {pat} {m}"] = ("prune", lambda model, tok, cal, kw=kw, m=m: pysparse.prune(
                    model, method=m, calib=None if m in ("magnitude", "random") else cal,
                    tokenizer=tok, progress=False, **kw))
    if kind in ("all", "structured"):
        for pat in ("heads", "neurons"):
            for m in STRUCTURED_METHODS:
                v[f"prune 25% {pat} {m}"] = ("structured", lambda model, tok, cal, pat=pat, m=m: pysparse.prune(
                    model, pattern=pat, sparsity=0.25, method=m,
                    calib=None if m == "magnitude" else cal, tokenizer=tok, progress=False))
    if kind in ("all", "quant"):
        v["w8a8 dynamic (per-token)"] = ("quant", lambda model, tok, cal: pysparse.replace_linear(model, "w8a8"))
        for obs in ("minmax", "percentile", "mse"):
            v[f"w8a8 static ({obs})"] = ("quant", lambda model, tok, cal, obs=obs: (
                pysparse.calibrate(model, cal, tokenizer=tok, method=obs, progress=False),
                pysparse.replace_linear(model, "w8a8", activation="static")))
        v["w8a8 static asym (minmax)"] = ("quant", lambda model, tok, cal: (
            pysparse.calibrate(model, cal, tokenizer=tok, symmetric=False, progress=False),
            pysparse.replace_linear(model, "w8a8", activation="static")))
        v["smoothquant a=0.85 + w8a8 static asym (minmax)"] = ("quant", lambda model, tok, cal: (
            pysparse.smooth(model, cal, alpha=0.85, tokenizer=tok, progress=False),
            pysparse.calibrate(model, cal, tokenizer=tok, symmetric=False, progress=False),
            pysparse.replace_linear(model, "w8a8", activation="static")))
        for alpha in (0.5, 0.8):
            v[f"smoothquant a={alpha} + w8a8 static (minmax)"] = ("quant", lambda model, tok, cal, a=alpha: (
                pysparse.smooth(model, cal, alpha=a, tokenizer=tok, progress=False),
                pysparse.calibrate(model, cal, tokenizer=tok, method="minmax", progress=False),
                pysparse.replace_linear(model, "w8a8", activation="static")))
        v["smoothquant a=0.5 + w8a8 dynamic"] = ("quant", lambda model, tok, cal: (
            pysparse.smooth(model, cal, alpha=0.5, tokenizer=tok, progress=False),
            pysparse.replace_linear(model, "w8a8")))
        v["w8 (weight-only)"] = ("quant", lambda model, tok, cal: pysparse.replace_linear(model, "w8"))
        v["w4 g128 (weight-only)"] = ("quant", lambda model, tok, cal: pysparse.replace_linear(model, "w4"))
        v["w4 g128 asym gptq"] = ("quant", lambda model, tok, cal: (
            gptq_quantize(model, cal, tok, symmetric=False, progress=False),
            pysparse.replace_linear(model, "w4", symmetric=False)))
        v["w4 g128 asym awq + gptq (act order, mse)"] = ("quant", lambda model, tok, cal: (
            awq_smooth(model, cal, tok, progress=False),
            gptq_quantize(model, cal, tok, symmetric=False, act_order=True, clip="mse",
                          progress=False),
            pysparse.replace_linear(model, "w4", symmetric=False)))
        for m in ("magnitude", "wanda", "sparsegpt"):
            v[f"2:4 {m} + w8a8"] = ("quant", lambda model, tok, cal, m=m: (
                pysparse.prune(model, pattern="2:4", method=m, calib=None if m == "magnitude" else cal,
                               tokenizer=tok, progress=False),
                pysparse.replace_linear(model, "2:4+w8a8")))
    return v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", choices=("all", "prune", "structured", "quant"), default="all")
    ap.add_argument("--eval", type=int, default=256, help="held-out texts")
    ap.add_argument("--calib", type=int, default=128, help="calibration texts")
    ap.add_argument("--match", default=None, help="run only variants whose name contains this")
    ap.add_argument("--md")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base, tok = load_minilm()
    texts = load_descriptions(args.eval + args.calib, seed=0)
    held, cal = texts[:args.eval], texts[args.eval:]
    ref = embed(base, tok, held)
    rows = [dict(name="fp32 (reference)", group="-", cosine=1.0, recall10=1.0,
                 mbytes=model_bytes(base) / 2 ** 20, seconds=0.0)]
    print(f"MiniLM, {len(held)} held-out / {len(cal)} calibration texts, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    for name, (group, fn) in variants(args.only).items():
        if args.match and args.match not in name:
            continue
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn(model, tok, cal)
        except Exception as exc:  # noqa: BLE001 - one broken variant must not hide the others
            rows.append(dict(name=name, group=group, error=f"{type(exc).__name__}: {exc}"))
            print(f"{name:45s} FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        secs = time.perf_counter() - t0
        out = embed(model, tok, held)
        r = dict(name=name, group=group, cosine=cosine_fidelity(ref, out), recall10=recall_at_k(ref, out, 10),
                 mbytes=model_bytes(model) / 2 ** 20, seconds=secs)
        rows.append(r)
        print(f"{name:45s} cosine {r['cosine']:.4f}  recall@10 {r['recall10']:.3f}  "
              f"{r['mbytes']:6.1f} MiB  {secs:6.1f} s", flush=True)
    md = ["| variant | mean cosine | recall@10 | model MiB | compress s |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['name']} | failed: {r['error']} | | | |")
        else:
            md.append(f"| {r['name']} | {r['cosine']:.4f} | {r['recall10']:.3f} | {r['mbytes']:.1f} | "
                      f"{r['seconds']:.1f} |")
    print()
    print("\n".join(md))
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(md) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
