"""Distillation recipes (issue: distillation) on the bundled MiniLM, each step measured:
fidelity (mean cosine, recall@10 vs the fp32 teacher on the 256 held-out texts), speed
(median forward time of one batch of 32 held-out texts padded to 128 tokens, as a ratio to the
fp32 teacher measured in the same run) and linear-weight bytes.

    .venv/bin/python bench/distill_recipes.py structured share layers classify [--steps 300]
    .venv/bin/python bench/distill_recipes.py --saved DIR ...   # models written by pysparse.save
    .venv/bin/python bench/distill_recipes.py --speed   # speed only, every shape interleaved

* structured: 25% of the heads + 25% of the FFN neurons (Taylor scores) -> distill -> w8a8
* share:      every 2 consecutive blocks tied (mean init) -> distill -> w8a8
* layers:     a 3-layer student (half the blocks removed, Taylor) distilled from the 6-layer
              teacher -> w8a8
* classify:   the teacher fine-tuned for Debian section classification (52 sections) on the
              3232 labelled train texts of the evaluation data file; SparseGPT 2:4 -> distill (logits + hidden) -> 2:4+w8a8; accuracy on
              the 768 texts of the eval + calibration splits (never trained on)
"""
import argparse
import copy
import statistics
import tempfile
import time

import torch

import pysparse
from pysparse.distill import distill, share_layers
from pysparse.models import embed, load_minilm, minilm_path
from pysparse.pipeline import DISTILL_DEFAULTS, default_texts
from pysparse.report import cosine_fidelity, linear_weight_bytes, recall_at_k

# compress --distill's settings, the step count and losses aside (the recipes of this script
# were measured with the plain hidden-state MSE, before compress --distill made it relative)
DISTILL = {**{k: v for k, v in DISTILL_DEFAULTS.items()
              if k not in ("max_steps", "losses", "hidden_relative")},
           "save_steps": 10 ** 6, "logging_steps": 50, "progress": False}


@torch.inference_mode()
def latency(model, batch, reps=7):
    model(**batch)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def embedding_recipes(names, steps, losses, saved=()):
    teacher, tok = load_minilm()
    held, calib, train = (default_texts("eval", None), default_texts("calib", 128),
                          default_texts("train", None))
    ref = embed(teacher, tok, held)
    batch = dict(tok(held[:32], padding="max_length", truncation=True, max_length=128,
                     return_tensors="pt"))
    t_ref = latency(teacher, batch)
    bytes_ref = linear_weight_bytes(teacher)
    print(f"teacher fp32: {t_ref * 1e3:.1f} ms per batch of 32x128, "
          f"{bytes_ref / 2 ** 20:.1f} MiB linear weights", flush=True)

    def report(name, step, m, seconds):
        e = embed(m, tok, held)
        print(f"| {name} | {step} | {cosine_fidelity(ref, e):.4f} | {recall_at_k(ref, e, 10):.3f}"
              f" | {t_ref / latency(m, batch):.2f}x | {linear_weight_bytes(m) / 2 ** 20:.1f} |"
              f" {seconds:.0f} s |", flush=True)

    compressors = {
        "structured": lambda m: (
            pysparse.prune(m, pattern="heads", sparsity=0.25, method="taylor", calib=calib,
                           tokenizer=tok, progress=False),
            pysparse.prune(m, pattern="neurons", sparsity=0.25, method="taylor", calib=calib,
                           tokenizer=tok, progress=False)),
        "share": lambda m: share_layers(m, every=2),
        "layers": lambda m: pysparse.prune(m, pattern="layers", sparsity=0.5, method="taylor",
                                           calib=calib, tokenizer=tok, progress=False),
    }
    print("| recipe | step | cosine | recall@10 | speed vs fp32 | linear MiB | step time |")
    print("|---|---|---|---|---|---|---|")
    for d in saved:
        t0 = time.time()
        m = pysparse.load(d)
        report(d, "pysparse.load", m, time.time() - t0)
    for name in names:
        m = copy.deepcopy(teacher)
        t0 = time.time()
        compressors[name](m)
        report(name, "compress", m, time.time() - t0)
        t0 = time.time()
        res = distill(m, teacher, train, tok, output_dir=tempfile.mkdtemp(prefix="recipe-"),
                      max_steps=steps, losses=losses, **DISTILL)
        report(name, f"distill {res.steps} steps", m, time.time() - t0)
        t0 = time.time()
        pysparse.replace_linear(m, "w8a8")
        report(name, "w8a8", m, time.time() - t0)


