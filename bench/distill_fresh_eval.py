"""Fidelity of compressed MiniLM models on fresh text, with less noise than the 256 evaluation
texts alone (distillation issue).

recall@10 over one pool of 256 texts moves by +-0.005 when the same weights run with other
numerics, and by more from one pool of texts to the next. This script reports, for each saved
model (a `pysparse compress` output directory) or fp32 state dict (`.pt`, then 2:4+w8a8):

* mean cosine and recall@10 vs the fp32 teacher on the 256 evaluation texts of
  `pysparse eval` (the issue's metric);
* on FRESH texts (packages in none of the bundled files): mean cosine, recall@10 within each
  of the consecutive pools of 256 texts and their mean (the same metric, averaged over pools),
  and recall@10 over all of them as one pool.

Build the fresh texts once (Debian machine with apt indices; bench/data/README.md):

    python3 bench/data/build_debian_text.py --target 2048 --per-section 100000 --seed 7 \\
        --exclude pysparse/data/debian_descriptions.jsonl.gz \\
        --exclude pysparse/data/debian_distill.jsonl.gz [--exclude YOUR_TRAIN.jsonl.gz] \\
        --out /tmp/fresh.jsonl.gz
    .venv/bin/python bench/distill_fresh_eval.py --texts /tmp/fresh.jsonl.gz DIR [DIR ...]
"""
import argparse
import copy

import torch

import pysparse
from pysparse.models import embed, load_minilm
from pysparse.pipeline import default_texts, read_texts
from pysparse.report import cosine_fidelity, recall_at_k

POOL = 256


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="pysparse.save directories or fp32 .pt state dicts")
    ap.add_argument("--texts", required=True, help=".jsonl(.gz) / .txt of fresh texts")
    a = ap.parse_args()
    teacher, tok = load_minilm()
    held = default_texts("eval", None)
    fresh, _ = read_texts(a.texts)
    n = len(fresh) // POOL * POOL
    if n == 0:
        raise SystemExit(f"need at least {POOL} fresh texts, got {len(fresh)}")
    fresh = fresh[:n]
    with torch.no_grad():
        ref_h, ref_f = embed(teacher, tok, held), embed(teacher, tok, fresh)

    def report(name, m):
        with torch.no_grad():
            e_h, e_f = embed(m, tok, held), embed(m, tok, fresh)
        pools = [recall_at_k(ref_f[i:i + POOL], e_f[i:i + POOL], 10) for i in range(0, n, POOL)]
        print(f"| {name} | {cosine_fidelity(ref_h, e_h):.5f} | {recall_at_k(ref_h, e_h, 10):.4f} "
              f"| {cosine_fidelity(ref_f, e_f):.5f} | {sum(pools) / len(pools):.4f} "
              f"| {' '.join(f'{p:.3f}' for p in pools)} | {recall_at_k(ref_f, e_f, 10):.4f} |",
              flush=True)

    print(f"| model | eval cosine | eval recall@10 | fresh cosine | fresh recall@10, mean of "
          f"{n // POOL} pools of {POOL} | per pool | one pool of {n} |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for path in a.models:
        if path.endswith(".pt"):
            m = copy.deepcopy(teacher)
            m.load_state_dict(torch.load(path, weights_only=True))
            report(f"{path} (fp32)", m)
            pysparse.replace_linear(m, "2:4+w8a8")
            report(f"{path} (2:4+w8a8)", m)
        else:
            report(path, pysparse.load(path))


if __name__ == "__main__":
    main()
