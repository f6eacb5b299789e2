"""Structured pruning: attention heads, FFN neurons or whole blocks, physically removed.

The pruned model is smaller (its linear layers shrink) and ``model.config`` describes it, so
``type(model)(model.config)`` builds the same shapes and ``save_pretrained`` /
``from_pretrained`` round-trip. Supported: the BERT family (bert, roberta, xlm-roberta,
camembert), GPT-2 and the Llama family (llama, mistral, qwen2).

What shrinks, per architecture (rows / columns in the [out, in] convention):

============  ===========================================  ======================================
              heads                                        neurons
============  ===========================================  ======================================
BERT          query/key/value rows, attention.output.dense  intermediate.dense rows,
              columns; ``num_attention_heads``,             output.dense columns;
              ``all_head_size``; config ``head_dim``        config ``intermediate_size``
GPT-2         the q, k and v thirds of the fused ``c_attn``  mlp.c_fc outputs, mlp.c_proj inputs
              (Conv1D, [in, out] stored), ``c_proj``        (Conv1D); config ``n_inner``
              inputs; ``num_heads``, ``split_size``;
              config ``head_dim``
Llama         whole kv groups: k/v rows of the group, the   gate/up rows, down columns;
              rows of its query heads, o_proj columns;      ``mlp.intermediate_size``; config
              config ``num_attention_heads``,               ``intermediate_size``
              ``num_key_value_heads``, ``head_dim``
============  ===========================================  ======================================

GQA: a Llama kv group (one k/v head and the query heads that share it) is the unit, so
``sparsity`` is the fraction of kv groups removed; the group size ``num_key_value_groups`` is
unchanged and the KV cache shrinks with the heads. (Removing query heads inside groups would
keep the cache and cannot apply to models without GQA.)

Rebuilding from the config. BERT and GPT-2 derive the head size from ``hidden_size /
num_attention_heads``, which a head-pruned model no longer satisfies, and transformers 5 refuses
(on save and on load) a Llama config whose ``hidden_size`` is not a multiple of
``num_attention_heads`` although Llama builds from ``head_dim``. So head pruning records
``config.head_dim`` and, where the stock classes cannot rebuild the model (always for BERT /
GPT-2; for the Llama family only when that check fails, e.g. 6 of 8 heads at hidden 64), the
model becomes ``<Class>WithPrunedHeads`` and its config ``<Config>WithPrunedHeads`` (subclasses
defined here: the model one builds the recorded shapes, the config one checks the head counts
against each other instead). Then ``type(model)(model.config)`` and
``type(model).from_pretrained(path)`` work, while a stock ``AutoModel.from_pretrained`` of the
checkpoint fails with a clear error instead of loading wrong shapes. Neuron and block pruning
are described by the stock config and keep the stock classes.
"""
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import calib as _calib
from ..replace import LayerResult, Report, is_linear

PATTERNS = ("heads", "neurons", "layers")
METHODS = ("magnitude", "taylor", "random")
_BERT = ("bert", "roberta", "xlm-roberta", "camembert")
_GPT2 = ("gpt2",)
_LLAMA = ("llama", "mistral", "qwen2")
_SUPPORTED = (f"the BERT family ({', '.join(_BERT)}), GPT-2 ({', '.join(_GPT2)}) and the Llama "
              f"family ({', '.join(_LLAMA)})")
_OPTIONS = ("layers", "seed", "loss_fn", "batch_size", "max_length", "include", "exclude",
            "filter_fn")
_WHO = "pysparse.prune_structured"
SUFFIX = "WithPrunedHeads"


@dataclass
class _Part:
    """``width`` consecutive rows (axis 0) or columns (axis 1) per unit, from ``offset``."""

    module: nn.Module
    axis: int
    offset: int
    width: int


@dataclass
class _Group:
    """The prunable units of one attention module or MLP: what they own, how to relabel."""

    name: str
    units: int
    label: str
    parts: list
    owner: nn.Module = None           # module whose size attributes follow the unit count
    attrs: dict = field(default_factory=dict)  # attribute -> elements per unit
    note: str = ""                    # e.g. "2 query heads per kv group"

    def modules(self):
        seen = []
        for p in self.parts:
            if all(p.module is not m for m in seen):
                seen.append(p.module)
        return seen


# ---------------------------------------------------------------------------------------------
# architectures