def speed_table(rounds=9):
    """Speed of each recipe's model shape (weights as compressed, no training needed: the
    shapes and kernels are what set the time) vs the fp32 teacher, all timed in interleaved
    rounds (medians), so slow drift of the machine cancels out of the ratios."""
    teacher, tok = load_minilm()
    held = default_texts("eval", 32)
    batch = dict(tok(held, padding="max_length", truncation=True, max_length=128,
                     return_tensors="pt"))
    models = {"fp32 teacher": teacher}

    def build(name, fn, scheme):
        m = copy.deepcopy(teacher)
        fn(m)
        models[name] = m
        q = copy.deepcopy(m)
        pysparse.replace_linear(q, scheme)
        models[f"{name} + {scheme}"] = q

    build("SparseGPT 2:4 (magnitude here)", lambda m: pysparse.prune(m, pattern="2:4",
                                                                      progress=False),
          "2:4+w8a8")
    build("25% heads + 25% neurons", lambda m: (
        pysparse.prune(m, pattern="heads", sparsity=0.25, progress=False),
        pysparse.prune(m, pattern="neurons", sparsity=0.25, progress=False)), "w8a8")
    build("2-layer sharing", lambda m: share_layers(m, every=2), "w8a8")
    build("3-layer student", lambda m: pysparse.prune(m, pattern="layers", sparsity=0.5,
                                                      progress=False), "w8a8")
    models["fp32 teacher + w8a8"] = copy.deepcopy(teacher)
    pysparse.replace_linear(models["fp32 teacher + w8a8"], "w8a8")
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            times[k].append(latency(m, batch, reps=3))
    t_ref = statistics.median(times["fp32 teacher"])
    print("| model (batch 32 x 128 tokens, %d threads) | ms | speed vs fp32 |"
          % torch.get_num_threads())
    print("|---|---:|---:|")
    for k, v in times.items():
        t = statistics.median(v)
        print(f"| {k} | {t * 1e3:.0f} | {t_ref / t:.2f}x |", flush=True)


def classify(steps, epochs=4):
    from transformers import AutoModelForSequenceClassification
    _, tok = load_minilm()
    train = default_texts("train", 3232, sections=True)  # the 52 balanced sections' records
    held = default_texts("eval", None, sections=True) + default_texts("calib", None,
                                                                       sections=True)
    names = sorted({s for _, s in train + held})
    lab = {s: i for i, s in enumerate(names)}
    teacher = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=len(names), id2label=dict(enumerate(names)), label2id=lab)

    @torch.inference_mode()
    def accuracy(m):
        m.eval()
        right = 0
        for i in range(0, len(held), 64):
            chunk = held[i:i + 64]
            b = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=128,
                    return_tensors="pt")
            pred = m(**b).logits.argmax(-1).tolist()
            right += sum(p == lab[s] for p, (_, s) in zip(pred, chunk))
        return right / len(held)

    # fine-tune the teacher: AdamW, linear decay, bf16 autocast, batch 32
    t0 = time.time()
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    total = epochs * ((len(train) + 31) // 32)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)
    teacher.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=g).tolist()
        for i in range(0, len(order), 32):
            chunk = [train[j] for j in order[i:i + 32]]
            b = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=128,
                    return_tensors="pt")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = teacher(**b, labels=torch.tensor([lab[s] for _, s in chunk])).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    teacher.eval()
    acc_t = accuracy(teacher)
    print(f"teacher fine-tuned {epochs} epochs in {time.time() - t0:.0f} s: accuracy "
          f"{acc_t:.4f} on {len(held)} held-out texts ({len(names)} sections, chance "
          f"{1 / len(names):.3f})", flush=True)
    student = copy.deepcopy(teacher)
    pysparse.prune(student, pattern="2:4", method="sparsegpt", calib=[t for t, _ in train[:128]],
                   tokenizer=tok, progress=False)
    acc = accuracy(student)
    print(f"sparsegpt 2:4: accuracy {acc:.4f} = {acc / acc_t:.3f} of the teacher", flush=True)
    t0 = time.time()
    res = distill(student, teacher, [(t, lab[s]) for t, s in train], tok,
                  output_dir=tempfile.mkdtemp(prefix="recipe-"), max_steps=steps,
                  losses={"logits": 1.0, "hidden": 1.0}, **DISTILL)
    acc = accuracy(student)
    print(f"distilled {res.steps} steps ({time.time() - t0:.0f} s): accuracy {acc:.4f} = "
          f"{acc / acc_t:.3f} of the teacher", flush=True)
    pysparse.replace_linear(student, "2:4+w8a8")
    acc = accuracy(student)
    print(f"2:4+w8a8: accuracy {acc:.4f} = {acc / acc_t:.3f} of the teacher", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recipes", nargs="*", help="structured share layers classify")
    ap.add_argument("--saved", nargs="*", default=[])
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--losses", default='{"embedding": 1.0, "hidden": 1.0}')
    a = ap.parse_args()
    bad = set(a.recipes) - {"structured", "share", "layers", "classify"}
    if bad:
        ap.error(f"unknown recipe(s) {sorted(bad)}")
    import ast
    if a.speed:
        speed_table()
    emb = [r for r in a.recipes if r != "classify"]
    if emb or a.saved:
        embedding_recipes(emb, a.steps, ast.literal_eval(a.losses), a.saved)
    if "classify" in a.recipes:
        classify(a.steps)


if __name__ == "__main__":
    main()
