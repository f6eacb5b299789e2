"""Benchmarks behind `pysparse bench`: our packed linear modules against nn.Linear fp32, and a
whole (compressed) model against the fp32 bundled MiniLM, with the machine they ran on.

``run_kernels``: for each Linear shape (N, K), batch M and scheme, the median time of the packed
module (``pysparse.nn.linear.SCHEMES[scheme].from_linear``) and of an fp32 ``nn.Linear`` of the
same shape, timed interleaved in one loop (noise hits both alike), the speedup, the relative
output error vs fp32, and how close the module gets to its floor:

    floor_s = max(bytes / bandwidth, ops / peak)          fraction_of_floor = floor_s / median_s

bytes = the module's buffers as packed (weights, scales, colsums, bias) + fp32 activations in
and out; ops = 2·M·N·K for dense schemes and M·N·K for 2:4 (half the multiply-adds are
skipped). bandwidth = the best of a large tensor copy (read + write bytes) and a large sum (read
bytes), over buffers well beyond the last-level cache. Each peak is the fastest of a few runs (a
peak is what the machine can do; other work on a shared machine only slows runs down).
peak = a large fp32 matmul (fp32 and 2:4 float rows); for int8 rows the best of
``pysparse._C.int8_peak_gops`` (the kernels' own register-only VNNI loop on every thread) and
``torch._int_mm`` on a 1024² int8 matmul, and only where neither exists 4 × the fp32 peak (VNNI
does 4 int8 multiply-adds per fp32 FMA lane; recorded as "assumed"). 1.0 means at the floor.
The weights are timed warm: a small layer stays in cache between calls, so a shape whose
weights fit in L2/L3 can beat the DRAM bandwidth floor at small M (fraction above 1); large
shapes stream from DRAM.

``run_model``: latency medians at (batch, seq) of real-token batches (every row ``seq`` real
tokens, no padding) of a compressed model directory (``pysparse.load``) or given model, or, with
neither, of the bundled MiniLM under w8a8 and 2:4+w8a8 (magnitude 2:4, as ``pysparse demo``),
each against the fp32 bundled MiniLM timed interleaved, plus embedding fidelity (mean cosine,
recall@10) on held-out Debian descriptions where the output widths match.

Both write ``bench.json``, ``bench.md`` and, when matplotlib is installed, PNG charts
(``speedup_vs_m.png`` and ``floor.png`` for kernels, ``speedup.png`` for a model) to
``out_dir``, and return the result dict with a ``paths`` entry. Nothing here imports matplotlib
or a peer package at import time.
"""
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

KERNEL_SCHEMES = ("w8a8", "2:4+w8a8", "2:4")
DEFAULT_KERNEL_SHAPES = ((384, 384), (1536, 384), (384, 1536))
DEFAULT_MS = (1, 4, 16, 64, 128, 512)
DEFAULT_MODEL_SCHEMES = ("w8a8", "2:4+w8a8")
_INT8_SCHEMES = ("w8a8", "2:4+w8a8")