def _family(model) -> str:
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    for fam, types in (("bert", _BERT), ("gpt2", _GPT2), ("llama", _LLAMA)):
        if mt in types:
            return fam
    raise NotImplementedError(
        f"{_WHO}: {type(model).__name__} (model_type {mt!r}) is not supported; structured "
        f"pruning supports {_SUPPORTED}")


def _blocks(model, fam):
    """(parent, attribute, ModuleList) of the transformer blocks."""
    base = getattr(model, "base_model", model)
    parent, attr = {"bert": (getattr(base, "encoder", None), "layer"), "gpt2": (base, "h"),
                    "llama": (base, "layers")}[fam]
    blocks = getattr(parent, attr, None) if parent is not None else None
    if not isinstance(blocks, nn.ModuleList):
        raise NotImplementedError(f"{_WHO}: {type(model).__name__} does not have the "
                                  f"{fam}-style block list this pass knows")
    return parent, attr, blocks


def _block_names(model, fam):
    parent, attr, blocks = _blocks(model, fam)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    return prefix, blocks


def _head_groups(model, fam):
    prefix, blocks = _block_names(model, fam)
    groups = []
    for i, block in enumerate(blocks):
        name = f"{prefix}.{i}"
        if fam == "bert":
            attns = [("attention", block.attention)]
            if getattr(block, "crossattention", None) is not None:
                attns.append(("crossattention", block.crossattention))
            for sub, attn in attns:
                sa, d = attn.self, attn.self.attention_head_size
                groups.append(_Group(
                    f"{name}.{sub}", sa.num_attention_heads, "heads",
                    [_Part(sa.query, 0, 0, d), _Part(sa.key, 0, 0, d), _Part(sa.value, 0, 0, d),
                     _Part(attn.output.dense, 1, 0, d)],
                    sa, {"num_attention_heads": 1, "all_head_size": d}))
        elif fam == "gpt2":
            if getattr(block, "crossattention", None) is not None:
                raise NotImplementedError(f"{_WHO}: GPT-2 with cross-attention "
                                          f"(add_cross_attention) is not supported for heads")
            a, d = block.attn, block.attn.head_dim
            e = a.split_size
            groups.append(_Group(
                f"{name}.attn", a.num_heads, "heads",
                [_Part(a.c_attn, 0, 0, d), _Part(a.c_attn, 0, e, d), _Part(a.c_attn, 0, 2 * e, d),
                 _Part(a.c_proj, 1, 0, d)],
                a, {"num_heads": 1, "split_size": d}))
        else:
            a, d = block.self_attn, block.self_attn.head_dim
            rep = a.num_key_value_groups
            groups.append(_Group(
                f"{name}.self_attn", _rows(a.k_proj) // d, "kv groups",
                [_Part(a.q_proj, 0, 0, rep * d), _Part(a.k_proj, 0, 0, d),
                 _Part(a.v_proj, 0, 0, d), _Part(a.o_proj, 1, 0, rep * d)],
                note=f"{rep} query head{'s' * (rep > 1)} each"))
    return groups


def _neuron_groups(model, fam):
    prefix, blocks = _block_names(model, fam)
    groups = []
    for i, block in enumerate(blocks):
        name = f"{prefix}.{i}"
        if fam == "bert":
            up, down = block.intermediate.dense, block.output.dense
            groups.append(_Group(f"{name}.intermediate", _rows(up), "neurons",
                                 [_Part(up, 0, 0, 1), _Part(down, 1, 0, 1)]))
        elif fam == "gpt2":
            m = block.mlp
            groups.append(_Group(f"{name}.mlp", _rows(m.c_fc), "neurons",
                                 [_Part(m.c_fc, 0, 0, 1), _Part(m.c_proj, 1, 0, 1)]))
        else:
            m = block.mlp
            groups.append(_Group(f"{name}.mlp", _rows(m.up_proj), "neurons",
                                 [_Part(m.gate_proj, 0, 0, 1), _Part(m.up_proj, 0, 0, 1),
                                  _Part(m.down_proj, 1, 0, 1)],
                                 m, {"intermediate_size": 1}))
    return groups


# ---------------------------------------------------------------------------------------------
# shrinking modules


def _check_linear(module, where):
    if not is_linear(module):
        raise TypeError(f"{_WHO}: {where} is a {type(module).__name__}, not nn.Linear / Conv1D; "
                        f"prune before replace_linear")


