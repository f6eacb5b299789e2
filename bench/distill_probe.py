"""Distillation probe (issue: distillation): SparseGPT 2:4 on MiniLM, then pysparse.distill from
the dense teacher on the bundled train texts, then 2:4+w8a8; fidelity (mean cosine, recall@10
vs the fp32 teacher on the 256 held-out texts) after each step, and every --eval-every steps.

    .venv/bin/python bench/distill_probe.py --steps 600 --lr 5e-4 --bf16 --no-dropout \\
        --losses '{"embedding": 1.0, "hidden": 1.0}' [--layer-map '[(6, 6)]'] \\
        [--eval-every 200] [--threads 1] [--old-split]

The short proxy of session 7 (4.4 epochs over a quarter of the texts, ~11 min with 1 thread),
which also prints the fidelity on 256 of the training texts (the generalization gap):

    .venv/bin/python bench/distill_probe.py --steps 388 --train-n 2808 --bf16 --no-dropout \\
        --threads 1 --losses '{"embedding": 1.0, "hidden": 6.0}' --hidden-relative
"""
import argparse
import ast
import copy
import random
import tempfile
import time

import torch
from transformers import TrainerCallback

import pysparse
from pysparse.data import load_descriptions
from pysparse.distill import distill
from pysparse.models import embed, load_minilm
from pysparse.pipeline import default_texts
from pysparse.report import cosine_fidelity, recall_at_k


def sparsegpt_student(teacher, tok, held, calib):
    """A SparseGPT 2:4 copy of ``teacher`` (calibrated on ``calib``) and fidelity(model) ->
    (mean cosine, recall@10) vs the teacher on the ``held`` texts."""
    student = copy.deepcopy(teacher)
    pysparse.prune(student, pattern="2:4", method="sparsegpt", calib=calib, tokenizer=tok,
                   progress=False)
    ref = embed(teacher, tok, held)

    def fidelity(m):
        with torch.no_grad():
            e = embed(m, tok, held)
        return round(cosine_fidelity(ref, e), 5), round(recall_at_k(ref, e, 10), 4)

    return student, fidelity


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--losses", default='{"embedding": 1.0, "hidden": 1.0}')
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--no-group", action="store_true")
    ap.add_argument("--no-dropout", action="store_true")
    ap.add_argument("--layer-map", default=None,
                    help="hidden-state layer map, e.g. '[(6, 6)]' (default: every layer)")
    ap.add_argument("--qat-from", type=int, default=0,
                    help="switch the student's linears to W8A8 fake-quant (QAT) from this step")
    ap.add_argument("--ema", default="",
                    help="comma-separated EMA decays of the weights to evaluate too, e.g. 0.99")
    ap.add_argument("--save", default="", help="save the distilled fp32 student state here")
    ap.add_argument("--hidden-relative", action="store_true",
                    help="hidden-state MSE relative to each teacher layer's mean square")
    ap.add_argument("--train-n", type=int, default=0,
                    help="train on N texts of the split (shuffled with seed 1), and also report "
                         "fidelity on the first 256 of them")
    ap.add_argument("--old-split", action="store_true",
                    help="train on the 3232 texts of the first measurements, not the default "
                         "11232-text split of `pysparse compress --distill`")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    teacher, tok = load_minilm()
    if a.old_split:
        recs = load_descriptions(seed=20261122)  # the split pysparse.pipeline.default_texts uses
        held, calib, train = recs[:256], recs[256:384], recs[768:]
    else:  # exactly what `pysparse compress --prune sparsegpt --distill` uses
        held, calib, train = (default_texts("eval", None), default_texts("calib", 128),
                              default_texts("train", None))
    if a.train_n:
        random.Random(1).shuffle(train)
        train = train[:a.train_n]
    student, fidelity = sparsegpt_student(teacher, tok, held, calib)
    seen = train[:256]
    ref_seen = embed(teacher, tok, seen) if a.train_n else None

    def fidelity_seen(m):
        with torch.no_grad():
            e = embed(m, tok, seen)
        return round(cosine_fidelity(ref_seen, e), 5), round(recall_at_k(ref_seen, e, 10), 4)

    t0 = time.time()

    class Every(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if a.eval_every and state.global_step % a.eval_every == 0:
                was = model.training
                model.eval()
                print(f"step {state.global_step} {time.time() - t0:.0f} s", fidelity(model),
                      flush=True)
                model.train(was)

    emas = [float(d) for d in a.ema.split(",") if d]
    shadow = {}

    class QatEma(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if a.qat_from and state.global_step == a.qat_from:
                from pysparse.quant.qat import QATLinear
                from pysparse.replace import linear_layers
                n = 0
                for _, _, _, m, reason in linear_layers(student):
                    if reason is None and type(m) is torch.nn.Linear:
                        m.__class__ = QATLinear
                        n += 1
                print(f"step {state.global_step}: QAT on for {n} linears", flush=True)

        def on_step_end(self, args, state, control, model=None, **kw):
            with torch.no_grad():
                for d in emas:
                    sh = shadow.setdefault(d, {})
                    for name, p in student.named_parameters():
                        if name not in sh:
                            sh[name] = p.detach().float().clone()
                        else:
                            sh[name].lerp_(p.detach().float(), 1 - d)

    print("sparsegpt 2:4 (cosine, recall@10)", fidelity(student), flush=True)
    t0 = time.time()
    res = distill(student, teacher, train, tok, output_dir=tempfile.mkdtemp(prefix="probe-"),
                  max_steps=a.steps, learning_rate=a.lr, batch_size=a.batch, bf16=a.bf16,
                  losses=ast.literal_eval(a.losses), logging_steps=10, save_steps=10 ** 6,
                  progress=False, cache_teacher=not a.no_cache, group_by_length=not a.no_group,
                  dropout=not a.no_dropout, callbacks=[Every(), QatEma()],
                  hidden_relative=a.hidden_relative,
                  layer_map=ast.literal_eval(a.layer_map) if a.layer_map else None)
    print(f"distill {res.steps} steps {time.time() - t0:.0f} s, mean losses {res.losses}, "
          f"cache {res.teacher_cache}")
    if a.save:
        torch.save({k: v for k, v in student.state_dict().items()}, a.save)
    variants = {"final": student}
    for d, sh in shadow.items():
        m = copy.deepcopy(student)
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.copy_(sh[name] * (p != 0))  # the 2:4 zeros stay zero
        variants[f"ema {d}"] = m
    for label, m in variants.items():
        print(label, "distilled", fidelity(m), flush=True)
        if a.train_n:
            print(label, "distilled, on 256 training texts", fidelity_seen(m), flush=True)
        pysparse.replace_linear(m, "2:4+w8a8")
        print(label, "2:4+w8a8", fidelity(m), flush=True)


if __name__ == "__main__":
    main()