# -------------------------------------------------------------------------------- machine info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, threads, load, pysparse kernel ISA and package versions."""
    from . import __version__
    from .ops.backends import cpu
    info = {"cpu": cpu_model(), "machine": platform.machine(), "os_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "pysparse": __version__, "torch": torch.__version__}
    try:
        info["loadavg_1m"] = os.getloadavg()[0]  # > threads: other work shared the CPU
    except (OSError, AttributeError):
        info["loadavg_1m"] = None
    if cpu._C is not None:
        native = cpu._C.info()
        info["isa"] = native.get("active_isa")
        info["isa_detected"] = native.get("detected_isa")
        info["native"] = {k: v for k, v in native.items() if isinstance(v, (str, bool, int, float))}
    else:
        info["isa"] = "none (reference backend: pysparse._C not loaded)"
    from importlib import metadata
    info["versions"] = {}
    for dist in ("transformers", "numpy", "matplotlib", "onnxruntime", "openvino", "nncf",
                 "torchao"):
        try:
            info["versions"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info["versions"][dist] = None
    return info


# -------------------------------------------------------------------------------------- timing


def _stats(times):
    times = sorted(times)
    pick = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return {"median": statistics.median(times), "p10": pick(0.1), "p90": pick(0.9),
            "reps": len(times)}


def time_interleaved(fns: dict, budget_s: float, min_reps: int = 3, max_reps: int = 1000,
                     warmup: int = 2) -> dict:
    """name -> {median, p10, p90, reps} seconds. Each round calls every fn once, in turn, so
    load from elsewhere on the machine falls on all of them; rounds continue until budget_s
    has passed (at least min_reps, at most max_reps)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    t_end = time.perf_counter() + budget_s
    n = 0
    while n < min_reps or (time.perf_counter() < t_end and n < max_reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        n += 1
    return {k: _stats(v) for k, v in times.items()}


def _best_s(fn, reps=5):
    """Fastest of reps calls (after one warm-up): a peak is what the machine can do, so the
    run least disturbed by other work is the one to keep."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


# ---------------------------------------------------------------------------------- peak rates


def measure_bandwidth(mib: int = 128) -> dict:
    """Memory bandwidth in GB/s over fp32 buffers of ``mib`` MiB (well beyond L3): ``copy``
    counts read + written bytes of dst.copy_(src), ``read`` the bytes of src.sum(); ``peak``
    is the larger, used for the floors."""
    n = mib * (1 << 20) // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    t_copy = _best_s(lambda: dst.copy_(src))
    t_read = _best_s(lambda: src.sum())
    copy_gbs, read_gbs = 2 * n * 4 / t_copy / 1e9, n * 4 / t_read / 1e9
    return {"copy_gbs": copy_gbs, "read_gbs": read_gbs, "peak_gbs": max(copy_gbs, read_gbs),
            "buffer_mib": mib}


def measure_fp32_peak_gflops(n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2.0 * n ** 3 / _best_s(lambda: torch.mm(a, b), 3) / 1e9


def measure_int8_peak_gops(fp32_peak_gflops: float | None = None, n: int = 1024) -> dict:
    """{"gops", "source", and each measurement}: the best of the pysparse kernels' own VNNI peak
    loop (all threads) and torch._int_mm; 4 × the fp32 peak only when neither is available."""
    out = {}
    from .ops.backends import cpu
    C = cpu._C
    if C is not None and hasattr(C, "int8_peak_gops"):
        try:
            from concurrent.futures import ThreadPoolExecutor
            isa = C.isa_id(C.info()["active_isa"])
            threads = torch.get_num_threads()
            with ThreadPoolExecutor(threads) as ex:  # the binding releases the GIL
                out["pysparse_vnni_loop"] = sum(ex.map(lambda _: C.int8_peak_gops(isa, 0.1),
                                                       range(threads)))
        except Exception:  # noqa: BLE001 - a probe that does not run is just not used
            pass
    if hasattr(torch, "_int_mm"):
        try:
            a = torch.randint(-128, 127, (n, n), dtype=torch.int8)
            b = torch.randint(-128, 127, (n, n), dtype=torch.int8)
            out["torch_int_mm"] = 2.0 * n ** 3 / _best_s(lambda: torch._int_mm(a, b), 3) / 1e9
        except Exception:  # noqa: BLE001
            pass
    if out:
        src = max(out, key=out.get)
        return {"gops": out[src], "source": src, **out}
    if fp32_peak_gflops is None:
        fp32_peak_gflops = measure_fp32_peak_gflops()
    return {"gops": 4.0 * fp32_peak_gflops, "source": "assumed 4 x fp32 peak"}


def measure_peaks() -> dict:
    bw = measure_bandwidth()
    fp32 = measure_fp32_peak_gflops()
    return {"bandwidth": bw, "fp32_gflops": fp32, "int8": measure_int8_peak_gops(fp32)}


# ------------------------------------------------------------------------------------- kernels


def _check_kernel_args(shapes, ms, schemes, budget_s):
    if isinstance(schemes, str):
        schemes = (schemes,)
    schemes = tuple(schemes)
    if not schemes:
        raise ValueError("pysparse.benchmark: schemes is empty; choose from "
                         f"{KERNEL_SCHEMES}")
    for s in schemes:
        if s not in KERNEL_SCHEMES:
            raise ValueError(f"pysparse.benchmark: unknown scheme {s!r}; choose from "
                             f"{KERNEL_SCHEMES}")
    shapes = tuple(tuple(s) for s in shapes)
    if not shapes:
        raise ValueError("pysparse.benchmark: shapes is empty; give (N, K) pairs, "
                         "e.g. ((384, 384),)")
    for s in shapes:
        if len(s) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                  for v in s):
            raise ValueError(f"pysparse.benchmark: a shape must be (N, K) of positive ints, "
                             f"got {s!r}")
        if any(sc.startswith("2:4") for sc in schemes) and s[1] % 4:
            raise ValueError(f"pysparse.benchmark: 2:4 schemes need K (in_features) to be a "
                             f"multiple of 4, got shape (N, K) = {s}")
    ms = tuple(ms)
    if not ms:
        raise ValueError("pysparse.benchmark: ms is empty")
    for m in ms:
        if not isinstance(m, int) or isinstance(m, bool) or m <= 0:
            raise ValueError(f"pysparse.benchmark: every M must be a positive int, got {m!r}")
    if not budget_s > 0:
        raise ValueError(f"pysparse.benchmark: budget_s must be > 0, got {budget_s!r}")
    return shapes, ms, schemes


def _make_modules(N, K, schemes, seed):
    from .formats import sparse24
    from .nn.linear import SCHEMES
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g) * 0.1
    ref = nn.Linear(K, N).eval()
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(b)
    mods = {}
    for scheme in schemes:
        src = ref
        if scheme.startswith("2:4"):
            src = copy.deepcopy(ref)
            with torch.no_grad():
                src.weight.mul_(sparse24.mask_24(src.weight))
        mods[scheme] = (SCHEMES[scheme].from_linear(src).eval(), src)
    return ref, mods


def _nbytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters())
               + list(module.buffers()))


