"""pysparse's fused attention as a transformers attention implementation named ``"pysparse"``.

Two functions are registered under that one name:

* ``pysparse_attention_forward`` in transformers' ``AttentionInterface``: the function every
  attention layer calls; it runs ``torch.ops.pysparse.attention`` and returns what
  ``sdpa_attention_forward`` returns, ``(output [B, Sq, Hq, D], None)``.
* ``pysparse_mask`` in ``AttentionMaskInterface``: builds the mask that ``create_causal_mask`` /
  ``create_bidirectional_mask`` hand to those layers, as compact as is still exact, because a
  flash kernel is fastest with no mask or a key-padding mask and a full ``[B, 1, Sq, Sk]`` mask
  costs memory that grows with Sq * Sk.

The contract between the two (what a mask reaching an attention layer means):

======================  =====================================================================
``None``                no mask; the layer is causal iff its ``is_causal`` (kwarg, else the
                        module attribute, as in sdpa)
``[B|1, 1, 1, Sk]``     "compact": key padding only (bool, True = attend); causal as above
anything else           the full pattern in sdpa's format; it already encodes causality
======================  =====================================================================

Causality goes to the op as its ``causal`` flag, aligned bottom-right (query i sees key j iff
j <= i + Sk - Sq). That is exact when the keys end where the queries end (prefill, prefill on
top of a cache, decoding), and ``pysparse_mask`` returns None / compact masks only then; in
every other case (static caches, sliding windows, chunked attention, packed sequences, custom
``and_mask_function`` / ``or_mask_function``, block-wise overlays, decoders made bidirectional
by ``config.is_causal=False``, callers that need the mask materialized) it returns the full
mask of transformers' ``sdpa_mask``. The one reading that
differs from sdpa: a 4D ``[B, 1, 1, Sk]`` mask passed in by the user to a causal layer with
Sq > 1 is read as key padding under the causal flag, where sdpa would drop causality.

Calls the op cannot serve go, with a warning once per reason, to transformers' own code:
sdpa for dropout, gradients when the op has no autograd formula registered, arguments it does not know
(``position_bias``, ``softcap``, paged caches, ...) and shapes it does not take; the model's
eager function when attention weights are requested (``output_attentions``) or for attention
sinks, which sdpa would ignore. ``head_mask``, which neither applies, raises.
"""
import sys
import warnings

import torch
from transformers import masking_utils as _masks
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface
from transformers.utils.import_utils import is_torchdynamo_exporting, is_tracing

NAME = "pysparse"

# Keyword arguments attention layers pass that do not change the result once the mask is built
# (sdpa ignores them too): bookkeeping, and flash-attention varlen / window hints whose effect
# masking_utils already put into the mask.
_INFORMATIONAL = frozenset({
    "position_ids", "use_cache", "cache_position", "past_key_values", "past_key_value",
    "output_hidden_states", "output_router_logits", "return_dict", "num_items_in_batch",
    "encoder_hidden_states", "encoder_attention_mask", "token_type_ids", "layer_idx",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx",
    "sliding_window", "output_attentions",
})
# Attention sinks change the math and sdpa would silently ignore them; the eager function of
# the models that pass them applies them.
_EAGER_ONLY = frozenset({"s_aux", "sinks"})
# Arguments neither sdpa nor the transformers 5 eager functions apply: refused, not ignored.
_REFUSED = frozenset({"head_mask"})


class AttentionFallbackWarning(UserWarning):
    """A call went to transformers' sdpa / eager attention instead of the pysparse op."""


_warned: set = set()


def _warn_once(reason: str, target: str) -> None:
    if (reason, target) in _warned:
        return
    _warned.add((reason, target))
    warnings.warn(f"pysparse attention: {reason}; such calls run transformers' {target} "
                  f"attention instead of torch.ops.pysparse.attention",
                  AttentionFallbackWarning, stacklevel=3)


def _op_has_backward() -> bool:
    # True once someone registers an autograd formula for the op; until then autograd would
    # trace through the reference (wrong gradients for a fused kernel), so we must not use it.
    return any(torch._C._dispatch_has_kernel_for_dispatch_key("pysparse::attention", key)
               for key in ("Autograd", "AutogradCPU", "AutogradCUDA"))


