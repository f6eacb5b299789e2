"""`pysparse demo`: the bundled MiniLM under each scheme, on real text, in one table.

For fp32 (the reference), w8a8, 2:4 (magnitude, no recovery) and 2:4+w8a8 it measures linear
weight bytes, latency medians at (batch 1, seq 128) and (batch 32, seq 128) with the speedup
over fp32 measured in the same run, and fidelity against fp32 on bundled Debian package
descriptions: mean cosine of sentence embeddings and nearest-neighbour recall@10.
Writes demo.json and demo.png to the output directory.
"""
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .data import load_descriptions
from .models import embed, load_minilm
from .prune import prune
from .replace import replace_linear
from .report import cosine_fidelity, linear_weight_bytes, recall_at_k

SCHEMES = ("fp32", "w8a8", "2:4", "2:4+w8a8")
SHAPES = ((1, 128), (32, 128))


def build(base, scheme):
    model = copy.deepcopy(base)
    if scheme.startswith("2:4"):
        prune(model, pattern="2:4", method="magnitude")
    if scheme != "fp32":
        replace_linear(model, scheme)
    return model.eval()


@torch.inference_mode()
def latency_ms(model, inputs, reps, warmup=2):
    for _ in range(warmup):
        model(**inputs)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(**inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def _inputs(tok, texts, batch, seq):
    return dict(tok(texts[:batch], padding="max_length", truncation=True, max_length=seq,
                    return_tensors="pt"))


def run(out_dir="pysparse-demo", n_texts=256, reps=(15, 4), progress=True):
    base, tok = load_minilm()
    texts = load_descriptions(n_texts, seed=0)
    fid_batches = -(-n_texts // 32)
    bar = tqdm(total=len(SCHEMES) * (1 + fid_batches + len(SHAPES)), disable=not progress,
               desc="pysparse demo", unit="step")
    rows, ref_emb = [], None
    for scheme in SCHEMES:
        bar.set_postfix_str(f"{scheme}: build")
        model = build(base, scheme)
        bar.update(1)
        bar.set_postfix_str(f"{scheme}: embed {n_texts} texts")
        emb = embed(model, tok, texts, batch_size=32, max_length=128, progress=bar)
        if ref_emb is None:
            ref_emb = emb
        row = {"scheme": scheme, "linear_weight_bytes": linear_weight_bytes(model),
               "cosine": cosine_fidelity(ref_emb, emb), "recall@10": recall_at_k(ref_emb, emb, 10)}
        for (b, s), r in zip(SHAPES, reps):
            bar.set_postfix_str(f"{scheme}: latency b{b} s{s}")
            med, lo, hi = latency_ms(model, _inputs(tok, texts, b, s), r)
            row[f"b{b}_s{s}_ms"] = {"median": med, "min": lo, "max": hi, "reps": r}
            bar.update(1)
        rows.append(row)
        del model
    bar.close()
    for row in rows:
        for b, s in SHAPES:
            key = f"b{b}_s{s}_ms"
            row[f"speedup_b{b}_s{s}"] = rows[0][key]["median"] / row[key]["median"]
    result = {"pysparse": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "processor": _cpu_name(), "isa": _isa(),
              "n_texts": n_texts, "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    chart = _chart(result, out / "demo.png")
    return result, out / "demo.json", chart


def _cpu_name():
    from .benchmark import cpu_model
    return cpu_model()


def _isa():
    from .ops.backends import cpu
    return cpu._C.info()["active_isa"] if cpu._C is not None else "none (reference backend)"


def format_table(result):
    head = (f"{'scheme':<10} {'linear MB':>9} {'b1 s128 ms':>11} {'x fp32':>7} "
            f"{'b32 s128 ms':>12} {'x fp32':>7} {'cosine':>8} {'recall@10':>9}")
    lines = [f"pysparse {result['pysparse']} demo: all-MiniLM-L6-v2 on {result['n_texts']} Debian "
             f"package descriptions; torch {result['torch']}, {result['threads']} threads, "
             f"CPU kernels: {result['isa']}", head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['scheme']:<10} {r['linear_weight_bytes'] / 1e6:>9.2f} "
                     f"{r['b1_s128_ms']['median']:>11.2f} {r['speedup_b1_s128']:>6.2f}x "
                     f"{r['b32_s128_ms']['median']:>12.1f} {r['speedup_b32_s128']:>6.2f}x "
                     f"{r['cosine']:>8.4f} {r['recall@10']:>9.3f}")
    lines.append("2:4 rows are magnitude-pruned with no recovery (distillation is a later step); "
                 "latency is the median of repeated runs, speedups measured in this run.")
    return "\n".join(lines)


def _chart(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    names = [r["scheme"] for r in rows]
    x = range(len(rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    w = 0.38
    a1.bar([i - w / 2 for i in x], [r["speedup_b1_s128"] for r in rows], w, label="batch 1")
    a1.bar([i + w / 2 for i in x], [r["speedup_b32_s128"] for r in rows], w, label="batch 32")
    a1.axhline(1.0, color="grey", lw=0.8)
    a1.set_xticks(list(x), names)
    a1.set_ylabel("speedup over fp32 (seq 128)")
    a1.legend()
    a2.bar([i - w / 2 for i in x], [r["cosine"] for r in rows], w, label="mean cosine")
    a2.bar([i + w / 2 for i in x], [r["recall@10"] for r in rows], w, label="recall@10")
    a2.set_xticks(list(x), names)
    a2.set_ylim(0, 1.05)
    a2.set_ylabel("fidelity vs fp32")
    a2.legend(loc="lower left")
    fig.suptitle(f"pysparse demo: all-MiniLM-L6-v2, {result['threads']} threads, {result['isa']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