def run_kernels(out_dir, shapes=DEFAULT_KERNEL_SHAPES, ms=DEFAULT_MS, schemes=KERNEL_SCHEMES,
                budget_s=0.2, progress=True, *, peaks=None, seed=0) -> dict:
    """Time each scheme's packed module against nn.Linear fp32 per (N, K) shape and M; write
    bench.json, bench.md and (with matplotlib) speedup_vs_m.png and floor.png to out_dir.

    shapes: (N, K) = (out_features, in_features) pairs; budget_s: seconds of interleaved timing
    per (shape, M) cell; peaks: a ``measure_peaks()`` dict to reuse (measured when None).
    Returns {"kind": "kernels", "machine", "peaks", "rows", "notes", "paths"}; each row has
    shape, N, K, M, scheme, ms/fp32_ms medians (and p10/p90), speedup, floor_ms,
    fraction_of_floor (floor / median; 1.0 = at the floor), fp32_fraction_of_floor, rel_err.
    """
    shapes, ms, schemes = _check_kernel_args(shapes, ms, schemes, budget_s)
    from tqdm.auto import tqdm
    from .ops.backends import cpu
    notes = []
    if cpu._C is None:
        notes.append("pysparse._C not loaded: the packed modules run the reference backend")
    peaks = peaks or measure_peaks()
    bw = peaks["bandwidth"]["peak_gbs"] * 1e9
    fp32_peak = peaks["fp32_gflops"] * 1e9
    int8_peak = peaks["int8"]["gops"] * 1e9
    rows = []
    bar = tqdm(total=len(shapes) * len(ms), disable=not progress, desc="pysparse bench kernels",
               unit="cell")
    with torch.inference_mode():
        for si, (N, K) in enumerate(shapes):
            ref, mods = _make_modules(N, K, schemes, seed + si)
            ref_bytes = _nbytes(ref)
            for M in ms:
                bar.set_postfix_str(f"{N}x{K} M={M}")
                x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed + M))
                fns = {"fp32": lambda: ref(x)}
                for scheme, (mod, _) in mods.items():
                    fns[scheme] = lambda mod=mod: mod(x)
                t = time_interleaved(fns, budget_s)
                act_bytes = 4 * (M * K + M * N)
                fp32_floor = max((ref_bytes + act_bytes) / bw, 2.0 * M * N * K / fp32_peak)
                for scheme, (mod, src) in mods.items():
                    sparse = scheme.startswith("2:4")
                    ops = (1.0 if sparse else 2.0) * M * N * K
                    peak = int8_peak if scheme in _INT8_SCHEMES else fp32_peak
                    nbytes = _nbytes(mod) + act_bytes
                    floor_s = max(nbytes / bw, ops / peak)
                    y_ref = torch.nn.functional.linear(x, src.weight, src.bias)
                    err = float((mod(x) - y_ref).norm() / y_ref.norm().clamp_min(1e-30))
                    med, fmed = t[scheme]["median"], t["fp32"]["median"]
                    rows.append({
                        "shape": f"{N}x{K}", "N": N, "K": K, "M": M, "scheme": scheme,
                        "ms": med * 1e3, "p10_ms": t[scheme]["p10"] * 1e3,
                        "p90_ms": t[scheme]["p90"] * 1e3, "reps": t[scheme]["reps"],
                        "fp32_ms": fmed * 1e3, "fp32_p10_ms": t["fp32"]["p10"] * 1e3,
                        "fp32_p90_ms": t["fp32"]["p90"] * 1e3, "speedup": fmed / med,
                        "weight_bytes": _nbytes(mod), "fp32_weight_bytes": ref_bytes,
                        "bytes": nbytes, "ops": ops,
                        "floor_ms": floor_s * 1e3,
                        "floor_bound": "memory" if nbytes / bw >= ops / peak else "compute",
                        "fraction_of_floor": floor_s / med,
                        "fp32_fraction_of_floor": fp32_floor / fmed,
                        "rel_err": err})
                bar.update(1)
    bar.close()
    result = {"kind": "kernels", "machine": machine_info(), "peaks": peaks,
              "config": {"shapes": [list(s) for s in shapes], "ms": list(ms),
                         "schemes": list(schemes), "budget_s": budget_s, "seed": seed},
              "definitions": {
                  "speedup": "fp32 nn.Linear median / scheme median (same shape, same run)",
                  "fraction_of_floor": "max(bytes / peak bandwidth, ops / peak rate) / median",
                  "bytes": "module buffers as packed + fp32 activations in and out",
                  "ops": "2*M*N*K dense, M*N*K 2:4",
                  "peak rate": "int8 schemes: peaks.int8.gops; 2:4 float and fp32: "
                               "peaks.fp32_gflops",
                  "rel_err": "||y - y_fp32|| / ||y_fp32|| against the fp32 Linear of the same "
                             "(2:4-masked for 2:4 schemes) weight"},
              "rows": rows, "notes": notes}
    return _write(out_dir, result, kernels_markdown(result), _kernel_charts)


