"""Where the W8A8 step loses fidelity on a distilled 2:4 MiniLM (distillation issue, session 6).

For an fp32 student state (e.g. `bench/distill_probe.py --save S.pt`): fidelity (cosine,
recall@10 vs the fp32 teacher on the 256 evaluation texts) with its weights as they are, with
only one group of linears turned into 2:4+w8a8 kernels (q/k/v, attention output, FFN up, FFN
down), with all of them, and with SmoothQuant (alpha over --alphas) before 2:4+w8a8.

    .venv/bin/python bench/distill_quant_loss.py S.pt [--alphas 0.5,0.8]
"""
import argparse
import copy

import torch

import pysparse
from pysparse.models import embed, load_minilm
from pysparse.pipeline import default_texts
from pysparse.quant.smoothquant import smooth
from pysparse.report import cosine_fidelity, recall_at_k

GROUPS = {
    "q/k/v": lambda n: ".attention.self." in n,
    "attention output": lambda n: ".attention.output." in n,
    "FFN up": lambda n: ".intermediate." in n,
    "FFN down": lambda n: n.endswith(".output.dense") and ".attention." not in n,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("state", help="fp32 state dict (.pt) of a 2:4 student of the bundled MiniLM")
    ap.add_argument("--alphas", default="0.5,0.8")
    a = ap.parse_args()
    teacher, tok = load_minilm()
    held, calib = default_texts("eval", None), default_texts("calib", 128)
    ref = embed(teacher, tok, held)

    def fidelity(m):
        with torch.no_grad():
            e = embed(m, tok, held)
        return f"{cosine_fidelity(ref, e):.5f} / {recall_at_k(ref, e, 10):.4f}"

    student = copy.deepcopy(teacher)
    student.load_state_dict(torch.load(a.state, weights_only=True))
    print("| linears as 2:4+w8a8 | cosine / recall@10 |\n|---|---|")
    print(f"| none (fp32 student) | {fidelity(student)} |")
    for label, pick in GROUPS.items():
        m = copy.deepcopy(student)
        pysparse.replace_linear(m, "2:4+w8a8", filter_fn=lambda mod, name, pick=pick: pick(name))
        print(f"| {label} only | {fidelity(m)} |", flush=True)
    m = copy.deepcopy(student)
    pysparse.replace_linear(m, "2:4+w8a8")
    print(f"| all | {fidelity(m)} |", flush=True)
    for alpha in [float(x) for x in a.alphas.split(",") if x]:
        m = copy.deepcopy(student)
        smooth(m, calib, alpha=alpha, tokenizer=tok, progress=False)
        pysparse.replace_linear(m, "2:4+w8a8")
        print(f"| all, SmoothQuant alpha {alpha} first | {fidelity(m)} |", flush=True)


if __name__ == "__main__":
    main()
