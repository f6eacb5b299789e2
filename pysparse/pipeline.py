"""What ``pysparse compress`` and ``pysparse eval`` do, as library calls.

``compress(model, tokenizer, scheme=..., ...)`` runs a recipe in order (prune -> smooth / AWQ ->
GPTQ -> calibrate -> replace_linear -> replace_attention), each step with its own progress bar,
and returns what every step did and how long it took; ``pysparse compress`` then saves the
result with ``pysparse.save``. ``evaluate(model, tokenizer, texts, reference=..., labels=...)``
measures fidelity against a reference model (mean cosine of sentence embeddings and
nearest-neighbour recall@10) and, with labels, an accuracy: argmax accuracy for a sequence
classification model, otherwise leave-one-out 1-nearest-neighbour accuracy of the embeddings
(for the reference too, so the retention is a like-for-like ratio).

Data files (``--calib FILE``, ``--data FILE``): ``.txt`` (one text per line) or ``.jsonl`` /
``.jsonl.gz`` with a ``"text"`` field per line and an optional ``"label"``. Without a file the
bundled Debian descriptions are used, split so that calibration and evaluation texts never
overlap (``default_texts``).
"""
import gzip
import json
import os
import time
from pathlib import Path

import torch

from .models import embed
from .report import cosine_fidelity, linear_weight_bytes, recall_at_k

SCHEMES = ("fp32", "w8a8", "2:4", "2:4+w8a8", "w8", "w4", "auto")
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "taylor", "random")
_EVAL_SEED, _EVAL_N, _CALIB_N = 20261122, 256, 512
# pysparse.distill settings of `compress --distill` (bench/RESULTS.md has what they give)
# hidden-state loss relative to each teacher layer's mean square, weighted 6 against the
# embedding loss (bench/RESULTS.md, session 7 of the distillation issue)
DISTILL_DEFAULTS = {"max_steps": 1550, "learning_rate": 5e-4, "batch_size": 32,
                    "losses": {"embedding": 1.0, "hidden": 6.0}, "hidden_relative": True,
                    "bf16": True, "dropout": False}
# `compress --distill --qat` (w8a8 schemes): the last quarter of the steps trains with W8A8
# fake-quant (pysparse.distill qat=); measured on the 2:4+w8a8 MiniLM recipe: cosine +0.0007,
# recall@10 unchanged, ~2 min more (bench/RESULTS.md), so it is not on by default
DISTILL_QAT = {"qat": "w8a8", "qat_start": 0.75}


def default_texts(kind: str, n: int | None, sections: bool = False):
    """Bundled Debian descriptions. ``kind="eval"``: the first 256 of one fixed shuffle of
    ``load_descriptions`` (the first ``n`` of them); ``"calib"``: the next 512; ``"train"``
    (for distillation): the rest of that shuffle (3232 texts) followed by the 8000 texts of
    ``load_distill_descriptions`` (other packages): 11232 texts. The three never overlap.
    n=None: all of the kind."""
    from .data import load_descriptions, load_distill_descriptions
    spans = {"eval": (0, _EVAL_N), "calib": (_EVAL_N, _EVAL_N + _CALIB_N), "train":
             (_EVAL_N + _CALIB_N, None)}
    if kind not in spans:
        raise ValueError(f"pysparse: default_texts kind must be one of {sorted(spans)}, got "
                         f"{kind!r}")
    lo, hi = spans[kind]
    recs = load_descriptions(seed=_EVAL_SEED, sections=True)[lo:hi]
    if kind == "train":
        recs = recs + load_distill_descriptions(seed=_EVAL_SEED, sections=True)
    if n is not None:
        if n > len(recs):
            raise ValueError(f"pysparse: the bundled {kind} split has {len(recs)} texts, "
                             f"{n} asked for")
        recs = recs[:n]
    return recs if sections else [t for t, _ in recs]