def kernels_markdown(result) -> str:
    m, p = result["machine"], result["peaks"]
    lines = [f"pysparse bench kernels: {m['cpu']}, {m['torch_threads']} threads, ISA {m['isa']}, "
             f"torch {m['torch']}; bandwidth {p['bandwidth']['peak_gbs']:.1f} GB/s, fp32 peak "
             f"{p['fp32_gflops']:.0f} GFLOP/s, int8 peak {p['int8']['gops']:.0f} GOP/s "
             f"({p['int8']['source']}); load avg {m.get('loadavg_1m') or 0:.2f}", "",
             "| N×K | M | scheme | ms | fp32 ms | speedup | floor ms | fraction of floor "
             "| fp32 fraction | rel err |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['N']}×{r['K']} | {r['M']} | {r['scheme']} | {r['ms']:.4f} | "
                     f"{r['fp32_ms']:.4f} | {r['speedup']:.2f}× | {r['floor_ms']:.4f} "
                     f"({r['floor_bound']}) | {r['fraction_of_floor']:.2f} | "
                     f"{r['fp32_fraction_of_floor']:.2f} | {r['rel_err']:.2e} |")
    lines += ["", "fraction of floor = max(bytes / bandwidth, ops / peak) / median (1.0 = at "
              "the floor); weights warm, so cache-resident shapes may exceed 1 at small M."]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- model


