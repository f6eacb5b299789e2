"""MiniLM end to end with and without `replace_attention`, interleaved A/B.

The effect of the fused attention on the whole model is a few percent, below the run-to-run
noise of this 2-vCPU machine when the variants are timed one after another (bench_minilm.py).
Here each round times every variant once, in turn, so slow phases of the host hit all of them;
the table gives the median over rounds and the ratio without / with the fused attention.
Rows hold exactly `seq` real tokens (no padding).

    .venv/bin/python bench/bench_minilm_attention.py [--rounds 8]
"""
import argparse
import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import pysparse  # noqa: E402
from bench_minilm import _full_batch  # noqa: E402
from pysparse.data import load_descriptions  # noqa: E402
from pysparse.models import load_minilm  # noqa: E402

SHAPES = ((1, 128), (8, 128), (32, 128), (1, 512), (4, 512))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args(argv)
    base, tok = load_minilm()
    texts = load_descriptions(128, seed=0)
    w8a8 = copy.deepcopy(base)
    pysparse.replace_linear(w8a8, "w8a8")
    pairs = {
        "fp32": (base, pysparse.replace_attention(copy.deepcopy(base))),
        "w8a8": (w8a8, pysparse.replace_attention(copy.deepcopy(w8a8))),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print("| linear | shape | sdpa ms | + replace_attention ms | speedup |")
    print("| --- | --- | ---: | ---: | ---: |")
    for b, s in SHAPES:
        feed = {k: torch.as_tensor(v) for k, v in _full_batch(tok, texts, b, s).items()}
        times = {(n, i): [] for n in pairs for i in (0, 1)}
        with torch.inference_mode():
            for n, ms in pairs.items():
                for m in ms:
                    m(**feed)
            for _ in range(args.rounds):
                for n, ms in pairs.items():
                    for i, m in enumerate(ms):
                        t0 = time.perf_counter()
                        m(**feed)
                        times[(n, i)].append(time.perf_counter() - t0)
        for n in pairs:
            a, c = (sorted(times[(n, i)])[len(times[(n, i)]) // 2] * 1e3 for i in (0, 1))
            print(f"| {n} | b{b} s{s} | {a:.1f} | {c:.1f} | {a / c:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
