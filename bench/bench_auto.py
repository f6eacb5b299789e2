"""replace_linear(scheme="auto") on the bundled MiniLM vs every single scheme, in one process.

At (batch, seq) = (1, 128) and (32, 128) (auto measured for tokens = 128 and 4096), with 32
calibration texts for auto's fidelity measure and 128 held-out texts for the embedding fidelity:

  fp32                     the model as loaded
  w8a8                     every layer W8A8 (dynamic per-token activations)
  auto                     replace_linear(scheme="auto", tokens=B*S, calib=...) on the dense model
                           (a dense model allows w8a8 / w8 / w4 only)
  2:4+w8a8 (pruned)        a 2:4 magnitude-pruned copy, every layer 2:4+w8a8
  auto (pruned)            auto on the pruned copy (all schemes allowed)

End-to-end latency: median per variant over interleaved rounds (one call of each variant per
round, every row seq real tokens). Fidelity: mean cosine of sentence embeddings vs fp32.
Per layer: auto's chosen scheme, and its measured layer time vs dense (<= dense by design) and
the sum of the 37 layer times against every single scheme's sum (from auto's own timings).

    .venv/bin/python bench/bench_auto.py [--rounds-b1 40] [--rounds-b32 10] [--cache DIR]
"""
import argparse
import collections
import copy
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import pysparse  # noqa: E402
from pysparse import auto  # noqa: E402
from pysparse.benchmark import cpu_model, full_batch  # noqa: E402
from pysparse.data import load_descriptions  # noqa: E402
from pysparse.models import embed, load_minilm  # noqa: E402
from pysparse.report import cosine_fidelity  # noqa: E402

SHAPES = ((1, 128), (32, 128))


def interleaved_ms(models: dict, feed, rounds):
    """{name: median ms} with one call of every model per round (2 warm-up calls each)."""
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(**feed)
            m(**feed)
        for _ in range(rounds):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(**feed)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def family(name):
    for key, short in (("query", "q"), ("key", "k"), ("value", "v"),
                       ("attention.output", "attn-out"), ("intermediate", "ffn-up"),
                       ("output.dense", "ffn-down"), ("pooler", "pooler")):
        if key in name:
            return short
    return name


def summarize(report):
    """'q: w8a8 x6; ...' grouped by layer family."""
    by = collections.defaultdict(collections.Counter)
    for c in report.choices:
        by[family(c["name"])][c["scheme"]] += 1
    return "; ".join(f"{f}: " + ", ".join(f"{s} x{n}" for s, n in cnt.most_common())
                     for f, cnt in by.items())


def layer_sums(report):
    """Summed per-layer ms of auto's choices, of dense, and of each single scheme where every
    layer allows it (from the timings auto measured)."""
    out = {"auto": sum(c["time_ms"] for c in report.choices),
           "fp32": sum(c["dense_ms"] for c in report.choices)}
    schemes = set.intersection(*(set(c["candidates"]) for c in report.choices))
    for s in sorted(schemes):
        out[s] = sum(c["candidates"][s]["time_ms"] for c in report.choices)
    worst = max(c["time_ms"] / c["dense_ms"] for c in report.choices)
    return out, worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds-b1", type=int, default=40)
    ap.add_argument("--rounds-b32", type=int, default=10)
    ap.add_argument("--max-fidelity-loss", type=float, default=0.05)
    ap.add_argument("--cache", help="timing cache dir (default: a fresh temporary one, so "
                                    "auto measures this run)")
    args = ap.parse_args(argv)
    tmp = None
    if args.cache:
        os.environ[auto.CACHE_ENV] = args.cache
    else:
        tmp = tempfile.TemporaryDirectory()
        os.environ[auto.CACHE_ENV] = tmp.name

    base, tok = load_minilm()
    texts = load_descriptions(160, seed=0)
    calib, held = texts[:32], texts[32:]
    ref_emb = embed(base, tok, held)
    pruned = copy.deepcopy(base)
    pysparse.prune(pruned, pattern="2:4", progress=False)

    statics = {"fp32": base}
    m = copy.deepcopy(base)
    pysparse.replace_linear(m, "w8a8")
    statics["w8a8"] = m
    m = copy.deepcopy(pruned)
    pysparse.replace_linear(m, "2:4+w8a8")
    statics["2:4+w8a8 (pruned)"] = m

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu {cpu_model()!r}, max_fidelity_loss={args.max_fidelity_loss}")
    rows = collections.OrderedDict((k, {}) for k in statics)
    fid = {k: cosine_fidelity(ref_emb, embed(v, tok, held)) for k, v in statics.items()}
    notes = []
    for b, s in SHAPES:
        M = b * s
        autos = {}
        for label, src in (("auto", base), ("auto (pruned)", pruned)):
            m = copy.deepcopy(src)
            t0 = time.perf_counter()
            rep = pysparse.replace_linear(m, "auto", tokens=M, calib=calib, tokenizer=tok,
                                          max_fidelity_loss=args.max_fidelity_loss,
                                          progress=False)
            build_s = time.perf_counter() - t0
            name = f"{label} M={M}"
            autos[name] = m
            fid[name] = cosine_fidelity(ref_emb, embed(m, tok, held))
            sums, worst = layer_sums(rep)
            notes.append(f"{name}: built in {build_s:.1f} s; {len(rep.replaced)} replaced, "
                         f"{len(rep.skipped)} kept/skipped; {summarize(rep)}\n"
                         f"    per-layer: worst auto/dense time ratio {worst:.3f} "
                         f"({'<= 1: met' if worst <= 1 else '> 1: NOT met'}); summed layer ms "
                         + ", ".join(f"{k} {v:.2f}" for k, v in sums.items()))
        feed = full_batch(tok, held, b, s)
        models = {**statics, **autos}
        ms = interleaved_ms(models, feed, args.rounds_b1 if b == 1 else args.rounds_b32)
        for k, v in ms.items():
            key = k.replace(f" M={M}", "")
            rows.setdefault(key, {})[(b, s)] = v
            fid.setdefault(key, fid.get(k))
            if k != key:
                fid[f"{key} @b{b}"] = fid.pop(k)

    head = ["variant"] + [f"b{b} s{s} ms (x fp32)" for b, s in SHAPES] + ["cosine (b1 / b32 build)"]
    print("\n| " + " | ".join(head) + " |")
    print("| --- " + "| ---: " * (len(head) - 1) + "|")
    for k, cells in rows.items():
        lat = [f"{cells[sh]:.1f} ({rows['fp32'][sh] / cells[sh]:.2f}x)" if sh in cells else "-"
               for sh in SHAPES]
        if k.startswith("auto"):
            cos = f"{fid[f'{k} @b1']:.4f} / {fid[f'{k} @b32']:.4f}"
        else:
            cos = f"{fid[k]:.4f}"
        print(f"| {k} | " + " | ".join(lat) + f" | {cos} |")
    print()
    for n in notes:
        print("-", n)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