def _rows(module):
    """Output features of an nn.Linear / Conv1D."""
    return module.weight.shape[0] if isinstance(module, nn.Linear) else module.weight.shape[1]


def _wview(t, module):
    """[out, in] view of a Linear / Conv1D weight-shaped tensor."""
    return t if isinstance(module, nn.Linear) else t.t()


def _narrow(module, axis, keep):
    """Keep the indices ``keep`` along ``axis`` (0 = outputs, 1 = inputs) of a Linear/Conv1D."""
    linear = isinstance(module, nn.Linear)
    dim = axis if linear else 1 - axis  # Conv1D stores [in, out]
    w = module.weight
    module.weight = nn.Parameter(w.detach().index_select(dim, keep.to(w.device)).contiguous(),
                                 requires_grad=w.requires_grad)
    if axis == 0 and module.bias is not None:
        b = module.bias
        module.bias = nn.Parameter(b.detach().index_select(0, keep.to(b.device)).contiguous(),
                                   requires_grad=b.requires_grad)
    n = int(keep.numel())
    if linear:
        setattr(module, "out_features" if axis == 0 else "in_features", n)
    else:
        setattr(module, "nf" if axis == 0 else "nx", n)


def _keep_units(group, keep_units):
    """Shrink every module of ``group`` to the units ``keep_units`` (sorted) and relabel."""
    keep_units = sorted(int(u) for u in keep_units)
    for module in group.modules():
        for axis in (0, 1):
            parts = [p for p in group.parts if p.module is module and p.axis == axis]
            if not parts:
                continue
            size = module.weight.shape[axis if isinstance(module, nn.Linear) else 1 - axis]
            keep = torch.ones(size, dtype=torch.bool, device="cpu")  # not a device context's
            for p in parts:
                keep[p.offset:p.offset + group.units * p.width] = False
                for u in keep_units:
                    keep[p.offset + u * p.width:p.offset + (u + 1) * p.width] = True
            _narrow(module, axis, keep.nonzero().flatten())
    for attr, per_unit in group.attrs.items():
        setattr(group.owner, attr, per_unit * len(keep_units))
    group.units = len(keep_units)


# ---------------------------------------------------------------------------------------------
# importance


def _unit_scores(group, elem):
    """Sum a per-element score ([out, in] per module, ``elem[id(module)]``) over each unit."""
    total = torch.zeros(group.units, dtype=torch.float64)
    for p in group.parts:
        s = _wview(elem[id(p.module)], p.module).double()
        span = s.narrow(p.axis, p.offset, group.units * p.width)
        if p.axis == 0:
            total += span.reshape(group.units, -1).sum(1).cpu()
        else:
            total += span.reshape(span.shape[0], group.units, p.width).sum((0, 2)).cpu()
    return total


def _is_causal_lm(model):
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _taylor_elem(model, modules, calib, tokenizer, progress, options):
    """Per module: sum over calibration batches of |w * dL/dw| (weight-shaped, fp32)."""
    data = _calib.batches(calib, tokenizer, who=_WHO, batch_size=options.get("batch_size", 8),
                          max_length=options.get("max_length", 128))
    if _is_causal_lm(model) and options.get("loss_fn") is None:
        def with_labels(b):
            if "labels" in b:
                return b
            labels = b["input_ids"].clone()
            if "attention_mask" in b:
                labels = labels.masked_fill(b["attention_mask"] == 0, -100)
            return {**b, "labels": labels}
        data = [with_labels(b) for b in data]
    weights = [m.weight for m in modules]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    saved = [(w, w.grad) for w in weights]
    acc = {id(w): torch.zeros_like(w, dtype=torch.float32) for w in weights}
    handles = []

    def hook(p):
        acc[id(p)] += (p.detach().float() * p.grad.float()).abs()
        p.grad = None

    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
            handles.append(w.register_post_accumulate_grad_hook(hook))
        with torch.enable_grad():
            _calib.run(model, data, desc=f"{_WHO} (taylor)", progress=progress, grad=True,
                       loss_fn=options.get("loss_fn"))
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        for w, g in saved:
            w.grad = g
    return {id(m): acc[id(m.weight)] for m in modules}


def _elem_scores(model, modules, method, calib, tokenizer, progress, options):
    if method == "magnitude":
        return {id(m): m.weight.detach().float().pow(2) for m in modules}
    return _taylor_elem(model, modules, calib, tokenizer, progress, options)


