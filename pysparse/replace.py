"""The module walker behind replace_linear and prune, and the per-layer report they return.

One walker (``linear_layers``) finds every nn.Linear / transformers Conv1D with its qualified
name and applies the include/exclude globs and ``filter_fn``; front-ends only decide what to do
with each layer. A pattern matches a name when it matches the whole qualified name or a dotted
suffix of it, so ``"lm_head"`` matches ``lm_head`` and ``model.lm_head``.
"""
import inspect
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Callable, Iterable

import torch
from torch import nn

from .formats import sparse24 as _sp24
from .nn.linear import SCHEMES, STATIC_SCHEMES
from .ops.backends import check_usable
from .quant import int4 as _int4
from .quant import state as _qstate


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight"))


def _matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        patterns = (patterns,)
    return any(fnmatchcase(name, p) or fnmatchcase(name, "*." + p) for p in patterns)


@dataclass
class LayerResult:
    name: str
    status: str  # "replaced" | "skipped" | "pruned"
    detail: str
    shape: tuple = ()


@dataclass
class Report:
    """What a pass did to each linear layer. ``str(report)`` is a readable table."""

    action: str
    layers: list = field(default_factory=list)

    @property
    def replaced(self):
        return [r for r in self.layers if r.status == "replaced"]

    @property
    def pruned(self):
        return [r for r in self.layers if r.status == "pruned"]

    @property
    def skipped(self):
        return [r for r in self.layers if r.status == "skipped"]

    def to_dict(self):
        return {"action": self.action,
                "layers": [{"name": r.name, "status": r.status, "detail": r.detail,
                            "shape": list(r.shape)} for r in self.layers]}

    def __str__(self):
        counts = {}
        for r in self.layers:
            counts[r.status] = counts.get(r.status, 0) + 1
        head = f"{self.action}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
        width = max([len(r.name) for r in self.layers] + [5])
        rows = [f"  {r.name:<{width}}  {r.status:<8}  {'x'.join(map(str, r.shape)):<11}  {r.detail}"
                for r in self.layers]
        return "\n".join([head, *rows])

    __repr__ = __str__


