"""``replace_linear(model, scheme="auto")``: pick a scheme per layer from measurements.

For every selected linear layer the candidates are: keep it dense, or one of ``schemes``
(default ``DEFAULT_SCHEMES``) that the layer allows ("2:4" schemes only when its weight is
already 2:4 sparse, "w4" only when in_features is a multiple of 128). Two measurements decide:

* **speed**: every distinct (N, K, M, dtype, scheme, backend) is timed once (median over a few
  repetitions after warm-up, under ``torch.inference_mode``) on a module packed from a *random*
  weight of that shape (a random 2:4 weight for the 2:4 schemes), against an ``nn.Linear`` of
  the same shape and dtype. M is the token count per call the model will run (``tokens=``; a
  tuple of counts sums the times). Timings are cached on disk (``cache_file``) so a second call
  on the same machine times nothing.
* **fidelity**: the relative output error ``||y_q - y|| / ||y||`` of the packed module built from
  the layer's *own* weight, on the layer's real inputs when ``calib=`` (texts with
  ``tokenizer=``, or tokenized batches) is given (captured by forward pre-hooks during a run of
  the unchanged model), else on random N(0, 1) inputs [64, K]. Random inputs ignore the outlier
  channels real activations have, so only the calib measure is meaningful for activation
  quantization (w8a8); pass calib for real use.

A layer gets the fastest candidate whose error is within ``max_fidelity_loss`` and whose time
beats dense by more than ``margin`` (default 5%: timing noise must not pick a "faster" scheme
that is not); otherwise it stays dense. The decision itself is the pure function ``choose``.
"""
import json
import math
import numbers
import os
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calib as _calib
from .formats import sparse24 as _sp24
from .nn.linear import SCHEMES, linear_weight
from .ops.backends import check_usable
from .quant import int4 as _int4
from .replace import LayerResult, Report, _shape, linear_layers, unusable_reason

DEFAULT_SCHEMES = ("w8a8", "2:4+w8a8", "2:4", "w8", "w4")
DENSE = "dense"
DEFAULT_BUDGET = 0.05  # int8 W8A8 layers of MiniLM measure 0.5-3.4% (bench/RESULTS.md)
DEFAULT_MARGIN = 0.05
DEFAULT_TOKENS = 128
RANDOM_ROWS = 64          # random-input fidelity: [64, K] N(0, 1)
MAX_CALIB_ROWS = 4096     # captured input rows kept per layer
TIME_BUDGET_S = 0.01      # per timing: about this long after 2 warm-up calls ...
MIN_REPS, MAX_REPS = 5, 100   # ... and at least / at most this many timed calls
CACHE_ENV = "PYSPARSE_CACHE_DIR"
CACHE_FORMAT = 1
WHO = "pysparse.replace_linear(scheme='auto')"
OPTIONS = ("max_fidelity_loss", "schemes", "tokens", "margin", "calib", "tokenizer", "cache",
           "progress", "batch_size", "max_length", "time_budget")


# ---------------------------------------------------------------------------------- timing

def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).replace("torch.", ""))


def _dtype_of(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        name) or getattr(torch, name)


def timing_key(N, K, M, dtype, scheme, backend) -> str:
    """The cache key "N,K,M,dtype,scheme,backend" (dtype "fp32"/"bf16"/..., backend "auto" for
    None; a non-CPU device is appended to the backend, e.g. "auto@cuda")."""
    if isinstance(dtype, torch.dtype):
        dtype = _dtype_name(dtype)
    return f"{int(N)},{int(K)},{int(M)},{dtype},{scheme},{backend or 'auto'}"


def _build(N, K, dtype, scheme, backend, device):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(K, N, bias=True)
    with torch.no_grad():
        w = torch.randn(N, K, generator=g) / math.sqrt(K)
        if scheme.startswith("2:4"):
            w = w * _sp24.mask_24(w)
        lin.weight.copy_(w)
        lin.bias.copy_(torch.randn(N, generator=g) * 0.1)
    lin = lin.to(device=device, dtype=dtype)
    return (lin if scheme == DENSE else SCHEMES[scheme].from_linear(lin, backend=backend)).eval()