def _importance(model, groups, method, calib, tokenizer, progress, options):
    """One score tensor [units] per group (higher = keep)."""
    if method == "random":
        gen = torch.Generator().manual_seed(int(options.get("seed", 0)))
        return [torch.rand(g.units, generator=gen, dtype=torch.float64) for g in groups]
    modules = []
    for g in groups:
        for m in g.modules():
            if all(m is not x for x in modules):
                modules.append(m)
    elem = _elem_scores(model, modules, method, calib, tokenizer, progress, options)
    scores = [_unit_scores(g, elem) for g in groups]
    return [s.sqrt() for s in scores] if method == "magnitude" else scores


def _lowest(scores, k):
    """Indices of the k lowest scores (ties: the higher index goes first), sorted."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return sorted(order[scores.numel() - k:].tolist())


# ---------------------------------------------------------------------------------------------
# the pruned-heads classes


class _PrunedHeadsConfig:
    """Config mixin of ``<Config>WithPrunedHeads``: transformers 5 validates Llama-style configs
    with ``hidden_size % num_attention_heads == 0``, which a model with explicit ``head_dim``
    and pruned heads need not satisfy. ``validate`` runs every other ``validate_*`` check of
    the config class and checks the head counts against each other instead."""

    def validate(self):
        for name in dir(type(self)):
            if name.startswith("validate_") and name != "validate_architecture":
                check = getattr(self, name)
                if callable(check):
                    check()
        heads = self.num_attention_heads
        kv = getattr(self, "num_key_value_heads", None) or heads
        if not (isinstance(heads, int) and heads > 0 and heads % kv == 0):
            raise ValueError(f"{type(self).__name__}: num_attention_heads={heads} must be a "
                             f"positive multiple of num_key_value_heads={kv}")


class _PrunedHeadsModel:
    """Model mixin of ``<Class>WithPrunedHeads``. BERT and GPT-2 derive the head size from
    ``hidden_size / num_attention_heads``; with ``config.head_dim`` recorded this builds the
    unpruned attention and then narrows it to ``num_attention_heads`` heads of ``head_dim``
    (shapes only: the weights are what ``load_state_dict`` / ``from_pretrained`` bring).
    Llama-family models build their shapes from the config already."""

    def __init__(self, config, *args, **kwargs):
        heads, hd = config.num_attention_heads, getattr(config, "head_dim", None)
        full = None
        if (config.model_type in _BERT + _GPT2 and hd
                and heads * hd != config.hidden_size):
            if config.hidden_size % hd:
                raise ValueError(f"{type(self).__name__}: hidden_size {config.hidden_size} is "
                                 f"not a multiple of head_dim {hd}")
            full = config.hidden_size // hd
            config.num_attention_heads = full  # build the unpruned shapes first
        try:
            super().__init__(config, *args, **kwargs)
        finally:
            config.num_attention_heads = heads
        if full is not None:
            self.config.num_attention_heads = heads
            for g in _head_groups(self, _family(self)):
                _keep_units(g, range(heads))


_CLASSES = {}


def _subclass(base, mixin, **attrs):
    if issubclass(base, mixin):
        return base
    if base not in _CLASSES:
        name = base.__name__ + SUFFIX
        _CLASSES[base] = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name,
                                                     **attrs})
        globals()[name] = _CLASSES[base]
    return _CLASSES[base]


def pruned_heads_class(cls):
    """``<cls>WithPrunedHeads``: the subclass a head-pruned model of class ``cls`` becomes when
    its stock class cannot rebuild it from its config (cached; its ``config_class`` is
    ``<Config>WithPrunedHeads``)."""
    if issubclass(cls, _PrunedHeadsModel):
        return cls
    config_cls = _subclass(cls.config_class, _PrunedHeadsConfig)
    return _subclass(cls, _PrunedHeadsModel, config_class=config_cls)


def __getattr__(name):  # lets pickle find a <Class>WithPrunedHeads in a fresh process
    if name.endswith(SUFFIX):
        import transformers
        base = getattr(transformers, name[:-len(SUFFIX)], None)
        if isinstance(base, type) and hasattr(base, "config_class"):
            return pruned_heads_class(base)
        if isinstance(base, type) and name[:-len(SUFFIX)].endswith("Config"):
            return _subclass(base, _PrunedHeadsConfig)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _config_valid(config):
    try:
        validate = getattr(config, "validate", None)
        if validate is not None:
            validate()
    except Exception:  # noqa: BLE001 - huggingface_hub's StrictDataclassClassValidationError
        return False
    return True


# ---------------------------------------------------------------------------------------------
# the pass


def _count(sparsity, units, label):
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"{_WHO}: sparsity must be a number in (0, 1), got {sparsity!r}") from None
    if not 0.0 < s < 1.0:
        raise ValueError(f"{_WHO}: sparsity must be in (0, 1) (the fraction of {label} to "
                         f"remove), got {sparsity}")
    k = int(round(s * units))
    if k == 0 or k >= units:
        raise ValueError(f"{_WHO}: sparsity={sparsity} of {units} {label} rounds to removing "
                         f"{k}; choose a fraction that removes at least one and keeps at least "
                         f"one")
    return k


def _ids(ids, most=16):
    if len(ids) <= most:
        return str(ids)
    return "[" + ", ".join(map(str, ids[:most // 2])) + f", ... +{len(ids) - most // 2} more]"


def _prune_units(model, fam, pattern, sparsity, method, calib, tokenizer, progress, options,
                 report):
    groups = _head_groups(model, fam) if pattern == "heads" else _neuron_groups(model, fam)
    for g in groups:
        for m in g.modules():
            _check_linear(m, g.name)
    if len({g.units for g in groups}) != 1:
        raise NotImplementedError(f"{_WHO}: the blocks of this model differ in their number of "
                                  f"{groups[0].label}; pysparse keeps one count per model")
    units = groups[0].units
    k = _count(sparsity, units, groups[0].label)
    scores = _importance(model, groups, method, calib, tokenizer, progress, options)
    config = model.config
    head_dim = groups[0].parts[1].width  # heads: the key rows per unit = the head size
    for g, s in zip(groups, scores):
        removed = _lowest(s, k)
        _keep_units(g, [u for u in range(units) if u not in removed])
        out = g.parts[-1].module
        shape = tuple(_wview(out.weight, out).shape)
        note = f" ({g.note})" if g.note else ""
        report.layers.append(LayerResult(g.name, "pruned",
                                         f"{k}/{units} {g.label}{note} {_ids(removed)}",
                                         shape))
    kept = units - k
    if pattern == "neurons":
        setattr(config, "n_inner" if fam == "gpt2" else "intermediate_size", kept)
    else:
        if fam == "llama":
            rep = config.num_attention_heads // config.num_key_value_heads
            config.num_attention_heads, config.num_key_value_heads = kept * rep, kept
        else:
            config.num_attention_heads = kept
        config.head_dim = head_dim
        if fam != "llama" or not _config_valid(config):
            model.__class__ = pruned_heads_class(type(model))
            config.__class__ = model.__class__.config_class
            _register_output_capture(model)


def _register_output_capture(model):
    """transformers 5 records hidden states / attentions (``output_hidden_states=True``) with
    hooks chosen from a registry keyed by the model's class name, filled in ``__init__``; a
    model whose class was swapped in place must be registered under its new name too."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # transformers without output capturing: nothing to register
        return
    _CAN_RECORD_REGISTRY[model] = getattr(model, "_can_record_outputs", None)


