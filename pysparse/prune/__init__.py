"""Pruning front-end: which weights of the linear layers to zero, by which criterion.

Patterns: "N:M" along K (the input dim; "2:4" is what the sparse kernels run), unstructured
``sparsity=`` per layer or over all selected layers at once (``scope="global"``), and the
structured "heads" / "neurons" / "layers" (handed to ``pysparse.prune.structured``).
Criteria: magnitude, random (criteria.py), wanda and taylor (criteria.py, from calibration
data), sparsegpt (sparsegpt.py: second-order updates, block by block through the model).
"""
import numbers
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import calib as _calib
from ..nn.linear import linear_weight
from ..replace import LayerResult, Report, _shape, linear_layers
from . import masks as _masks
from .criteria import scorer as _scorer
from .sparsegpt import prune_sparsegpt, sparsegpt_solve

METHODS = ("magnitude", "random", "wanda", "taylor", "sparsegpt")
DATA_METHODS = ("wanda", "taylor", "sparsegpt")  # need calib=
STRUCTURED = ("heads", "neurons", "layers")
SCOPES = ("layer", "global")
# method_options each method takes (on top of CALIB_OPTIONS for the data-driven ones)
OPTIONS = {"magnitude": {}, "random": {"seed": 0}, "wanda": {}, "taylor": {},
           "sparsegpt": {"blocksize": 128, "percdamp": 0.01, "blocks": None}}
CALIB_OPTIONS = {"min_samples": 8, "batch_size": 8, "max_length": 128}

_WHO = "pysparse.prune"


def _check_sparsity(sparsity):
    if (isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real)
            or not 0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"{_WHO}: sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _check_pattern(pattern):
    nm = _masks.parse_nm(pattern)
    if nm is None:
        raise ValueError(f"{_WHO}: unknown pattern {pattern!r}; choose 'N:M' with 1 <= N < M "
                         f"(e.g. '2:4', the one the sparse kernels run; '4:8'; '1:4') along "
                         f"the input dim, or {' / '.join(map(repr, STRUCTURED))} with "
                         f"sparsity=")
    return nm


def _check_options(method, options):
    allowed = dict(OPTIONS[method])
    if method in DATA_METHODS:
        allowed.update(CALIB_OPTIONS)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{_WHO}: method {method!r} takes no option(s) {', '.join(unknown)}; "
                         f"its options: {', '.join(allowed) or 'none'}")
    allowed.update(options)
    bs = allowed.get("blocksize")
    if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
        raise ValueError(f"{_WHO}: blocksize must be a positive integer, got {bs!r}")
    pd = allowed.get("percdamp")
    if pd is not None and (isinstance(pd, bool) or not isinstance(pd, numbers.Real) or pd < 0):
        raise ValueError(f"{_WHO}: percdamp must be a number >= 0, got {pd!r}")
    return allowed


def _structured(model, pattern, sparsity, method, calib, tokenizer, include, filter_fn, scope,
                loss_fn, progress, options):
    if sparsity is None and not (pattern == "layers" and options.get("layers") is not None):
        raise ValueError(f"{_WHO}: pattern={pattern!r} needs sparsity= (the fraction of "
                         f"{pattern} to remove)")
    unused = [n for n, given in (("include", include is not None),
                                 ("filter_fn", filter_fn is not None),
                                 ("scope", scope != "layer")) if given]
    if unused:
        raise ValueError(f"{_WHO}: structured pruning (pattern={pattern!r}) removes the same "
                         f"count from every block; it does not take {', '.join(unused)}")
    try:
        from .structured import prune_structured
    except ImportError as exc:
        raise NotImplementedError(f"{_WHO}: structured pruning (pattern={pattern!r}) is not "
                                  f"available in this build ({exc})") from exc
    if loss_fn is not None:
        options = {**options, "loss_fn": loss_fn}
    if sparsity is not None:
        sparsity = _check_sparsity(sparsity)
    return prune_structured(model, pattern, sparsity, method=method, calib=calib,
                            tokenizer=tokenizer, progress=progress, **options)