def linear_layers(model: nn.Module, include=None, exclude=("lm_head",),
                  filter_fn: Callable | None = None):
    """Yield (name, parent, attr, module, skip_reason) for every linear layer of ``model``.

    skip_reason is None for layers selected by include/exclude/filter_fn.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pysparse: expected a torch.nn.Module, got {type(model).__name__}")
    exclude = () if exclude is None else exclude
    for name, module in model.named_modules():
        if not is_linear(module) or not name:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        reason = None
        if include is not None and not _matches(name, include):
            reason = "not matched by include"
        elif _matches(name, exclude):
            reason = "excluded by pattern"
        elif filter_fn is not None and not filter_fn(module, name):
            reason = "filter_fn returned False"
        yield name, parent, attr, module, reason


def unusable_reason(module):
    """Why a selected linear layer cannot be packed at all (not float, on the meta device), or
    None."""
    if not module.weight.is_floating_point():
        return f"weight dtype {module.weight.dtype} is not floating point"
    if module.weight.device.type == "meta":
        return "weight is on the meta device (not materialized)"
    return None


def _shape(module):
    w = module.weight
    return tuple(w.shape) if isinstance(module, nn.Linear) else tuple(w.shape[::-1])


def replace_linear(model: nn.Module, scheme: str = "w8a8", *, include=None,
                   exclude: Iterable[str] | str | None = ("lm_head",),
                   filter_fn: Callable | None = None, backend: str | None = None,
                   activation: str = "dynamic", **options) -> Report:
    """Swap every selected nn.Linear / Conv1D of ``model`` (in place) for a packed module.

    scheme: "w8a8" (int8 weight per channel x int8 activation per token), "2:4" (2:4 sparse,
    the layer's float dtype), "2:4+w8a8", "w8" (weight-only int8 per channel) or "w4"
    (weight-only int4 group-wise; options ``group_size=128``, ``symmetric=True``,
    ``method="minmax"|"mse"``; layers whose in_features is not a multiple of group_size are
    skipped with the reason).
    activation: "dynamic" (per-token scales at run time, the default) or "static" (scheme
    "w8a8" only: one per-tensor scale per layer recorded by ``pysparse.calibrate``; a layer
    without one raises). include/exclude: glob patterns on qualified names;
    filter_fn(module, name) -> bool. backend: None (auto), "cpu" or "reference".
    Returns a Report listing every linear layer as replaced or skipped (with the reason).
    Validates every selected layer before changing any, so an error leaves the model untouched.
    scheme="auto": per layer, the fastest scheme (or dense) within ``max_fidelity_loss`` (default
    0.05 relative output error), measured on this machine; see ``pysparse.auto.replace_auto``.
    """
    if scheme == "auto":
        from .auto import replace_auto
        return replace_auto(model, include=include, exclude=exclude, filter_fn=filter_fn,
                            backend=backend, activation=activation, **options)
    if scheme not in SCHEMES:
        raise ValueError(f"pysparse.replace_linear: unknown scheme {scheme!r}; choose one of "
                         f"{', '.join(map(repr, SCHEMES))}")
    if activation not in ("dynamic", "static"):
        raise ValueError(f"pysparse.replace_linear: activation must be 'dynamic' or 'static', "
                         f"got {activation!r}")
    if activation == "static" and scheme not in STATIC_SCHEMES:
        raise ValueError(f"pysparse.replace_linear: activation='static' is implemented for "
                         f"scheme(s) {', '.join(map(repr, STATIC_SCHEMES))}, not {scheme!r}")
    cls = STATIC_SCHEMES[scheme] if activation == "static" else SCHEMES[scheme]
    allowed = getattr(cls, "OPTIONS", ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"pysparse.replace_linear: scheme {scheme!r} takes "
                        + (f"the options {', '.join(allowed)}" if allowed else "no options")
                        + f", got {', '.join(unknown)}")
    if options:
        cls.check_options(**options)
    group = options.get("group_size", _int4.DEFAULT_GROUP_SIZE)
    report = Report(f"replace_linear(scheme={scheme!r}"
                    + (", activation='static'" if activation == "static" else "")
                    + "".join(f", {k}={v!r}" for k, v in sorted(options.items())) + ")")
    uncalibrated = []
    plan = []
    for name, parent, attr, module, reason in linear_layers(model, include, exclude, filter_fn):
        shape = _shape(module)
        reason = reason or unusable_reason(module)
        if reason is None and scheme.startswith("2:4"):
            K = shape[1]
            if K % 4:
                reason = f"in_features={K} is not a multiple of 4 (2:4 groups along K)"
            elif not _sp24.is_24(module.weight.detach() if isinstance(module, nn.Linear)
                                 else module.weight.detach().t()):
                raise ValueError(
                    f"pysparse.replace_linear: layer {name!r} is not 2:4 sparse, so scheme "
                    f"{scheme!r} cannot pack it; prune it first with "
                    f'pysparse.prune(model, pattern="2:4") (or exclude the layer)')
        if reason is None and scheme == "w4" and shape[1] % group:
            reason = (f"in_features={shape[1]} is not a multiple of group_size={group} (int4 "
                      f"groups along K)")
        if reason is None and activation == "static" and _qstate.input_scale(module) is None:
            uncalibrated.append(name)
        if reason is None:
            check_usable(backend, module.weight.device)
            plan.append((parent, attr, module))
            report.layers.append(LayerResult(name, "replaced", f"{type(module).__name__} -> "
                                             f"{cls.__name__}", shape))
        else:
            report.layers.append(LayerResult(name, "skipped", reason, shape))
    if uncalibrated:
        more = f" and {len(uncalibrated) - 3} more" if len(uncalibrated) > 3 else ""
        raise ValueError(f"pysparse.replace_linear: activation='static' needs a calibrated "
                         f"activation scale, and layer(s) {', '.join(map(repr, uncalibrated[:3]))}"
                         f"{more} have none; call pysparse.calibrate(model, calib, tokenizer=...) "
                         f"first (after pysparse.smooth, which clears the scales it invalidates)")
    for parent, attr, module in plan:  # all validated: now mutate
        setattr(parent, attr, cls.from_linear(module, backend=backend, **options))
    return report


def replace_attention(model: nn.Module) -> nn.Module:
    """Run every attention layer of a transformers model on ``torch.ops.pysparse.attention``.

    Registers pysparse's attention function and its compact-mask function with transformers
    (``AttentionInterface`` / ``AttentionMaskInterface``, both under the name ``"pysparse"``;
    idempotent) and switches ``model``, its sub-models and their configs to it with
    ``model.set_attn_implementation("pysparse")``. Returns ``model`` (changed in place).

    Supported: ``transformers.PreTrainedModel`` subclasses whose attention goes through the
    AttentionInterface and that support sdpa (pysparse reads masks the way sdpa does), with a
    transformers that has ``masking_utils.AttentionMaskInterface``. Anything else raises
    TypeError / ValueError / ImportError before the model is touched. Calls the op cannot
    serve (dropout, gradients, attention weights, unknown arguments) run transformers' sdpa or
    eager code instead, with a warning once per reason (see ``pysparse.nn.attention``).
    ``model.set_attn_implementation("sdpa")`` switches back.

    It composes with ``replace_linear`` in either order: this pass changes only which attention
    function the model calls, ``replace_linear`` only the linear modules.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        raise ImportError("pysparse.replace_attention needs transformers") from None
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"pysparse.replace_attention: expected a transformers PreTrainedModel (a model whose "
            f"attention layers call transformers' AttentionInterface, e.g. BERT, GPT-2, Llama), "
            f"got {type(model).__name__}")
    try:
        from transformers.masking_utils import sdpa_mask

        from .nn import attention as _attention
        if "q_length" not in inspect.signature(sdpa_mask).parameters:
            raise ImportError("masking_utils.sdpa_mask takes no q_length")
    except ImportError as exc:
        import transformers
        raise ImportError(
            f"pysparse.replace_attention needs a transformers with masking_utils' "
            f"AttentionMaskInterface and sdpa_mask(q_length, q_offset, ...) (5.x); found "
            f"transformers {transformers.__version__} ({exc})") from None

    problems = []
    for name, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        where = f"{type(sub).__name__}" + (f" ({name})" if name else "")
        if not type(sub)._can_set_attn_implementation():
            problems.append(f"{where} does not route its attention through transformers' "
                            f"AttentionInterface")
        elif not sub._supports_sdpa:
            problems.append(f"{where} does not support sdpa attention, whose mask format "
                            f"pysparse's attention follows")
    if problems:
        raise ValueError("pysparse.replace_attention: cannot switch this model: "
                         + "; ".join(problems))

    _attention.register()
    model.set_attn_implementation(_attention.NAME)
    left = [type(sub).__name__ for sub in model.modules() if isinstance(sub, PreTrainedModel)
            and sub.config._attn_implementation != _attention.NAME]
    if left:
        raise RuntimeError(f"pysparse.replace_attention: {', '.join(left)} kept attention "
                           f"implementation(s) other than {_attention.NAME!r}")
    return model
