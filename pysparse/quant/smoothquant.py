"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

For a linear layer with input X [tokens, K] and weight W [N, K], per input channel j
``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)``; the layer computes (X / s) (W * s)^T, which is
the same product, with an input that is easier to quantize per token / per tensor.
Where ``X / s`` can be produced *exactly* upstream, the division is folded there:

* into a pre-norm LayerNorm / RMSNorm whose output feeds only the layers smoothed with it
  (GPT-2 ``ln_1 -> attn.c_attn``, ``ln_2 -> mlp.c_fc``; Llama-family ``input_layernorm ->
  q/k/v_proj``, ``post_attention_layernorm -> gate/up_proj``): norm weight and bias / s. One s per
  group, from the largest |W_:,j| over all its layers;
* into the value projection for the attention output projection (Llama ``v_proj -> o_proj``,
  BERT ``attention.self.value -> attention.output.dense``, GPT-2 the V third of ``c_attn`` ->
  ``attn.c_proj``): v's output rows and bias / s. Exact because attention mixes V per channel
  with weights that do not depend on V. With grouped-query attention an o_proj input channel
  (head h, dim d) reads kv channel (h // rep, d), so s is computed per kv channel (the maxima
  taken over the rep query heads sharing it) and repeated across the group for o_proj;
* into ``up_proj`` for ``down_proj`` of a gated MLP (``down(act(gate(x)) * up(x))``).

