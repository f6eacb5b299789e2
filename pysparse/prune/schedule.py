"""Pruning during training: the cubic schedule, masks that optimizer steps cannot undo, gradual
magnitude pruning and an L1 penalty.

``MaskEnforcer`` keeps pruned weights at exactly zero: a tensor hook zeroes their gradient and,
once attached to an optimizer (or through ``MaskCallback`` in a transformers Trainer), the
mask is re-applied after every step, so momentum, Adam state or weight decay cannot revive
them. ``GradualPruner`` raises the sparsity along Zhu & Gupta's cubic schedule ("To prune, or
not to prune", 2017) and keeps its enforcer's masks up to date.

The transformers callbacks (``MaskCallback``, ``GradualPruningCallback``) subclass
``transformers.TrainerCallback``; they are created on first use so that importing this module
does not import transformers.
"""
from typing import Callable

import torch
from torch import nn

from ..nn.linear import linear_weight
from ..replace import linear_layers
from . import masks as _masks

_WHO = "pysparse.prune.schedule"


def cubic_sparsity(step: int, final_sparsity: float, begin_step: int, end_step: int,
                   initial_sparsity: float = 0.0, frequency: int = 1) -> float:
    """Zhu & Gupta's schedule: s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3.

    t0 = ``begin_step``, n * dt = ``end_step - begin_step``, dt = ``frequency``: the value
    changes only at steps ``begin_step + k * frequency`` (between them it holds the last one).
    Clamped: ``initial_sparsity`` up to ``begin_step``, ``final_sparsity`` from ``end_step`` on.
    """
    if not 0.0 <= initial_sparsity <= final_sparsity < 1.0:
        raise ValueError(f"{_WHO}.cubic_sparsity: need 0 <= initial_sparsity <= final_sparsity "
                         f"< 1, got {initial_sparsity} and {final_sparsity}")
    if not 0 <= begin_step < end_step:
        raise ValueError(f"{_WHO}.cubic_sparsity: need 0 <= begin_step < end_step, got "
                         f"{begin_step} and {end_step}")
    if int(frequency) != frequency or frequency < 1:
        raise ValueError(f"{_WHO}.cubic_sparsity: frequency must be an integer >= 1, got "
                         f"{frequency}")
    if step <= begin_step:
        return float(initial_sparsity)
    if step >= end_step:
        return float(final_sparsity)
    t = begin_step + (step - begin_step) // int(frequency) * int(frequency)
    left = 1.0 - (t - begin_step) / (end_step - begin_step)
    return float(final_sparsity + (initial_sparsity - final_sparsity) * left ** 3)