def full_batch(tok, texts, b, s, return_tensors="pt"):
    """b rows of exactly s real tokens (consecutive texts joined, then truncated): latency of the
    full sequence length, not of padding (the bundled descriptions are mostly shorter than 128
    tokens)."""
    rows, i = [], 0
    for _ in range(b):
        cur = texts[i % len(texts)]
        i += 1
        while len(tok(cur, verbose=False)["input_ids"]) < s:
            cur += " " + texts[i % len(texts)]
            i += 1
        rows.append(cur)
    return dict(tok(rows, padding="max_length", truncation=True, max_length=s,
                    return_tensors=return_tensors))


def _load_dir(model_dir, fallback_tok, notes):
    """(model, tokenizer) from a ``pysparse.save`` directory; the tokenizer from its files, or
    the bundled MiniLM's (with a note) when it was saved without one."""
    try:
        from .io import load
    except ImportError:
        raise RuntimeError("pysparse.benchmark.run_model: pysparse.load is not available in "
                           "this build; pass model= and tokenizer= instead") from None
    model = load(model_dir)
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError):
        tok = fallback_tok
        notes.append(f"{model_dir} has no tokenizer files: used the bundled MiniLM tokenizer")
    return model, tok


def _hidden(model, feed):
    out = model(**feed)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else (
        out[0] if isinstance(out, (tuple, list)) else out)
    return h