def _prune_layers(model, fam, sparsity, method, calib, tokenizer, progress, options, report):
    parent, attr, blocks = _blocks(model, fam)
    prefix, _ = _block_names(model, fam)
    n = len(blocks)
    if fam == "gpt2" and getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise NotImplementedError(f"{_WHO}: GPT-2 with scale_attn_by_inverse_layer_idx scales "
                                  f"attention by the block index; dropping blocks would change "
                                  f"it")
    layers = options.get("layers")
    if layers is not None:
        if sparsity is not None:
            raise ValueError(f"{_WHO}: give layers=[indices] or sparsity=, not both")
        try:
            drop = sorted({int(i) for i in layers})
        except (TypeError, ValueError):
            raise ValueError(f"{_WHO}: layers must be a list of block indices, got "
                             f"{layers!r}") from None
        bad = [i for i in drop if not 0 <= i < n]
        if bad:
            raise ValueError(f"{_WHO}: layers {bad} out of range for {n} blocks")
        if not drop or len(drop) >= n:
            raise ValueError(f"{_WHO}: layers={layers} must remove at least one and keep at "
                             f"least one of {n} blocks")
        how = "given"
    else:
        k = _count(sparsity, n, "blocks")
        lin = [[m for m in block.modules() if is_linear(m)] for block in blocks]
        if method == "random":
            s = torch.rand(n, generator=torch.Generator().manual_seed(
                int(options.get("seed", 0))), dtype=torch.float64)
        else:
            mods = [m for ms in lin for m in ms]
            elem = _elem_scores(model, mods, method, calib, tokenizer, progress, options)
            s = torch.tensor([sum(float(elem[id(m)].double().sum()) for m in ms) for ms in lin],
                             dtype=torch.float64)
        drop = _lowest(s, k)
        how = f"lowest {method} importance"
    keep = [i for i in range(n) if i not in drop]
    new = nn.ModuleList([blocks[i] for i in keep])
    for j, block in enumerate(new):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j
    setattr(parent, attr, new)
    config = model.config
    config.num_hidden_layers = len(keep)
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n:
        config.layer_types = [types[i] for i in keep]
    for i in drop:
        report.layers.append(LayerResult(f"{prefix}.{i}", "pruned",
                                         f"block removed ({how}); {len(keep)}/{n} blocks kept"))