def prune(model: nn.Module, pattern: str | None = None, sparsity: float | None = None,
          method: str = "magnitude", calib=None, tokenizer=None, include=None,
          exclude: Iterable[str] | str | None = ("lm_head",),
          filter_fn: Callable | None = None, *, scope: str = "layer", loss_fn=None,
          progress: bool = True, **method_options) -> Report:
    """Zero weights of every selected linear layer in place; returns a per-layer Report.

    Give exactly one of:
      pattern="N:M"  keep N of every M consecutive weights along K (the input dim), e.g. "2:4"
                     (what the 2:4 kernels need), "4:8", "1:4"; layers whose K is not a
                     multiple of M are skipped (the report says so);
      sparsity=s     unstructured, 0 <= s < 1: per layer (scope="layer"; Wanda compares per
                     output row, as in its paper) or one threshold over all selected layers
                     (scope="global"; not with sparsegpt).
    pattern="heads" / "neurons" / "layers" with sparsity=fraction removes whole attention
    heads / MLP neurons / blocks (``pysparse.prune.structured.prune_structured``, which takes
    its own options, e.g. layers=[...] in place of sparsity).

    method: "magnitude" |w|; "random" (baseline; option seed=0); "wanda" |w| * ||X_j||_2;
    "taylor" |w * dL/dw| (loss_fn(model, batch, outputs) -> scalar, default
    ``pysparse.calib.default_loss``); "sparsegpt" (second-order OBS updates, block by block;
    options blocksize=128, percdamp=0.01, blocks=<path of the nn.ModuleList of blocks>).
    The data-driven methods (wanda, taylor, sparsegpt) need calib (tokenized batches, or a list
    of strings with tokenizer=; see ``pysparse.calib``) with at least min_samples=8 samples;
    batch_size / max_length say how strings are tokenized.
    include/exclude (globs on qualified names) and filter_fn(module, name) select the layers.
    progress=False silences the progress bars.
    """
    if pattern in STRUCTURED:
        return _structured(model, pattern, sparsity, method, calib, tokenizer, include,
                           filter_fn, scope, loss_fn, progress, method_options)
    if method not in METHODS:
        raise ValueError(f"{_WHO}: unknown method {method!r}; choose one of "
                         f"{', '.join(map(repr, METHODS))}")
    if (pattern is None) == (sparsity is None):
        raise ValueError(f'{_WHO}: give exactly one of pattern="N:M" (e.g. "2:4") or '
                         f'sparsity=<fraction in [0, 1)> (both only with pattern="heads" / '
                         f'"neurons" / "layers")')
    nm = _check_pattern(pattern) if pattern is not None else None
    sparsity = _check_sparsity(sparsity) if sparsity is not None else None
    if scope not in SCOPES:
        raise ValueError(f"{_WHO}: unknown scope {scope!r}; choose one of "
                         f"{', '.join(map(repr, SCOPES))}")
    if scope == "global" and nm is not None:
        raise ValueError(f"{_WHO}: scope='global' applies to sparsity=; an N:M pattern is "
                         f"local to every group of M weights")
    if scope == "global" and method == "sparsegpt":
        raise ValueError(f"{_WHO}: scope='global' is not meaningful for sparsegpt (it prunes "
                         f"layer by layer, updating the weights it keeps, so scores of "
                         f"different layers are never comparable); use scope='layer'")
    if loss_fn is not None and method != "taylor":
        raise ValueError(f"{_WHO}: loss_fn is used by method='taylor' only")
    opts = _check_options(method, method_options)

    what = f"pattern={pattern!r}" if pattern is not None else f"sparsity={sparsity}"
    where = ", scope='global'" if scope == "global" else ""
    report = Report(f"prune({what}, method={method!r}{where})")
    entries, layers = [], {}
    for name, _parent, _attr, module, reason in linear_layers(model, include, exclude, filter_fn):
        shape = _shape(module)
        if reason is None and nm is not None and shape[1] % nm[1]:
            reason = (f"in_features={shape[1]} is not a multiple of {nm[1]} ({pattern} groups "
                      f"along K)")
        if reason is None:
            layers[name] = module
        entries.append((name, shape, reason))

    data = None
    if method in DATA_METHODS and layers:
        data = _calib.batches(calib, tokenizer, who=f"{_WHO}(method={method!r})",
                              batch_size=opts["batch_size"], max_length=opts["max_length"],
                              min_samples=opts["min_samples"])
    if not layers:
        notes = {}
    elif method == "sparsegpt":
        notes = prune_sparsegpt(model, layers, data, nm=nm, sparsity=sparsity,
                                    blocksize=opts["blocksize"], percdamp=opts["percdamp"],
                                    blocks=opts["blocks"], progress=progress)
    else:
        notes = _prune_scored(model, layers, data, method, nm, sparsity, scope, loss_fn,
                                  opts, progress)

    for name, shape, reason in entries:
        if reason is not None:
            report.layers.append(LayerResult(name, "skipped", reason, shape))
            continue
        zeros = float((linear_weight(layers[name]) == 0).float().mean())
        note = f" ({notes[name]})" if name in notes else ""
        report.layers.append(LayerResult(name, "pruned", f"{zeros:.1%} zeros{note}", shape))
    return report


def _zero(module, keep):
    w = linear_weight(module)
    w.mul_(keep.to(w.dtype))


def _prune_scored(model, layers, data, method, nm, sparsity, scope, loss_fn, opts, progress):
    """Score-based methods: score every layer, mask, zero in place. Returns name -> note for
    layers the data said nothing about (scored by magnitude)."""
    score, notes = _scorer(method, model, layers, data, loss_fn=loss_fn,
                           seed=opts.get("seed", 0), progress=progress)
    with torch.no_grad():
        local = layers
        if scope == "global":  # one pool; layers scored by the magnitude fallback stay apart
            pooled = [n for n in layers if n not in notes]
            scores = [score(n, layers[n]) for n in pooled]
            for n, keep in zip(pooled, _masks.global_masks(scores, sparsity) if scores else []):
                _zero(layers[n], keep)
            del scores
            local = {n: layers[n] for n in notes}
        for n, module in tqdm(local.items(), desc=f"pruning ({method})", disable=not progress,
                              leave=False):
            s = score(n, module)
            if nm is not None:
                keep = _masks.nm_mask(s, *nm)
            elif method == "wanda" and n not in notes:
                keep = _masks.row_mask(s, sparsity)
            else:
                keep = _masks.unstructured_mask(s, sparsity)
            _zero(module, keep)
    return notes


__all__ = ["prune", "sparsegpt_solve", "METHODS", "DATA_METHODS", "STRUCTURED", "SCOPES"]