def run_model(out_dir, model_dir=None, shapes=((1, 128), (32, 128)), reps=(15, 4),
              progress=True, *, model=None, tokenizer=None, name=None,
              schemes=DEFAULT_MODEL_SCHEMES, n_texts=128, reference=None) -> dict:
    """Latency medians of a compressed model against the fp32 bundled MiniLM, interleaved.

    model_dir: a directory ``pysparse.load`` reads; or pass ``model`` and ``tokenizer``
    (``name`` labels it); with neither, the bundled MiniLM under each of ``schemes`` (2:4
    schemes on a magnitude-2:4-pruned copy, no recovery, like ``pysparse demo``).
    shapes: (batch, seq) pairs of real-token rows; reps: one int or one per shape (rounds of
    interleaved calls). n_texts held-out descriptions (seed 0) give the fidelity columns (mean
    cosine, recall@10 of mean-pooled embeddings vs fp32) when output widths match; 0 skips it.
    reference: (model, tokenizer) of the fp32 baseline, if not the bundled MiniLM (which is
    also what the w8a8 / 2:4+w8a8 variants are built from when neither model_dir nor model is
    given).
    Writes bench.json, bench.md, speedup.png (matplotlib) to out_dir; returns the dict.
    """
    from tqdm.auto import tqdm
    from .data import load_descriptions
    from .models import embed, load_minilm
    from .report import cosine_fidelity, recall_at_k
    shapes = tuple(tuple(s) for s in shapes)
    if not shapes:
        raise ValueError("pysparse.benchmark.run_model: shapes is empty; give (batch, seq) pairs")
    for s in shapes:
        if len(s) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                  for v in s):
            raise ValueError(f"pysparse.benchmark.run_model: a shape must be (batch, seq) of "
                             f"positive ints, got {s!r}")
    reps = (reps,) * len(shapes) if isinstance(reps, int) else tuple(reps)
    if len(reps) != len(shapes) or any(not isinstance(r, int) or r < 1 for r in reps):
        raise ValueError(f"pysparse.benchmark.run_model: reps must be a positive int or one "
                         f"per shape, got {reps!r}")
    if (model is None) != (tokenizer is None):
        raise ValueError("pysparse.benchmark.run_model: pass model and tokenizer together")
    if model is not None and model_dir is not None:
        raise ValueError("pysparse.benchmark.run_model: pass model_dir or model, not both")
    from .nn.linear import SCHEMES as _all_schemes
    if model is None and model_dir is None:
        if isinstance(schemes, str):
            schemes = (schemes,)
        bad = [sc for sc in schemes if sc not in _all_schemes]
        if bad or not schemes:
            raise ValueError(f"pysparse.benchmark.run_model: unknown or no scheme {bad}; choose "
                             f"from {tuple(_all_schemes)}")
    if reference is not None and (not isinstance(reference, (tuple, list))
                                  or len(reference) != 2):
        raise ValueError("pysparse.benchmark.run_model: reference must be (model, tokenizer)")
    base, base_tok = reference if reference is not None else load_minilm()
    base = base.eval()
    notes = []
    variants = {}  # label -> (model, tokenizer)
    if model is not None:
        variants[name or type(model).__name__] = (model.eval(), tokenizer)
    elif model_dir is not None:
        m, t = _load_dir(model_dir, base_tok, notes)
        variants[name or str(model_dir)] = (m.eval(), t)
    else:
        from .prune import prune
        from .replace import replace_linear
        for scheme in schemes:
            m = copy.deepcopy(base)
            if scheme.startswith("2:4"):  # one-shot magnitude 2:4, as `pysparse demo`
                prune(m, pattern="2:4", method="magnitude", progress=False)
            replace_linear(m, scheme)
            label = scheme + (" (magnitude 2:4)" if scheme.startswith("2:4") else "")
            variants[label] = (m.eval(), base_tok)
    texts = load_descriptions(max(n_texts, 64), seed=0)
    ref_label = "fp32 MiniLM" if reference is None else "fp32 reference"
    all_models = {ref_label: (base, base_tok), **variants}
    bar = tqdm(total=len(shapes) + (len(all_models) if n_texts else 0), disable=not progress,
               desc="pysparse bench model", unit="step")
    fid = {}
    with torch.inference_mode():
        if n_texts:
            emb = {}
            for label, (m, t) in all_models.items():
                bar.set_postfix_str(f"fidelity: {label}")
                emb[label] = embed(m, t, texts[:n_texts], batch_size=32, max_length=128)
                bar.update(1)
            ref = emb[ref_label]
            for label in variants:
                if emb[label].shape != ref.shape:
                    notes.append(f"{label}: output width {emb[label].shape[-1]} != the fp32 "
                                 f"reference's {ref.shape[-1]}: no fidelity")
                    continue
                fid[label] = {"cosine": cosine_fidelity(ref, emb[label]),
                              "recall@10": recall_at_k(ref, emb[label], 10)
                              if n_texts > 10 else None}
        lat = {}
        for (b, s), r in zip(shapes, reps):
            bar.set_postfix_str(f"latency b{b} s{s}")
            feeds = {label: full_batch(t, texts, b, s) for label, (_, t) in all_models.items()}
            fns = {label: (lambda m=m, f=feeds[label]: _hidden(m, f))
                   for label, (m, _) in all_models.items()}
            lat[(b, s)] = time_interleaved(fns, budget_s=0.0, min_reps=r, max_reps=r, warmup=1)
            bar.update(1)
    bar.close()
    rows = []
    for label in all_models:
        row = {"model": label, "fidelity": fid.get(label) if label != ref_label else
               {"cosine": 1.0, "recall@10": 1.0}}
        for b, s in shapes:
            t, t0 = lat[(b, s)][label], lat[(b, s)][ref_label]
            row[f"b{b}_s{s}"] = {"median_ms": t["median"] * 1e3, "p10_ms": t["p10"] * 1e3,
                                 "p90_ms": t["p90"] * 1e3, "reps": t["reps"],
                                 "speedup_vs_fp32": t0["median"] / t["median"]}
        rows.append(row)
    result = {"kind": "model", "machine": machine_info(), "model_dir": None if model_dir is None
              else str(model_dir), "shapes": [list(s) for s in shapes], "reps": list(reps),
              "reference": ref_label, "n_texts": n_texts, "rows": rows, "notes": notes}
    return _write(out_dir, result, model_markdown(result), _model_chart)