def _weights_requested(kwargs) -> bool:
    """Whether the caller wants attention probabilities back (``output_attentions``)."""
    if kwargs.get("output_attentions"):
        return True
    # Some models (GPT-2) pop output_attentions before the layers and collect the weights with
    # forward hooks on the attention modules; the active collector says whether they are on.
    try:
        from transformers.utils.output_capturing import _active_collector
        collected = _active_collector.get()
    except (ImportError, AttributeError):
        return False
    return bool(collected) and any("attentions" in key for key in collected)


def _is_key_padding(mask: torch.Tensor) -> bool:
    """A mask that does not vary over heads and queries: key padding, not a pattern."""
    return mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1


def _eager_function(module):
    """The eager attention function of the module's modeling file, or None."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _fallback_reason(module, query, key, value, mask, dropout, kwargs):
    """(reason, "sdpa" | "eager") when the op cannot serve this call, else None."""
    if _weights_requested(kwargs):
        if _eager_function(module) is not None:
            return "attention weights were requested (output_attentions)", "eager"
        return ("attention weights were requested (output_attentions) and the model has no "
                "eager attention function, so none are returned"), "sdpa"
    for name, val in kwargs.items():
        if name in _INFORMATIONAL or val is None or val is False:
            continue
        if name in _REFUSED:
            raise NotImplementedError(
                f"pysparse attention: {name!r} is not supported (transformers' sdpa would "
                f"ignore it too); remove it or use model.set_attn_implementation('eager') with "
                f"a model that applies it")
        if name not in _EAGER_ONLY:
            return f"argument {name!r} is not supported", "sdpa"
        if _eager_function(module) is None:
            raise NotImplementedError(
                f"pysparse attention: argument {name!r} of {type(module).__name__} needs the "
                f"model's eager attention (sdpa ignores it) and its modeling file defines no "
                f"eager_attention_forward; use model.set_attn_implementation('eager')")
        return f"argument {name!r} is not supported", "eager"
    if dropout:
        return f"attention dropout ({dropout}) is not supported", "sdpa"
    if (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            and not _op_has_backward()):
        return ("the op has no backward yet and gradients are required (run inference under "
                "torch.no_grad() / torch.inference_mode() to use it)"), "sdpa"
    # fixed texts (no sizes), so that decoding step after step warns once
    if query.dim() != 4 or key.dim() != 4 or key.shape != value.shape:
        return "key and value shapes differ (or are not 4D)", "sdpa"
    if key.shape[0] != query.shape[0]:
        return "query and key batch sizes differ (broadcast batch)", "sdpa"
    if key.shape[-1] != query.shape[-1] or query.shape[1] % key.shape[1]:
        return "query and key head dims differ, or Hq is not a multiple of Hkv", "sdpa"
    if not (query.dtype == key.dtype == value.dtype):
        return "query, key and value dtypes differ", "sdpa"
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        return f"a {mask.dtype} attention mask", "sdpa"
    return None


def _full_pattern(mask, causal: bool, q_len: int, kv_len: int, device):
    """The mask with the bottom-right causal pattern folded in: the format sdpa / eager read."""
    if not causal:
        return mask
    keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
    if mask is None:
        return keep[None, None]
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)


def _fallback(target, module, query, key, value, mask, causal, dropout, scaling, kwargs):
    q_len, kv_len = query.shape[2], key.shape[2]
    if target == "eager":
        # eager adds the mask to the scores and knows nothing of causality: hand it the full
        # additive pattern
        full = _full_pattern(mask, causal, q_len, kv_len, query.device)
        if full is not None and full.dtype == torch.bool:
            full = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
                ~full, torch.finfo(query.dtype).min)
        return _eager_function(module)(module, query, key, value, full, dropout=dropout,
                                       scaling=scaling, **kwargs)
    if causal and mask is None and q_len == kv_len:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout,
                                      scaling=scaling, is_causal=True, **kwargs)
    # sdpa reads a None mask with is_causal as top-left aligned: fold causality in ourselves
    full = _full_pattern(mask, causal, q_len, kv_len, query.device)
    return sdpa_attention_forward(module, query, key, value, full, dropout=dropout,
                                  scaling=scaling, is_causal=False, **kwargs)


def pysparse_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: torch.Tensor | None,
                               dropout: float = 0.0, scaling: float | None = None,
                               is_causal: bool | None = None, **kwargs):
    """transformers attention function running ``torch.ops.pysparse.attention``.

    query [B, Hq, Sq, D], key / value [B, Hkv, Sk, D] (grouped-query heads are not repeated:
    the op maps query head h to kv head h // (Hq / Hkv)); attention_mask as in the module
    docstring's table; scaling defaults to 1/sqrt(D). Returns (output [B, Sq, Hq, D], None),
    or what transformers' sdpa / eager function returns for the calls it falls back on.
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # A full mask already holds the pattern (sdpa passes is_causal=False with any mask); a
    # compact one or none leaves causality to the flag. With Sq == 1 the bottom-right causal
    # pattern keeps every key, so the flag is dropped.
    causal = bool(causal and query.shape[2] > 1
                  and (attention_mask is None or _is_key_padding(attention_mask)))
    why = _fallback_reason(module, query, key, value, attention_mask, dropout, kwargs)
    if why is not None:
        reason, target = why
        _warn_once(reason, target)
        return _fallback(target, module, query, key, value, attention_mask, causal, dropout,
                         scaling, kwargs)
    out = torch.ops.pysparse.attention(query, key, value, attention_mask, causal,
                                       None if scaling is None else float(scaling))
    return out.transpose(1, 2).contiguous(), None


def _compact_ok(mask_function, q_length, kv_length, q_offset, kv_offset, local_size,
                allow_is_causal_skip, allow_is_bidirectional_skip, config) -> bool:
    """Whether None / key padding (+ the layers' causal flag) is exactly the requested mask."""
    if local_size is not None:
        return False
    if mask_function is _masks.causal_mask_function:
        # bottom-right causal == absolute-position causal iff the keys end where queries end;
        # a tensor q_offset (static caches) is not read, to keep compiled graphs whole
        return (bool(allow_is_causal_skip) and not isinstance(q_offset, torch.Tensor)
                and kv_offset + kv_length == q_offset + q_length)
    if mask_function is _masks.bidirectional_mask_function:
        # config.is_causal=False turns a decoder bidirectional through the mask alone while its
        # layers keep is_causal=True: only a full mask says so, as in sdpa
        return bool(allow_is_bidirectional_skip) and getattr(config, "is_causal", True) is not False
    return False  # sliding, chunked, packed, and/or overlays: a real pattern


def pysparse_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                  mask_function=_masks.causal_mask_function,
                  attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                  allow_is_causal_skip: bool = True, allow_is_bidirectional_skip: bool = False,
                  config=None, **kwargs):
    """transformers mask function for the "pysparse" implementation (sdpa_mask's signature).

    attention_mask is the 2D padding mask [B, >= kv_offset + kv_length] (or None). Returns None
    (nothing to mask beyond the layers' causal flag), a bool key-padding mask [B, 1, 1, Sk],
    or, for any pattern that is not plain causal / bidirectional attention with keys ending at
    the last query, the full bool mask [B, 1, Sq, Sk] of transformers' sdpa_mask.
    """
    if not _compact_ok(mask_function, q_length, kv_length, q_offset, kv_offset, local_size,
                       allow_is_causal_skip, allow_is_bidirectional_skip, config):
        return _masks.sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                mask_function, attention_mask, local_size=local_size,
                                allow_is_causal_skip=False,
                                allow_is_bidirectional_skip=allow_is_bidirectional_skip,
                                config=config, **kwargs)
    padding = _masks.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        return None
    keys = padding[:, kv_offset:kv_offset + kv_length].to(torch.bool)
    # reading the values would break export / compiled graphs: keep the (exact) mask there
    if not (is_torchdynamo_exporting() or is_tracing(keys)) and bool(keys.all()):
        return None
    return keys[:, None, None, :]


def register() -> None:
    """Register both functions as "pysparse" with transformers (idempotent)."""
    AttentionInterface.register(NAME, pysparse_attention_forward)
    AttentionMaskInterface.register(NAME, pysparse_mask)