Every other selected layer (BERT is post-LN: its LayerNorm output also feeds the residual, so
dividing it would change the model; inputs behind a GELU; layers whose partners are excluded)
keeps its float weight and gets the vector as a pending *activation multiplier*
(``quant.state``): the W8A8 modules built from it quantize W * s and multiply their input by
1 / s before quantizing. So smoothing alone never changes what the float model computes beyond
float rounding; ``smooth`` checks this on the first calibration batch and, should a fold not be
exact on an unforeseen architecture, undoes every fold and uses multipliers only (the report
says so). Each fold is also checked on the norm itself (a norm computing ``(1 + w) * x̂``, as
Gemma's, is not divided and falls back to multipliers).
"""
from typing import Callable, Iterable

import torch
from torch import nn

from .. import calib as _calib
from ..replace import LayerResult, Report, _shape, is_linear, linear_layers
from . import state as _state
from .capture import capture_inputs, main_output

S_FLOOR = 1e-5  # floor on max|X_j| and max|W_:,j| before the power law

# (norm, layers it feeds exclusively) relative to one pre-norm block
NORM_RULES = (
    ("ln_1", ("attn.c_attn",)),
    ("ln_2", ("mlp.c_fc",)),
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
# (producer, consumer) whose channels correspond one to one (consumer input = f(producer output)
# with f acting per channel and homogeneous): relative to one module
PAIR_RULES = (
    ("v_proj", "o_proj", "attention"),
    ("self.value", "output.dense", "attention"),
    ("up_proj", "down_proj", "gated_mlp"),
)


def _is_conv1d(m):
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _weight(m):
    """[N, K] view of a linear's weight (Conv1D stores [K, N])."""
    return m.weight.t() if _is_conv1d(m) else m.weight


def _scale_inputs(m, s):
    """W[:, j] *= s_j (in fp32, stored back in the weight's dtype)."""
    w = _weight(m)
    w.copy_((w.float() * s.to(w.device)).to(w.dtype))


def _scale_outputs(m, s, rows=None):
    """W[i, :] /= s_i and bias_i /= s_i for output rows ``rows`` (a slice; default all)."""
    rows = rows or slice(None)
    w = _weight(m)[rows]
    w.copy_((w.float() / s.to(w.device)[:, None]).to(w.dtype))
    b = getattr(m, "bias", None)
    if b is not None:
        b[rows].copy_((b[rows].float() / s.to(b.device)).to(b.dtype))


def _sub(module, path):
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _foldable_norm(norm, K):
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    return ("norm" in type(norm).__name__.lower() and isinstance(w, torch.Tensor)
            and w.dim() == 1 and w.shape[0] == K
            and (b is None or (isinstance(b, torch.Tensor) and b.shape == w.shape)))


def _find_groups(model):
    """Candidate norm folds [(norm_name, norm, [member names])] and pair folds
    [(producer name, consumer name, kind, attention module or None)], by the rules above."""
    names = {m: n for n, m in model.named_modules()}
    groups, pairs = [], []
    for bname, block in model.named_modules():
        prefix = bname + "." if bname else ""
        for norm_path, member_paths in NORM_RULES:
            norm = _sub(block, norm_path)
            members = [_sub(block, p) for p in member_paths]
            if norm is None or any(m is None or not is_linear(m) for m in members):
                continue
            groups.append((prefix + norm_path, norm, [names[m] for m in members]))
        for prod_path, cons_path, kind in PAIR_RULES:
            prod, cons = _sub(block, prod_path), _sub(block, cons_path)
            if prod is None or cons is None or not (is_linear(prod) and is_linear(cons)):
                continue
            if kind == "gated_mlp" and _sub(block, "gate_proj") is None:
                continue
            pairs.append((names[prod], names[cons], kind, block))
        c_attn, c_proj = _sub(block, "c_attn"), _sub(block, "c_proj")
        if (c_attn is not None and c_proj is not None and _is_conv1d(c_attn) and is_linear(c_proj)
                and not getattr(block, "is_cross_attention", False)
                and _weight(c_attn).shape[0] == 3 * _weight(c_proj).shape[1]):
            pairs.append((names[c_attn], names[c_proj], "gpt2_v", block))
    return groups, pairs


def _smooth_vector(act_max, w_max, alpha):
    """s = max(act, 1e-5)^alpha / max(w, 1e-5)^(1-alpha) (the floors keep channels that were
    (almost) never active from getting an enormous 1/s); 1 where that is not finite."""
    act_max = act_max.float().clamp_min(S_FLOOR)
    w_max = w_max.float().to(act_max.device).clamp_min(S_FLOOR)
    s = act_max.pow(alpha) / w_max.pow(1 - alpha)
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


def _w_colmax(m):
    """max_i |W_eff[i, j]| of the weight a quantized module would hold (pending s included)."""
    return _state.smoothed_weight(_weight(m).detach().float(), m).abs().amax(dim=0)


@torch.no_grad()
def smooth(model: nn.Module, calib, alpha: float = 0.5, tokenizer=None, *, include=None,
           exclude: Iterable[str] | str | None = ("lm_head",), filter_fn: Callable | None = None,
           progress: bool = True) -> Report:
    """SmoothQuant the selected linear layers of ``model`` in place (module docstring).

    alpha in [0, 1]: how much of the activation range moves into the weights (0: none, 1: all).
    calib / tokenizer: the ``pysparse.calib`` convention. Returns a Report with every layer
    "smoothed" (how: folded into which module, or activation multiplier) or "skipped".
    Clears the static activation scales (``pysparse.calibrate``) of every layer whose input it
    changes: calibrate after smoothing. Calling it again composes (the vectors multiply).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"pysparse.smooth: alpha must be a number in [0, 1], got {alpha!r}")

    def vector(_members, act, w_max, _expand):
        return _smooth_vector(act, w_max, alpha)

    return rescale_inputs(model, calib, tokenizer, title=f"smooth(alpha={alpha})", who="smooth",
                          stat=lambda x: x.abs().amax(dim=0), combine=torch.maximum,
                          vector=vector, include=include, exclude=exclude, filter_fn=filter_fn,
                          progress=progress)


@torch.no_grad()
def rescale_inputs(model: nn.Module, calib, tokenizer=None, *, title: str, who: str, stat,
                   combine, vector, include=None, exclude=("lm_head",), filter_fn=None,
                   progress=True, on_input=None) -> Report:
    """The machinery of ``smooth``, shared with AWQ (quant.awq): per-input-channel vectors s,
    folded upstream where exact, else left as pending multipliers (module docstring).

    stat(x2d) -> [K] per-channel statistic of one batch of a layer's input; combine(a, b) merges
    two batches' (torch.maximum for a max, torch.add for a sum). vector(members, act, w_max,
    expand) -> s for one fold step: ``members`` the names of the layers receiving s,
    ``act`` their merged input statistic and ``w_max`` the largest |W_eff[:, j]| over the
    members, both per channel of the fold (per kv channel for grouped-query attention, where
    ``expand(s)`` gives the members' full-width vector; identity otherwise). on_input(name, x)
    also sees every input of the calibration pass.
    """
    report = Report(title)
    entries, selected = [], {}
    for name, _p, _a, module, reason in linear_layers(model, include, exclude, filter_fn):
        if reason is None and not module.weight.is_floating_point():
            reason = f"weight dtype {module.weight.dtype} is not floating point"
        entries.append((name, module, reason))
        if reason is None:
            selected[name] = module
    data = _calib.batches(calib, tokenizer, who=f"pysparse.{who}")
    if not selected:
        raise ValueError(f"pysparse.{who}: no linear layer selected (check include/exclude/"
                         f"filter_fn)")
    groups, pairs = _find_groups(model)
    groups = [g for g in groups if all(n in selected for n in g[2])]

    # ---- one calibration pass: per-channel max |x|, which norm feeds which layer, reference out
    act_max = {}
    fed = {n: True for g in groups for n in g[2]}
    last_out = {}
    ref = []

    def record(name, x):
        m = stat(x)
        act_max[name] = m if name not in act_max else combine(act_max[name], m)
        if on_input is not None:
            on_input(name, x)

    def norm_out(norm, out):
        last_out[norm] = out

    member_norm = {n: norm for _gn, norm, members in groups for n in members}

    def raw_pre(name):
        def hook(module, args):
            x, o = (args[0] if args else None), last_out.get(member_norm[name])
            if not (isinstance(x, torch.Tensor) and isinstance(o, torch.Tensor) and (
                    x is o or (x.data_ptr() == o.data_ptr() and x.shape == o.shape))):
                fed[name] = False
        return hook

    hooks = [selected[n].register_forward_pre_hook(raw_pre(n)) for n in fed]
    outputs = {model: lambda _m, out: ref.append(main_output(out).detach().clone())
               if not ref else None}
    outputs.update({norm: norm_out for _gn, norm, _ms in groups})
    try:
        with capture_inputs(model, selected, record, on_output=outputs):
            _calib.run(model, data, desc=who, progress=progress)
    finally:
        for h in hooks:
            h.remove()
        last_out.clear()

    plan = _plan(selected, groups, pairs, fed, act_max)
    snapshot = [(p, p.detach().clone()) for p in _touched_params(plan, selected)]
    how = _apply(plan, act_max, vector, selected)
    fallback = None
    if any(kind != "multiplier" for kind, *_ in plan):
        err = _output_error(model, data[0], ref[0])
        if err > _tolerance(ref[0].dtype):
            for p, saved in snapshot:
                p.copy_(saved)
            for name in selected:  # undo multipliers set by this call, then redo without folds
                _restore_multiplier(selected[name], how.get(name))
            plan = [("multiplier", n) for n in selected if n in act_max]
            how = _apply(plan, act_max, vector, selected)
            fallback = f"folds undone: the model output moved by {err:.2e} (relative)"
    for name, module, reason in entries:
        if reason is None and name not in act_max:
            reason = "not reached by the calibration forward"
        if reason is not None:
            report.layers.append(LayerResult(name, "skipped", reason, _shape(module)))
            continue
        detail, s, _prev = how[name]
        detail += f"; s in [{float(s.min()):.3g}, {float(s.max()):.3g}]"
        if fallback and detail.startswith("activation multiplier"):
            detail += f" ({fallback})"
        report.layers.append(LayerResult(name, "smoothed", detail, _shape(module)))
    return report


def _plan(selected, groups, pairs, fed, act_max):
    """[(kind, ...)]: ("norm", norm_name, norm, members) | ("pair", prod, cons, kind, block) |
    ("multiplier", name); every selected, reached layer appears exactly once as the smoothed one."""
    plan, done = [], set()
    for prod, cons, kind, block in pairs:  # output-side folds first (they change producer rows)
        if prod in selected and cons in selected and cons in act_max and cons not in done:
            plan.append(("pair", prod, cons, kind, block))
            done.add(cons)
    for gname, norm, members in groups:
        K = _weight(selected[members[0]]).shape[1]
        if (all(fed.get(n, False) and n in act_max and n not in done for n in members)
                and _foldable_norm(norm, K)):
            plan.append(("norm", gname, norm, members))
            done.update(members)
    plan.extend(("multiplier", n) for n in selected if n in act_max and n not in done)
    return plan


def _touched_params(plan, selected):
    """Every tensor a fold may change (snapshotted so a failed check can undo them)."""
    mods = []
    for step in plan:
        if step[0] == "norm":
            mods += [step[2]] + [selected[n] for n in step[3]]
        elif step[0] == "pair":
            mods += [selected[step[1]], selected[step[2]]]
    seen = set()
    for m in mods:
        for t in (m.weight, getattr(m, "bias", None)):
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                yield t


def _pair_scales(kind, prod, cons, block, act, vector, cons_name):
    """(s for the consumer's input channels, s for the producer's output rows, rows slice)."""
    w_max = _w_colmax(cons)
    n_in = act.shape[0]
    same = lambda s: s  # noqa: E731
    if kind == "gpt2_v":
        E = n_in
        s = vector([cons_name], act, w_max, same)
        return s, s, slice(2 * E, 3 * E)
    n_v = _weight(prod).shape[0]
    if n_in == n_v:
        s = vector([cons_name], act, w_max, same)
        return s, s, None
    if n_in % n_v:
        return None
    rep = n_in // n_v
    D = getattr(block, "head_dim", None) or getattr(getattr(block, "config", None), "head_dim",
                                                    None)
    if not D or n_v % D:
        return None
    hkv = n_v // D

    def expand(s_v):
        return s_v.reshape(hkv, 1, D).expand(hkv, rep, D).reshape(-1)

    a = act.reshape(hkv, rep, D).amax(dim=1).reshape(-1)
    w = w_max.reshape(hkv, rep, D).amax(dim=1).reshape(-1)
    s_v = vector([cons_name], a, w, expand)
    return expand(s_v), s_v, None


def _check_norm(norm, K, fn):
    """Apply fn() to the norm and report whether norm(x) became norm_before(x) / s exactly."""
    p = next(norm.parameters())
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    before = norm(x).float()
    s = fn()
    after = norm(x).float()
    want = before / s.to(after.device)
    return bool(torch.allclose(after, want, rtol=_tolerance(p.dtype), atol=1e-6 *
                               float(want.abs().max().clamp_min(1))))


def _apply(plan, act_max, vector, selected):
    """Apply the plan; returns {name: (how, s)} and clears invalidated static scales."""
    how = {}
    for step in plan:
        kind = step[0]
        if kind == "pair":
            _k, prod_name, cons_name, pkind, block = step
            prod, cons = selected[prod_name], selected[cons_name]
            scales = _pair_scales(pkind, prod, cons, block, act_max[cons_name], vector,
                                  cons_name)
            if scales is None:
                step = ("multiplier", cons_name)
                kind = "multiplier"
            else:
                s_cons, s_prod, rows = scales
                _scale_inputs(cons, s_cons)
                _scale_outputs(prod, s_prod, rows)
                how[cons_name] = (f"folded into {prod_name} (output rows"
                                  + (", per kv channel" if s_prod.numel() != s_cons.numel()
                                     else "") + ")", s_cons, None)
                _state.clear_input_scale(cons)
                continue
        if kind == "norm":
            _k, gname, norm, members = step
            K = _weight(selected[members[0]]).shape[1]
            w_max = torch.stack([_w_colmax(selected[n]) for n in members]).amax(dim=0)
            s = vector(list(members), act_max[members[0]], w_max, lambda v: v)

            def fold(norm=norm, s=s):
                for t in (norm.weight, getattr(norm, "bias", None)):
                    if t is not None:
                        t.copy_((t.float() / s.to(t.device)).to(t.dtype))
                return s

            saved = [t.detach().clone() for t in (norm.weight, getattr(norm, "bias", None))
                     if t is not None]
            try:
                exact = _check_norm(norm, K, fold)
            except Exception:  # noqa: BLE001 - a norm we cannot call alone: do not fold into it
                exact = False
            if exact:
                for n in members:
                    _scale_inputs(selected[n], s)
                    how[n] = (f"folded into {gname}", s, None)
                    _state.clear_input_scale(selected[n])
                continue
            for t, v in zip([t for t in (norm.weight, getattr(norm, "bias", None))
                             if t is not None], saved):
                t.copy_(v)
            for n in members:
                _multiplier(selected[n], n, act_max, vector, how,
                            note=f"{gname} is not a plain affine norm")
            continue
        _multiplier(selected[step[1]], step[1], act_max, vector, how)
    return how


def _multiplier(module, name, act_max, vector, how, note=None):
    s = vector([name], act_max[name], _w_colmax(module), lambda v: v)
    prev = _state.smooth_vector(module)
    _state.set_smooth_vector(module, s if prev is None else prev.to(s.device) * s)
    how[name] = ("activation multiplier" + (f" ({note})" if note else ""), s, prev)
    _state.clear_input_scale(module)


def _restore_multiplier(module, entry):
    if entry is None or not entry[0].startswith("activation multiplier"):
        return
    prev = entry[2]
    if prev is None:
        if hasattr(module, _state.SMOOTH):
            delattr(module, _state.SMOOTH)
    else:
        _state.set_smooth_vector(module, prev)


def _tolerance(dtype):
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _output_error(model, batch, ref):
    dev = _calib.device_of(model)
    was = model.training
    model.eval()
    try:
        out = main_output(model(**_calib.to_device(batch, dev))).float()
    finally:
        model.train(was)
    ref = ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


__all__ = ["smooth", "rescale_inputs", "NORM_RULES", "PAIR_RULES"]