def model_markdown(result) -> str:
    m = result["machine"]
    shapes = [tuple(s) for s in result["shapes"]]
    lines = [f"pysparse bench model: {m['cpu']}, {m['torch_threads']} threads, ISA {m['isa']}, "
             f"torch {m['torch']}; real-token batches; fidelity on {result['n_texts']} held-out "
             f"descriptions; load avg {m.get('loadavg_1m') or 0:.2f}", "",
             "| model | " + " | ".join(f"b{b} s{s} ms (× fp32)" for b, s in shapes)
             + " | cosine | recall@10 |", "| --- |" + " ---: |" * (len(shapes) + 2)]
    for r in result["rows"]:
        cells = [f"{r[f'b{b}_s{s}']['median_ms']:.1f} ({r[f'b{b}_s{s}']['speedup_vs_fp32']:.2f}×)"
                 for b, s in shapes]
        f = r["fidelity"] or {}
        cos = f"{f['cosine']:.4f}" if f.get("cosine") is not None else "-"
        rec = f"{f['recall@10']:.3f}" if f.get("recall@10") is not None else "-"
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {cos} | {rec} |")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ output, charts


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _kernel_charts(result, out):
    plt = _pyplot()
    if plt is None:
        return None
    rows = result["rows"]
    series = {}
    for r in rows:
        series.setdefault((r["shape"], r["scheme"]), []).append(r)
    paths = []
    for key, fname, ylabel, ref in (
            ("speedup", "speedup_vs_m.png", "speedup over nn.Linear fp32", 1.0),
            ("fraction_of_floor", "floor.png", "fraction of floor (1 = at the floor)", 1.0)):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for (shape, scheme), rs in series.items():
            rs = sorted(rs, key=lambda r: r["M"])
            ax.plot([r["M"] for r in rs], [r[key] for r in rs], marker="o",
                    label=f"{shape} {scheme}")
        if key == "fraction_of_floor":
            fp = {}
            for r in rows:
                fp.setdefault(r["shape"], {})[r["M"]] = r["fp32_fraction_of_floor"]
            for shape, d in fp.items():
                ms = sorted(d)
                ax.plot(ms, [d[m] for m in ms], ls=":", color="grey", lw=1,
                        label=f"{shape} fp32" if len(fp) < 4 else None)
        ax.axhline(ref, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        all_ms = sorted({r["M"] for r in rows})
        ax.set_xticks(all_ms, [str(v) for v in all_ms])
        ax.minorticks_off()
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel(ylabel)
        m = result["machine"]
        ax.set_title(f"pysparse kernels: {m['torch_threads']} threads, {m['isa']}", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths


def _model_chart(result, out):
    plt = _pyplot()
    if plt is None:
        return None
    shapes = [tuple(s) for s in result["shapes"]]
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    w = 0.8 / len(shapes)
    for j, (b, s) in enumerate(shapes):
        ax.bar([i + (j - (len(shapes) - 1) / 2) * w for i in range(len(rows))],
               [r[f"b{b}_s{s}"]["speedup_vs_fp32"] for r in rows], w, label=f"batch {b}, seq {s}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows], fontsize=8)
    ax.set_ylabel(f"speedup over {rows[0]['model']}")
    ax.legend()
    fig.tight_layout()
    path = out / "speedup.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [str(path)]


def _write(out_dir, result, md, chart_fn):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts = chart_fn(result, out)
    if charts is None:
        result["notes"].append("matplotlib not installed: no PNG charts "
                               "(pip install matplotlib)")
        md += f"note: {result['notes'][-1]}\n"
    result["paths"] = {"json": str(out / "bench.json"), "md": str(out / "bench.md"),
                       "charts": charts or []}
    (out / "bench.md").write_text(md)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    return result


__all__ = ["run_kernels", "run_model", "machine_info", "measure_peaks", "measure_bandwidth",
           "measure_fp32_peak_gflops", "measure_int8_peak_gops", "time_interleaved",
           "kernels_markdown", "model_markdown", "KERNEL_SCHEMES"]
