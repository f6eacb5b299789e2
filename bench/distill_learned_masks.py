"""Learned 2:4 masks during distillation (distillation issue, session 6): does letting the
2:4 pattern move while distilling beat the fixed SparseGPT mask?

SparseGPT 2:4 on MiniLM, then `pysparse.distill` with the settings and split of `pysparse
compress --distill`, except that the pruned weights are not held at zero: every linear weight
is kept dense and used as W * mask(W), mask = the 2 largest |w| of each group of 4 (recomputed
every forward), with a straight-through gradient to all of W (STE). After every optimizer step
the pruned entries shrink by (1 - shrink * lr_t / lr_0) (SR-STE-like, decoupled, so only a
weight with a steady gradient grows past a kept one). Prints fidelity (cosine, recall@10 vs the
fp32 teacher on the 256 evaluation texts) and how many groups changed their mask.

    .venv/bin/python bench/distill_learned_masks.py [--steps 1550] [--shrink 0.01] [--save S.pt]
"""
import argparse
import tempfile
import time

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import TrainerCallback

import pysparse
from distill_probe import sparsegpt_student  # bench/, next to this script
from pysparse.distill import distill
from pysparse.models import load_minilm
from pysparse.pipeline import DISTILL_DEFAULTS, default_texts
from pysparse.replace import linear_layers


def mask24(w):
    g = w.detach().abs().reshape(-1, 4)
    keep = torch.zeros_like(g, dtype=torch.bool)
    return keep.scatter_(1, g.topk(2, dim=1).indices, True).reshape(w.shape)


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, m):
        return w * m

    @staticmethod
    def backward(ctx, g):
        return g, None


class Learned24(nn.Module):
    """Parametrization: forward W * mask24(W), gradient straight through to all of W."""

    def forward(self, w):
        return _STE.apply(w, mask24(w))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=DISTILL_DEFAULTS["max_steps"])
    ap.add_argument("--shrink", type=float, default=0.01)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--save", default="", help="save the distilled fp32 student state here")
    a = ap.parse_args()
    teacher, tok = load_minilm()
    held, calib = default_texts("eval", None), default_texts("calib", 128)
    student, fidelity = sparsegpt_student(teacher, tok, held, calib)
    print("sparsegpt 2:4 (cosine, recall@10)", fidelity(student), flush=True)
    layers = [m for _, _, _, m, reason in linear_layers(student) if reason is None]
    for m in layers:
        parametrize.register_parametrization(m, "weight", Learned24())
    dense = [m.parametrizations.weight.original for m in layers]
    start = [mask24(w) for w in dense]
    groups = sum(w.numel() for w in dense) // 4
    t0 = time.time()

    class Shrink(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, lr_scheduler=None, **kw):
            f = lr_scheduler.get_last_lr()[0] / args.learning_rate
            with torch.no_grad():
                for w in dense if a.shrink else ():
                    w.mul_(torch.where(mask24(w), 1.0, 1.0 - a.shrink * f))
            if a.eval_every and state.global_step % a.eval_every == 0:
                moved = sum(int((mask24(w) != m0).sum()) for w, m0 in zip(dense, start)) // 2
                was = model.training
                model.eval()
                print(f"step {state.global_step} {time.time() - t0:.0f} s: {moved} groups "
                      f"({moved / groups:.2%}) changed mask", fidelity(model), flush=True)
                model.train(was)

    # the losses of session 6, when this probe ran (plain hidden MSE, weight 1)
    opts = {**DISTILL_DEFAULTS, "max_steps": a.steps,
            "losses": {"embedding": 1.0, "hidden": 1.0}, "hidden_relative": False}
    distill(student, teacher, default_texts("train", None), tok,
            output_dir=tempfile.mkdtemp(prefix="learned24-"), progress=False,
            enforce_masks=False, callbacks=[Shrink()], logging_steps=50,
            save_steps=10 ** 6, **opts)
    for m in layers:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    print(f"distilled in {time.time() - t0:.0f} s", fidelity(student), flush=True)
    if a.save:
        torch.save(student.state_dict(), a.save)
    pysparse.replace_linear(student, "2:4+w8a8")
    print("2:4+w8a8", fidelity(student), flush=True)


if __name__ == "__main__":
    main()