def read_texts(path) -> tuple[list[str], list | None]:
    """(texts, labels or None) from a .txt / .jsonl / .jsonl.gz file (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pysparse: data file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    texts, labels = [], []
    with opener(path, "rt", encoding="utf-8") as f:
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"pysparse: {path}:{i} is not valid JSON ({exc})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError(f"pysparse: {path}:{i} has no string field 'text'")
                texts.append(rec["text"])
                labels.append(rec.get("label"))
        else:
            texts = [line.rstrip("\n") for line in f if line.strip()]
            labels = [None] * len(texts)
    if not texts:
        raise ValueError(f"pysparse: {path} holds no texts")
    have = [lab is not None for lab in labels]
    if any(have) and not all(have):
        raise ValueError(f"pysparse: {path}: {have.count(False)} of {len(have)} records have no "
                         f"'label' (give every record a label, or none)")
    return texts, (labels if all(have) else None)


def load_model(path=None):
    """(model, tokenizer, source) of a local transformers model directory (offline, fp32, eval);
    ``path=None`` is the bundled MiniLM. The class is the config's first architecture when
    transformers has it, else AutoModel."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    if path is None:
        from .models import minilm_path
        path = minilm_path()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"pysparse: {path} is not a transformers model directory (no "
                                f"config.json); MODEL must be a local directory")
    config = transformers.AutoConfig.from_pretrained(path)
    cls = transformers.AutoModel
    for arch in getattr(config, "architectures", None) or ():
        if isinstance(getattr(transformers, arch, None), type):
            cls = getattr(transformers, arch)
            break
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, tok, str(path.resolve())


def distill_qat(scheme: str, activation: str = "dynamic", smooth=None) -> bool:
    """Whether W8A8 fake-quant during distillation (DISTILL_QAT) trains for the int8 math the
    recipe ends with: the schemes whose int8 math QATLinear reproduces (per-token dynamic
    activations, nothing folded into the weights after distilling)."""
    return scheme in ("w8a8", "2:4+w8a8") and activation == "dynamic" and smooth is None