def time_layers(N, K, M, dtype, schemes, backend=None, device="cpu",
                budget_s=TIME_BUDGET_S) -> dict:
    """{scheme: median seconds of one call} of [M, K] -> [M, N] layers: scheme "dense" is an
    nn.Linear (with bias) of that dtype, any other the module ``SCHEMES[scheme]`` packs from a
    random weight (2:4-pruned by magnitude for the 2:4 schemes). The schemes are timed
    *interleaved* (one call of each per round, after two warm-up calls each), for about
    ``budget_s`` per scheme and at least MIN_REPS rounds, so a burst of load from other
    processes hits all of them alike. The tests replace this function to inject timings."""
    mods = {s: _build(N, K, dtype, s, backend, device) for s in schemes}
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(device=device,
                                                                         dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = {s: [] for s in schemes}
    with torch.inference_mode():
        for m in mods.values():
            m(x)
            m(x)
        sync()
        end = time.perf_counter() + budget_s * len(schemes)
        rounds = 0
        while rounds < MIN_REPS or (time.perf_counter() < end and rounds < MAX_REPS):
            for s, m in mods.items():
                t0 = time.perf_counter()
                m(x)
                sync()
                times[s].append(time.perf_counter() - t0)
            rounds += 1
    return {s: statistics.median(t) for s, t in times.items()}


def _cpu_model() -> str:
    from .benchmark import cpu_model
    return cpu_model()


def _sanitize(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", s).strip("_") or "unknown"


def cache_file() -> Path:
    """Where the timings live: ``$PYSPARSE_CACHE_DIR`` (else ``~/.cache/pysparse``) /
    ``auto-<cpu model>-<pysparse version>-torch<version>-<threads>t.json``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "pysparse")
    version = getattr(sys.modules.get("pysparse"), "__version__", "0")
    name = (f"auto-{_sanitize(_cpu_model())}-{_sanitize(str(version))}-torch"
            f"{_sanitize(torch.__version__)}-{torch.get_num_threads()}t.json")
    return Path(root) / name


class TimingCache:
    """{key: median seconds} in a JSON file; a missing file is empty, a corrupt one warns and is
    rebuilt (overwritten on the next save), a read-only place warns and is not written."""

    def __init__(self, path: Path | None):
        self.path = None if path is None else Path(path)
        self.timings = {}
        self.dirty = False
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            timings = data["timings"] if isinstance(data, dict) else None
            if not isinstance(timings, dict) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) and v > 0 for k, v in timings.items()):
                raise ValueError("no valid 'timings' table")
            self.timings = {k: float(v) for k, v in timings.items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"{WHO}: the timing cache {self.path} is unreadable ({exc}); "
                          f"re-measuring and rewriting it")
            self.timings = {}
            self.dirty = True

    def get(self, key):
        return self.timings.get(key)

    def put(self, key, seconds):
        self.timings[key] = float(seconds)
        self.dirty = True

    def save(self):
        if self.path is None or not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "cpu": _cpu_model(),
                                       "torch": torch.__version__,
                                       "threads": torch.get_num_threads(),
                                       "timings": dict(sorted(self.timings.items()))},
                                      indent=1))
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError as exc:
            warnings.warn(f"{WHO}: could not write the timing cache {self.path} ({exc})")


# ---------------------------------------------------------------------------------- choice

@dataclass
class Candidate:
    scheme: str
    time_s: float          # summed over the token counts
    error: float           # relative output error vs the dense layer


@dataclass
class Choice:
    scheme: str            # DENSE or a scheme name
    reason: str
    best: Candidate | None = None   # the fastest within budget (the choice when not dense)


def choose(dense_time: float, candidates, max_fidelity_loss: float = DEFAULT_BUDGET,
           margin: float = DEFAULT_MARGIN) -> Choice:
    """The fastest candidate whose error <= max_fidelity_loss and whose time is below
    dense_time * (1 - margin); DENSE when none is. Pure: no measurement in here."""
    ok = [c for c in candidates if c.error <= max_fidelity_loss]  # NaN error never passes
    ok.sort(key=lambda c: c.time_s)
    limit = dense_time * (1 - margin)
    if ok and ok[0].time_s < limit:
        return Choice(ok[0].scheme, "fastest within budget", ok[0])
    if ok:
        c = ok[0]
        return Choice(DENSE, f"nothing faster within budget; best {c.scheme} "
                             f"{dense_time / c.time_s:.2f}x (err {c.error:.4f}; needs > "
                             f"{1 / (1 - margin):.2f}x)", c)
    if candidates:
        c = min(candidates, key=lambda c: (c.error if c.error == c.error else math.inf))
        return Choice(DENSE, f"no scheme within the error budget {max_fidelity_loss:g}; "
                             f"lowest error {c.scheme} {c.error:.4f}")
    return Choice(DENSE, "no candidate scheme applies to this layer")


# ---------------------------------------------------------------------------------- checks

def _check_args(max_fidelity_loss, schemes, tokens, margin, calib, tokenizer, time_budget):
    if isinstance(max_fidelity_loss, bool) or not isinstance(max_fidelity_loss, (int, float)):
        raise TypeError(f"{WHO}: max_fidelity_loss must be a number (a relative output error "
                        f"per layer, e.g. 0.02), got {max_fidelity_loss!r}")
    if math.isnan(max_fidelity_loss) or max_fidelity_loss < 0:
        raise ValueError(f"{WHO}: max_fidelity_loss must be >= 0 (a relative output error per "
                         f"layer, e.g. 0.02), got {max_fidelity_loss!r}")
    if isinstance(schemes, str):
        schemes = (schemes,)
    schemes = tuple(schemes)
    bad = [s for s in schemes if s not in SCHEMES]
    if bad:
        raise ValueError(f"{WHO}: unknown scheme(s) {', '.join(map(repr, bad))} in schemes=; "
                         f"choose from {', '.join(map(repr, SCHEMES))}")
    if not schemes:
        raise ValueError(f"{WHO}: schemes= is empty; give at least one of "
                         f"{', '.join(map(repr, SCHEMES))}")
    schemes = tuple(dict.fromkeys(schemes))
    tok = (tokens,) if not isinstance(tokens, (tuple, list)) else tuple(tokens)
    if not tok or any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t <= 0
                      for t in tok):
        raise ValueError(f"{WHO}: tokens must be a positive int (tokens per forward call, "
                         f"batch x sequence) or a non-empty tuple of them, got {tokens!r}")
    if (isinstance(margin, bool) or not isinstance(margin, (int, float)) or math.isnan(margin)
            or not 0 <= margin < 1):
        raise ValueError(f"{WHO}: margin must be in [0, 1), got {margin!r}")
    if (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))
            or not time_budget >= 0):
        raise ValueError(f"{WHO}: time_budget must be >= 0 seconds, got {time_budget!r}")
    if calib is None and tokenizer is not None:
        raise ValueError(f"{WHO}: tokenizer= given without calib=; pass calib= texts too")
    return schemes, tuple(int(t) for t in tok)


def _allowed(scheme, module, K) -> str | None:
    """None when ``scheme`` can pack ``module``, else why not."""
    if scheme.startswith("2:4"):
        if K % 4:
            return f"in_features={K} not a multiple of 4"
        if not _sp24.is_24(linear_weight(module)):
            return "weight not 2:4 sparse"
    if scheme == "w4" and K % _int4.DEFAULT_GROUP_SIZE:
        return f"in_features={K} not a multiple of {_int4.DEFAULT_GROUP_SIZE}"
    return None


# ---------------------------------------------------------------------------------- inputs

def _capture(model, names_modules, data, progress):
    """{name: fp32 [rows, K]} of each layer's real (non-padding) inputs, at most MAX_CALIB_ROWS
    rows per layer, from a run of the unchanged model over ``data``."""
    tokens = _calib.TokenMask()
    seen = {name: [] for name in names_modules}
    count = dict.fromkeys(names_modules, 0)

    def pre(name):
        def hook(_module, args):
            if not args or not isinstance(args[0], torch.Tensor) or count[name] >= MAX_CALIB_ROWS:
                return
            x = tokens.select(args[0].detach()).float()[:MAX_CALIB_ROWS - count[name]]
            if x.numel():
                seen[name].append(x.cpu())
                count[name] += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(pre(n)) for n, m in names_modules.items()]
    try:
        with tokens.follow(model):
            _calib.run(model, data, desc="auto: capturing layer inputs", progress=progress)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) if v else None for n, v in seen.items()}


def relative_error(module, packed, x):
    """||packed(x) - module(x)|| / ||module(x)|| (fp32 norms), x in the layer's dtype/device."""
    with torch.inference_mode():
        y = module(x).float()
        yq = packed(x).float()
    den = float(y.norm())
    num = float((yq - y).norm())
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


# ---------------------------------------------------------------------------------- report

@dataclass(repr=False)  # keep Report's readable table as repr
class AutoReport(Report):
    """Report of ``replace_linear(scheme="auto")``: the usual rows (replaced / skipped with the
    measured speedup and error in ``detail``) plus ``choices``, one dict per selected layer with
    every candidate's time and error; ``to_dict()`` includes them."""

    choices: list = field(default_factory=list)

    def to_dict(self):
        d = super().to_dict()
        d["choices"] = self.choices
        return d

    def table(self):
        """One row per selected layer: name, choice, speedup, times (ms), error."""
        return [{k: c[k] for k in ("name", "scheme", "speedup", "time_ms", "dense_ms", "error")}
                for c in self.choices]


def _ms(s):
    return f"{s * 1e3:.3f} ms"


# ---------------------------------------------------------------------------------- entry

def replace_auto(model: nn.Module, *, include=None, exclude=("lm_head",), filter_fn=None,
                 backend=None, activation="dynamic", **options) -> AutoReport:
    """``replace_linear(model, scheme="auto", ...)`` (see the module docstring). Options:

    max_fidelity_loss (0.05): budget on each layer's relative output error ||y_q - y|| / ||y||.
    schemes (DEFAULT_SCHEMES): the candidates besides keeping the layer dense.
    tokens (128): tokens per forward call the model will run (batch x seq), or a tuple of
    them (the sum of the times is minimized).
    margin (0.05): a scheme must be faster than dense time * (1 - margin).
    calib / tokenizer / batch_size (8) / max_length (128): calibration data (``pysparse.calib``)
    whose real layer inputs measure the error; without it random N(0,1) inputs do.
    cache (True): the on-disk timing cache (True: ``cache_file()``; a path; False: none).
    progress (True): tqdm bars. time_budget (0.01): seconds per timing after warm-up.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"{WHO}: unknown option(s) {', '.join(unknown)}; takes "
                        f"{', '.join(OPTIONS)}")
    if activation != "dynamic":
        raise ValueError(f"{WHO}: activation={activation!r} is not supported; auto picks among "
                         f"dynamic schemes")
    budget = options.get("max_fidelity_loss", DEFAULT_BUDGET)
    margin = options.get("margin", DEFAULT_MARGIN)
    calib = options.get("calib")
    tokenizer = options.get("tokenizer")
    progress = options.get("progress", True)
    time_budget = options.get("time_budget", TIME_BUDGET_S)
    schemes, tokens = _check_args(budget, options.get("schemes", DEFAULT_SCHEMES),
                                  options.get("tokens", DEFAULT_TOKENS), margin, calib,
                                  tokenizer, time_budget)
    data = None
    if calib is not None:
        data = _calib.batches(calib, tokenizer, who=WHO, batch_size=options.get("batch_size", 8),
                              max_length=options.get("max_length", 128))
    cache_opt = options.get("cache", True)
    cache = TimingCache(None if cache_opt is False or cache_opt is None
                        else cache_file() if cache_opt is True else Path(cache_opt))

    report = AutoReport(
        f"replace_linear(scheme='auto', max_fidelity_loss={budget:g}, tokens="
        f"{tokens[0] if len(tokens) == 1 else tokens}, "
        f"{'calib' if data is not None else 'random inputs'})")

    # 1. plan: which layers, which candidates
    rows = []   # (name, parent, attr, module, shape, candidates or skip reason)
    for name, parent, attr, module, reason in linear_layers(model, include, exclude, filter_fn):
        shape = _shape(module)
        reason = reason or unusable_reason(module)
        if reason is not None:
            rows.append((name, parent, attr, module, shape, reason))
            continue
        check_usable(backend, module.weight.device)
        cands = [s for s in schemes if _allowed(s, module, shape[1]) is None]
        rows.append((name, parent, attr, module, shape, cands))
    selected = [r for r in rows if not isinstance(r[5], str)]

    # 2. speed: each distinct (N, K, M, dtype, scheme, backend) once
    def bk(module):
        dev = module.weight.device
        return (backend or "auto") + ("" if dev.type == "cpu" else f"@{dev.type}")

    groups = {}  # (N, K, M, dtype, device, backend key) -> schemes to time, interleaved
    for name, parent, attr, module, (N, K), cands in selected:
        w = module.weight
        for M in tokens:
            keys = [timing_key(N, K, M, w.dtype, s, bk(module)) for s in (DENSE, *cands)]
            if any(cache.get(k) is None for k in keys):  # dense again too: compared alike
                group = groups.setdefault((N, K, M, w.dtype, w.device, bk(module)), [DENSE])
                group += [s for s in cands if s not in group]
    try:
        for (N, K, M, dtype, dev, b), group in tqdm(groups.items(), desc="auto: timing",
                                                    disable=not progress, leave=False):
            for s, t in time_layers(N, K, M, dtype, tuple(group), backend, dev,
                                    time_budget).items():
                cache.put(timing_key(N, K, M, dtype, s, b), t)
    finally:
        cache.save()

    def total(module, s):
        N, K = _shape(module)
        return sum(cache.get(timing_key(N, K, M, module.weight.dtype, s, bk(module)))
                   for M in tokens)

    # 3. fidelity on real (calib) or random inputs, and the choice
    inputs = None
    if data is not None and selected:
        inputs = _capture(model, {r[0]: r[3] for r in selected}, data, progress)
    at = "M=" + "+".join(map(str, tokens))
    plan = []
    for name, parent, attr, module, shape, cands in tqdm(rows, desc="auto: fidelity",
                                                         disable=not progress, leave=False):
        if isinstance(cands, str):
            report.layers.append(LayerResult(name, "skipped", cands, shape))
            continue
        w = module.weight
        dense_name = _dtype_name(w.dtype)
        x = inputs.get(name) if inputs is not None else None
        if x is None:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(RANDOM_ROWS, shape[1], generator=g)
        x = x.to(device=w.device, dtype=w.dtype)
        dense_t = total(module, DENSE)
        measured, built = [], {}
        for s in cands:
            packed = SCHEMES[s].from_linear(module, backend=backend).eval()
            err = relative_error(module, packed, x)
            measured.append(Candidate(s, total(module, s), err))
            built[s] = packed
        choice = choose(dense_t, measured, budget, margin)
        entry = {"name": name, "scheme": choice.scheme if choice.scheme != DENSE else dense_name,
                 "dense_ms": dense_t * 1e3, "time_ms": dense_t * 1e3, "speedup": 1.0,
                 "error": 0.0, "reason": choice.reason,
                 "candidates": {c.scheme: {"time_ms": c.time_s * 1e3,
                                           "speedup": dense_t / c.time_s, "error": c.error}
                                for c in measured}}
        if choice.scheme == DENSE:
            report.layers.append(LayerResult(name, "skipped", f"kept {dense_name}: "
                                              f"{choice.reason}", shape))
        else:
            c = choice.best
            entry.update(time_ms=c.time_s * 1e3, speedup=dense_t / c.time_s, error=c.error)
            report.layers.append(LayerResult(
                name, "replaced", f"{c.scheme}: {dense_t / c.time_s:.2f}x vs {dense_name} "
                f"({_ms(c.time_s)} vs {_ms(dense_t)} at {at}), err {c.error:.4f}", shape))
            plan.append((parent, attr, built[c.scheme]))
        report.choices.append(entry)
        del built
    for parent, attr, packed in plan:  # everything measured: now mutate
        setattr(parent, attr, packed)
    return report


__all__ = ["replace_auto", "choose", "Candidate", "Choice", "AutoReport", "time_layers",
           "cache_file", "timing_key", "TimingCache", "DEFAULT_SCHEMES"]