def prune_structured(model, pattern, sparsity, method="magnitude", calib=None, tokenizer=None,
                     progress=True, **options) -> Report:
    """Remove attention heads, FFN neurons or whole blocks from ``model`` (in place).

    pattern: "heads" (the fraction ``sparsity`` of the heads of every attention module — of
    the kv groups for Llama-family models, see the module docstring), "neurons" (that fraction
    of every FFN's intermediate neurons) or "layers" (that fraction of the blocks, or the block
    indices ``layers=[...]`` with ``sparsity=None``). Every block loses the same count, so
    ``model.config`` keeps one number and is updated.

    method: which units go, per block — "magnitude" (L2 norm of the weights a unit owns: its
    q/k/v rows and output-projection columns, or its up/gate rows and down columns; for
    blocks all their linear weights), "taylor" (sum over calibration batches of |w * dL/dw|
    over the same weights; ``calib`` / ``tokenizer`` as in ``pysparse.calib``; the loss is the
    model's own — causal LMs get ``labels=input_ids`` — else ``calib.default_loss``, or
    ``loss_fn=`` (model, batch, outputs) -> loss) or "random" (``seed=``, default 0).

    options: ``layers``, ``seed``, ``loss_fn``, ``batch_size``, ``max_length``. ``include`` /
    ``filter_fn`` are refused (every block is pruned alike); ``exclude`` is accepted and unused.

    Returns a Report with one "pruned" row per attention module / MLP ("3/12 heads [0, 5, 7]",
    shape = the shrunk output projection) or per removed block. Requires_grad flags and
    existing gradients are left as they were. Raises NotImplementedError for other models,
    ValueError for a bad fraction / missing calibration data, before changing anything.
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"{_WHO}: unknown option(s) {', '.join(unknown)}; known: "
                        f"{', '.join(_OPTIONS)}")
    if options.get("include") is not None or options.get("filter_fn") is not None:
        raise ValueError(f"{_WHO}: structured pruning removes the same count from every block "
                         f"(the config holds one number); include= / filter_fn= cannot apply")
    if pattern not in PATTERNS:
        raise ValueError(f"{_WHO}: unknown pattern {pattern!r}; choose one of "
                         f"{', '.join(map(repr, PATTERNS))}")
    if method not in METHODS:
        raise ValueError(f"{_WHO}: unknown method {method!r}; choose one of "
                         f"{', '.join(map(repr, METHODS))}")
    fam = _family(model)
    if method == "taylor" and calib is None and not (pattern == "layers"
                                                     and options.get("layers") is not None):
        raise ValueError(f"{_WHO}: method 'taylor' is data-driven: pass calib= (a list of "
                         f"strings with tokenizer=, or tokenized batches)")
    what = (f"layers={options['layers']}" if pattern == "layers" and options.get("layers")
            is not None else f"sparsity={sparsity}")
    report = Report(f"prune_structured(pattern={pattern!r}, {what}, method={method!r})")
    if pattern == "layers":
        _prune_layers(model, fam, sparsity, method, calib, tokenizer, progress, options, report)
    else:
        _prune_units(model, fam, pattern, sparsity, method, calib, tokenizer, progress, options,
                     report)
    return report


__all__ = ["prune_structured", "pruned_heads_class", "PATTERNS", "METHODS"]