def _step(log, name, fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    entry = {"step": name, "seconds": round(time.perf_counter() - t0, 2)}
    if hasattr(result, "to_dict"):
        d = result.to_dict()
        counts = {}
        for r in d.get("layers", ()):
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        entry.update(action=d.get("action"), counts=counts, report=d)
    log.append(entry)
    return result


def compress(model, tokenizer, *, scheme: str = "w8a8", prune: str | None = None,
             pattern: str | None = None, sparsity: float | None = None, calib=None,
             activation: str = "dynamic", smooth: float | None = None, awq: bool = False,
             gptq: bool = False, group_size: int = 128, symmetric: bool | None = None,
             attention: bool = False, max_fidelity_loss: float | None = None,
             tokens=None, share: int | None = None, distill: bool = False,
             train=None, distill_options: dict | None = None, progress: bool = True) -> dict:
    """Run the recipe on ``model`` in place; returns {"steps": [...], "bytes": {...}}.

    scheme: one of SCHEMES ("fp32" replaces nothing). prune: a method of ``pysparse.prune``;
    pattern "2:4" (default when the scheme is a 2:4 one, which prunes by magnitude if no method
    is named), another "N:M", "heads" / "neurons" / "layers" (with sparsity=), or None with
    sparsity= for unstructured. calib: texts for the data-driven steps (default: 128 bundled
    descriptions disjoint from the default evaluation texts). activation "static" calibrates
    (asymmetric unless symmetric=True) and uses static W8A8. smooth: SmoothQuant alpha.
    awq / gptq: AWQ scaling and GPTQ for "w4" / "w8". attention: also replace_attention.
    max_fidelity_loss / tokens: options of scheme "auto". share: tie every ``share``
    consecutive blocks (``distill.share_layers``). distill: after pruning / sharing, distill the
    model from a copy of itself as it was before (``pysparse.distill``) on ``train`` texts
    (default: the bundled descriptions outside the evaluation and calibration splits);
    distill_options go to ``pysparse.distill`` over DISTILL_DEFAULTS (e.g. max_steps,
    learning_rate, batch_size; DISTILL_QAT for fake-quant QAT in the last quarter).
    """
    from .prune import prune as _prune_fn
    from .quant.awq import awq_smooth
    from .quant.calibrate import calibrate
    from .quant.gptq import gptq_quantize
    from .quant.smoothquant import smooth as _smooth
    from .replace import replace_attention, replace_linear
    if scheme not in SCHEMES:
        raise ValueError(f"pysparse compress: unknown scheme {scheme!r}; choose one of "
                         f"{', '.join(SCHEMES)}")
    if prune is not None and prune not in PRUNE_METHODS:
        raise ValueError(f"pysparse compress: unknown prune method {prune!r}; choose one of "
                         f"{', '.join(PRUNE_METHODS)}")
    if (awq or gptq) and scheme not in ("w4", "w8"):
        raise ValueError("pysparse compress: --awq / --gptq apply to schemes w4 and w8")
    if activation == "static" and scheme != "w8a8":
        raise ValueError("pysparse compress: --activation static applies to scheme w8a8")
    if smooth is not None and scheme not in ("w8a8", "2:4+w8a8", "w8", "auto"):
        raise ValueError("pysparse compress: --smooth applies to the w8a8 schemes")
    if scheme.startswith("2:4") and pattern is None and sparsity is None:
        pattern = "2:4"
        prune = prune or "magnitude"
    if (pattern is not None or sparsity is not None) and prune is None:
        prune = "magnitude"
    needs_calib = (prune in ("wanda", "sparsegpt", "taylor") or smooth is not None or awq or gptq
                   or activation == "static" or scheme == "auto")
    if needs_calib and calib is None:
        calib = default_texts("calib", 128)
    steps = []
    before = linear_weight_bytes(model)
    teacher = None
    if distill:
        import copy
        teacher = copy.deepcopy(model).eval()
        if train is None:
            train = default_texts("train", None)
    bits = 4 if scheme == "w4" else 8
    sym = (scheme != "w4" and activation != "static") if symmetric is None else symmetric
    if prune is not None:
        kw = dict(pattern=pattern, sparsity=sparsity, method=prune, progress=progress)
        if prune in ("wanda", "sparsegpt", "taylor"):
            kw.update(calib=calib, tokenizer=tokenizer)
        _step(steps, f"prune {prune} {pattern or sparsity}", _prune_fn, model, **kw)
    if share is not None:
        from .distill import share_layers
        _step(steps, f"share every {share}", share_layers, model, every=share)
    if distill:
        import tempfile

        from .distill import distill as _distill
        opts = {"output_dir": tempfile.mkdtemp(prefix="pysparse-distill-"), **DISTILL_DEFAULTS,
                **(distill_options or {})}
        res = _step(steps, "distill", _distill, model, teacher, train, tokenizer,
                    progress=progress, **opts)
        steps[-1].update(distill={k: v for k, v in res.to_dict().items() if k != "history"})
        del teacher
    if smooth is not None:
        _step(steps, f"smooth alpha={smooth}", _smooth, model, calib, alpha=smooth,
              tokenizer=tokenizer, progress=progress)
    if awq:
        _step(steps, "awq", awq_smooth, model, calib, tokenizer, bits=bits,
              group_size=group_size if bits == 4 else None, symmetric=sym, progress=progress)
    if gptq:
        _step(steps, "gptq", gptq_quantize, model, calib, tokenizer, bits=bits,
              group_size=group_size if bits == 4 else None, symmetric=sym,
              act_order=True, clip="mse" if bits == 4 else "minmax", progress=progress)
    if activation == "static":
        _step(steps, "calibrate", calibrate, model, calib, tokenizer, symmetric=sym,
              progress=progress)
    if scheme == "auto":
        opts = {}
        if max_fidelity_loss is not None:
            opts["max_fidelity_loss"] = max_fidelity_loss
        if tokens is not None:
            opts["tokens"] = tokens
        _step(steps, "replace_linear auto", replace_linear, model, "auto", calib=calib,
              tokenizer=tokenizer, progress=progress, **opts)
    elif scheme != "fp32":
        opts = {"group_size": group_size, "symmetric": sym} if scheme == "w4" else {}
        _step(steps, f"replace_linear {scheme}", replace_linear, model, scheme,
              activation=activation, **opts)
    if attention:
        _step(steps, "replace_attention", replace_attention, model)
    return {"steps": steps, "bytes": {"linear_before": before,
                                      "linear_after": linear_weight_bytes(model)}}


@torch.inference_mode()
def _classify(model, tokenizer, texts, batch_size=32, max_length=128):
    preds = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        preds += model(**batch).logits.argmax(-1).tolist()
    return preds


def knn_accuracy(emb: torch.Tensor, labels) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy (cosine) of embeddings against labels."""
    e = torch.nn.functional.normalize(emb.float(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(float("-inf"))
    nn_idx = sim.argmax(-1).tolist()
    return sum(labels[j] == labels[i] for i, j in enumerate(nn_idx)) / len(labels)


def _is_classifier(model):
    cfg = getattr(model, "config", None)
    return type(model).__name__.endswith("ForSequenceClassification") and cfg is not None


def _label_ids(model, labels):
    label2id = {str(k): int(v) for k, v in (model.config.label2id or {}).items()}
    out = []
    for lab in labels:
        if str(lab) in label2id:
            out.append(label2id[str(lab)])
        elif isinstance(lab, int) or (isinstance(lab, str) and lab.isdigit()):
            out.append(int(lab))
        else:
            raise ValueError(f"pysparse eval: label {lab!r} is not one of the model's labels "
                             f"{sorted(label2id)[:8]}")
    return out


def evaluate(model, tokenizer, texts, *, reference=None, labels=None, batch_size=32,
             max_length=128, progress=True) -> dict:
    """Fidelity vs ``reference`` (if given) and accuracy (if ``labels``); module docstring."""
    from tqdm.auto import tqdm
    n = len(texts)
    if n < 2:
        raise ValueError(f"pysparse eval: need at least 2 texts, got {n}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"pysparse eval: {len(labels)} labels for {n} texts")
    result = {"texts": n}
    batches = -(-n // batch_size)
    runs = [("model", model)] + ([("reference", reference)] if reference is not None else [])
    bar = tqdm(total=batches * len(runs), disable=not progress, desc="eval", unit="batch")
    emb = {}
    for name, m in runs:
        emb[name] = embed(m, tokenizer, texts, batch_size, max_length, bar)
    bar.close()
    if reference is not None:
        result["cosine"] = cosine_fidelity(emb["reference"], emb["model"])
        if n > 10:
            result["recall@10"] = recall_at_k(emb["reference"], emb["model"], 10)
    if labels is not None:
        for name, m in runs:
            if _is_classifier(m):
                ids = _label_ids(m, labels)
                pred = _classify(m, tokenizer, texts, batch_size, max_length)
                acc = sum(p == y for p, y in zip(pred, ids)) / n
                kind = "classifier argmax"
            else:
                acc, kind = knn_accuracy(emb[name], labels), "leave-one-out 1-NN of embeddings"
            result[f"accuracy_{name}"] = acc
            result["accuracy_kind"] = kind
        if reference is not None and result["accuracy_reference"] > 0:
            result["accuracy_retention"] = result["accuracy_model"] / result["accuracy_reference"]
    result["linear_weight_bytes"] = linear_weight_bytes(model)
    if reference is not None:
        result["reference_linear_weight_bytes"] = linear_weight_bytes(reference)
    return result