class MaskEnforcer:
    """Holds a keep-mask per selected linear weight and keeps masked weights at exactly 0.

    masks: None records each selected weight's current zero pattern (``w != 0``); or a dict
    {qualified name: bool [out, in] keep mask} (only those layers are enforced). include /
    exclude / filter_fn select layers as in ``pysparse.replace_linear``.

    At construction a tensor hook is put on every enforced weight that zeroes the masked
    entries of its gradient. ``apply()`` zeroes the masked weights; ``attach(optimizer)``
    calls it after every ``optimizer.step()``; ``remove()`` takes every hook off. Masks are kept
    on the weight's device (moved once if the model moves).
    """

    def __init__(self, model: nn.Module, include=None, exclude=("lm_head",), masks=None,
                 filter_fn: Callable | None = None):
        self._layers = {}  # name -> [module, keep mask in the parameter's own layout]
        self._handles = []
        given = dict(masks) if masks is not None else None
        for name, _parent, _attr, module, reason in linear_layers(model, include, exclude,
                                                                  filter_fn):
            if reason is not None or (given is not None and name not in given):
                continue
            w = module.weight
            self._layers[name] = [module, None]
            if given is None:
                self._layers[name][1] = w.detach() != 0
            else:
                self.set_mask(name, given.pop(name))
            if w.requires_grad:  # a frozen weight gets no gradient; apply() still re-masks it
                self._handles.append(w.register_hook(self._grad_hook(name)))
        if given:
            raise ValueError(f"{_WHO}.MaskEnforcer: masks given for layers that are not "
                             f"selected linear layers of the model: {sorted(given)}")

    def _grad_hook(self, name):
        def hook(grad):
            if grad is None:  # DDP with find_unused_parameters passes None for unused weights
                return None
            return grad.masked_fill(~self._mask_on(name, grad.device), 0)
        return hook

    def _mask_on(self, name, device):
        entry = self._layers[name]
        if entry[1].device != device:
            entry[1] = entry[1].to(device)
        return entry[1]

    @property
    def names(self) -> list:
        return list(self._layers)

    def module(self, name: str) -> nn.Module:
        return self._layers[name][0]

    def mask(self, name: str) -> torch.Tensor:
        """The keep mask of layer ``name`` in the [out, in] convention."""
        module, m = self._layers[name]
        return m if isinstance(module, nn.Linear) else m.t()

    def set_mask(self, name: str, mask: torch.Tensor):
        """Replace the keep mask of ``name`` (bool [out, in]); call ``apply()`` to zero."""
        module = self._layers[name][0]
        w = module.weight
        shape = tuple(linear_weight(module).shape)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
            raise ValueError(f"{_WHO}.MaskEnforcer: mask for {name!r} must be a tensor of shape "
                             f"{shape} ([out, in]), got "
                             f"{tuple(getattr(mask, 'shape', ())) or type(mask).__name__}")
        mask = mask.to(device=w.device, dtype=torch.bool)
        self._layers[name][1] = mask if isinstance(module, nn.Linear) else mask.t().contiguous()

    @torch.no_grad()
    def apply(self):
        """Zero every masked weight."""
        for name, (module, _m) in self._layers.items():
            w = module.weight
            mask = self._mask_on(name, w.device)
            if mask.shape != w.shape:
                raise RuntimeError(f"{_WHO}.MaskEnforcer: {name}.weight is now "
                                   f"{tuple(w.shape)}, its mask {tuple(mask.shape)}; make a new "
                                   f"enforcer after changing the model's shapes")
            w.masked_fill_(~mask, 0)
        return self

    def attach(self, optimizer: torch.optim.Optimizer):
        """Re-apply the masks after every ``optimizer.step()``."""
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply()))
        return self

    def remove(self):
        """Take every gradient and optimizer hook off (masks are kept, nothing is re-zeroed)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def sparsity(self) -> float:
        """Fraction of masked entries over all enforced weights."""
        total = sum(m.numel() for _, m in self._layers.values())
        off = sum(int((~m).sum()) for _, m in self._layers.values())
        return off / total if total else 0.0

    def __len__(self):
        return len(self._layers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class GradualPruner:
    """Gradual magnitude pruning on the cubic schedule (``cubic_sparsity``).

    Each ``step(t)`` computes the scheduled sparsity; when it rose, every selected layer is
    re-pruned by magnitude to it (per layer, exact count; already pruned weights stay pruned)
    and the enforcer's masks are updated and applied. Before ``begin_step`` nothing is pruned.

    pattern None: unstructured, as above. pattern "N:M" (e.g. "2:4"): N:M along K cannot be
    reached gradually, so the model stays dense until the schedule reaches its final value
    (``end_step``) and the N:M magnitude masks are set then (``final_sparsity`` defaults to,
    and must equal, 1 - N/M); layers whose K is not a multiple of M are left dense (listed in
    ``skipped``). method: "magnitude" only.

    Use ``attach(optimizer)`` (or ``callback()`` in a transformers Trainer) so optimizer
    steps cannot revive pruned weights between schedule steps.
    """

    def __init__(self, model: nn.Module, final_sparsity: float | None = None,
                 begin_step: int = 0, end_step: int = 1000, frequency: int = 1,
                 pattern: str | None = None, method: str = "magnitude", include=None,
                 exclude=("lm_head",), initial_sparsity: float = 0.0,
                 filter_fn: Callable | None = None):
        if method != "magnitude":
            raise ValueError(f"{_WHO}.GradualPruner: method {method!r} is not available; "
                             f"gradual pruning uses 'magnitude'")
        self.nm = None
        if pattern is not None:
            self.nm = _masks.parse_nm(pattern)
            if self.nm is None:
                raise ValueError(f"{_WHO}.GradualPruner: pattern must be None or 'N:M' with "
                                 f"1 <= N < M (e.g. '2:4'), got {pattern!r}")
            implied = 1.0 - self.nm[0] / self.nm[1]
            if final_sparsity is None:
                final_sparsity = implied
            elif abs(final_sparsity - implied) > 1e-9:
                raise ValueError(f"{_WHO}.GradualPruner: pattern {pattern!r} means sparsity "
                                 f"{implied:g}, got final_sparsity={final_sparsity}")
        if final_sparsity is None:
            raise ValueError(f"{_WHO}.GradualPruner: give final_sparsity (or an N:M pattern)")
        cubic_sparsity(begin_step, final_sparsity, begin_step, end_step, initial_sparsity,
                       frequency)  # validates the schedule
        self.final_sparsity, self.initial_sparsity = float(final_sparsity), initial_sparsity
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency
        self.pattern = pattern
        self.step_count = 0
        self.sparsity = 0.0
        self.enforcer = MaskEnforcer(model, include, exclude, filter_fn=filter_fn)
        self.skipped = {}
        if self.nm is not None:
            for name in self.enforcer.names:
                k = self.enforcer.mask(name).shape[1]
                if k % self.nm[1]:
                    self.skipped[name] = f"in_features={k} is not a multiple of {self.nm[1]}"

    def scheduled(self, step: int) -> float:
        """The sparsity the schedule asks for at ``step``."""
        if step < self.begin_step:
            return 0.0
        return cubic_sparsity(step, self.final_sparsity, self.begin_step, self.end_step,
                              self.initial_sparsity, self.frequency)

    @torch.no_grad()
    def step(self, step: int | None = None) -> float:
        """Advance to ``step`` (default: one past the last) and prune to its scheduled sparsity.
        Returns the sparsity now enforced per pruned layer."""
        t = self.step_count if step is None else int(step)
        self.step_count = t + 1
        target = self.scheduled(t)
        if self.nm is not None:
            if t >= self.end_step and self.sparsity == 0.0:
                self._prune(lambda w: _masks.nm_mask(w.abs(), *self.nm))
                self.sparsity = self.final_sparsity
        elif target > self.sparsity:
            self._prune(lambda w: _masks.unstructured_mask(w.abs(), target))
            self.sparsity = target
        self.enforcer.apply()
        return self.sparsity

    def _prune(self, mask_fn):
        for name in self.enforcer.names:
            if name in self.skipped:
                continue
            w = linear_weight(self.enforcer.module(name))
            self.enforcer.set_mask(name, mask_fn(w) & self.enforcer.mask(name))

    def attach(self, optimizer: torch.optim.Optimizer):
        self.enforcer.attach(optimizer)
        return self

    def remove(self):
        self.enforcer.remove()

    def callback(self):
        """A transformers TrainerCallback that steps this pruner (``GradualPruningCallback``)."""
        return _callbacks()["GradualPruningCallback"](self)


def l1_penalty(model: nn.Module, include=None, exclude=("lm_head",), weight: float = 1.0,
               filter_fn: Callable | None = None) -> torch.Tensor:
    """``weight * sum |w|`` over the selected linear weights: a scalar to add to a loss (its
    gradient is ``weight * sign(w)``), accumulated in fp32."""
    total = None
    for _name, _parent, _attr, module, reason in linear_layers(model, include, exclude,
                                                               filter_fn):
        if reason is not None:
            continue
        term = module.weight.abs().sum(dtype=torch.float32)
        total = term if total is None else total + term.to(total.device)
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    return total * weight


_CALLBACKS = {}


def _callbacks():
    """Build the TrainerCallback subclasses once (imports transformers)."""
    if _CALLBACKS:
        return _CALLBACKS
    from transformers import TrainerCallback

    class MaskCallback(TrainerCallback):
        """Re-applies a MaskEnforcer's masks at the start of training and after every optimizer
        step (its gradient hooks are active already)."""

        def __init__(self, enforcer: MaskEnforcer):
            self.enforcer = enforcer

        def on_train_begin(self, args, state, control, **kwargs):
            self.enforcer.apply()

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.enforcer.apply()

        def on_step_end(self, args, state, control, **kwargs):
            self.enforcer.apply()

    class GradualPruningCallback(TrainerCallback):
        """Steps a GradualPruner with the Trainer's ``global_step`` (the number of optimizer
        steps done) and re-applies its masks after every optimizer step."""

        def __init__(self, pruner: GradualPruner):
            self.pruner = pruner

        def on_train_begin(self, args, state, control, **kwargs):
            self.pruner.step(state.global_step)

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.pruner.enforcer.apply()

        def on_step_end(self, args, state, control, **kwargs):
            self.pruner.step(state.global_step)

    for cls in (MaskCallback, GradualPruningCallback):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        _CALLBACKS[cls.__name__] = cls
    return _CALLBACKS


def __getattr__(name):
    if name in ("MaskCallback", "GradualPruningCallback"):
        return _callbacks()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["cubic_sparsity", "MaskEnforcer", "GradualPruner", "l1_penalty", "MaskCallback",
           "GradualPruningCallback"]
