"""Distillation probe (issue: distillation): SparseGPT 2:4 on MiniLM, then pysparse.distill from
the dense teacher on the bundled train texts, then 2:4+w8a8; fidelity (mean cosine, recall@10
vs the fp32 teacher on the 256 held-out texts) after each step.

    .venv/bin/python bench/distill_probe.py STEPS LR BF16(0|1) "LOSSES-DICT"
    e.g. .venv/bin/python bench/distill_probe.py 600 5e-4 1 '{"embedding": 1.0, "hidden": 1.0}'
"""
import ast
import copy
import sys
import tempfile
import time

import pysparse
from pysparse.data import load_descriptions
from pysparse.distill import distill
from pysparse.models import embed, load_minilm
from pysparse.report import cosine_fidelity, recall_at_k


def main(argv):
    steps, lr, bf16 = int(argv[0]), float(argv[1]), argv[2] == "1"
    losses = ast.literal_eval(argv[3])
    teacher, tok = load_minilm()
    recs = load_descriptions(seed=20261122)  # the split pysparse.pipeline.default_texts uses
    held, calib, train = recs[:256], recs[256:384], recs[768:]
    student = copy.deepcopy(teacher)
    pysparse.prune(student, pattern="2:4", method="sparsegpt", calib=calib, tokenizer=tok,
                   progress=False)
    ref = embed(teacher, tok, held)

    def fidelity(m):
        e = embed(m, tok, held)
        return round(cosine_fidelity(ref, e), 5), round(recall_at_k(ref, e, 10), 4)

    print("sparsegpt 2:4 (cosine, recall@10)", fidelity(student), flush=True)
    t0 = time.time()
    res = distill(student, teacher, train, tok, output_dir=tempfile.mkdtemp(prefix="probe-"),
                  max_steps=steps, learning_rate=lr, batch_size=32, bf16=bf16, losses=losses,
                  logging_steps=10, save_steps=10 ** 6, progress=False)
    print(f"distill {res.steps} steps {time.time() - t0:.0f} s, mean losses {res.losses}")
    print("distilled", fidelity(student), flush=True)
    pysparse.replace_linear(student, "2:4+w8a8")
    print("2:4+w8a8", fidelity(student), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
