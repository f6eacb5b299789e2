"""pysparse.replace_attention: transformers models on torch.ops.pysparse.attention.

Every model is compared with the same weights under transformers' sdpa attention. A spy on the
op checks that it really runs and which mask / causal flag it gets (compact key padding and the
causal flag wherever that is exact); the mask function is checked against transformers'
sdpa_mask on the patterns that must fall back to a full mask.
"""
import copy

import pytest
import torch
import transformers
from torch import nn
from transformers import masking_utils

import pysparse
from pysparse.nn import attention as pattn
from pysparse.testing import tolerances

V = 128
TOL = tolerances.FLOAT_MATMUL[torch.float32]
# embedding agreement of MiniLM with the op vs without (same weights; fp32 rounding only)
MINILM_ATTENTION_COSINE = 0.999


def _bert(**kw):
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=V, max_position_embeddings=64,
                                  **kw)
    return transformers.BertModel(cfg).eval()


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=64,
                                  bos_token_id=1, eos_token_id=None, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama(**kw):
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=160, vocab_size=V,
                                   max_position_embeddings=64, bos_token_id=1, eos_token_id=None,
                                   pad_token_id=0, **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


def _mistral_sliding():
    cfg = transformers.MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=160, vocab_size=V,
                                     max_position_embeddings=64, sliding_window=4, pad_token_id=0)
    return transformers.MistralForCausalLM(cfg).eval()


DECODERS = {"gpt2": _gpt2, "llama": _llama}


def _pair(make, **kw):
    """(model on sdpa, the same weights on pysparse attention)."""
    ref = make(**kw)
    ref.set_attn_implementation("sdpa")
    return ref, pysparse.replace_attention(copy.deepcopy(ref))


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(pattn, "_warned", set())  # each test sees its one-time warnings


@pytest.fixture
def op_calls(monkeypatch):
    """Every call of torch.ops.pysparse.attention: shapes, mask and causal flag."""
    calls = []
    real = torch.ops.pysparse.attention

    def spy(q, k, v, mask=None, causal=False, scale=None):
        calls.append(dict(q=tuple(q.shape), k=tuple(k.shape), causal=causal,
                          mask=None if mask is None else tuple(mask.shape),
                          mask_dtype=None if mask is None else mask.dtype))
        return real(q, k, v, mask, causal, scale)

    monkeypatch.setattr(torch.ops.pysparse, "attention", spy)
    return calls


def _padded_batch(lengths, S, side):
    ids = torch.randint(3, V, (len(lengths), S))
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, S - n:] = 1
        else:
            mask[i, :n] = 1
    return ids, mask


@torch.no_grad()
def _out(model, **inputs):
    o = model(**inputs)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


# --- encoders -----------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
def test_bert_padding_matches_sdpa_with_compact_mask(side, op_calls):
    ref, model = _pair(_bert)
    ids, am = _padded_batch([9, 5, 2], 9, side)
    want, got = _out(ref, input_ids=ids, attention_mask=am), _out(model, input_ids=ids,
                                                                  attention_mask=am)
    keep = am.bool()
    torch.testing.assert_close(got[keep], want[keep], **TOL)
    assert len(op_calls) == 2
    for c in op_calls:  # key padding [B, 1, 1, Sk], no causal flag, no [B, 1, Sq, Sk] matrix
        assert c["mask"] == (3, 1, 1, 9) and c["mask_dtype"] == torch.bool
        assert c["causal"] is False


def test_bert_without_padding_passes_no_mask(op_calls):
    ref, model = _pair(_bert)
    ids = torch.randint(3, V, (2, 7))
    torch.testing.assert_close(_out(model, input_ids=ids), _out(ref, input_ids=ids), **TOL)
    assert [c["mask"] for c in op_calls] == [None, None]
    assert not any(c["causal"] for c in op_calls)


# --- decoders -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", DECODERS)
def test_decoder_without_padding_uses_causal_flag(arch, op_calls):
    ref, model = _pair(DECODERS[arch])
    ids = torch.randint(3, V, (2, 8))
    torch.testing.assert_close(_out(model, input_ids=ids), _out(ref, input_ids=ids), **TOL)
    assert len(op_calls) == 2
    for c in op_calls:
        assert c["mask"] is None and c["causal"] is True
    if arch == "llama":  # grouped-query: k/v reach the op with their 2 heads, not repeated
        assert op_calls[0]["q"][1] == 4 and op_calls[0]["k"][1] == 2


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", DECODERS)
def test_decoder_padding_prefill_matches_sdpa(arch, side, op_calls):
    ref, model = _pair(DECODERS[arch])
    ids, am = _padded_batch([10, 6], 10, side)
    want = _out(ref, input_ids=ids, attention_mask=am)
    got = _out(model, input_ids=ids, attention_mask=am)
    keep = am.bool()
    torch.testing.assert_close(got[keep], want[keep], **TOL)
    for c in op_calls:  # padding as [B, 1, 1, Sk], causality as the flag
        assert c["mask"] == (2, 1, 1, 10) and c["causal"] is True


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_left_padded_batch_matches_sdpa(arch, op_calls):
    ref, model = _pair(DECODERS[arch])
    ids, am = _padded_batch([7, 4], 7, "left")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=am, **kw)
        got = model.generate(input_ids=ids, attention_mask=am, **kw)
    assert torch.equal(got, want)
    prefill, decode = op_calls[:2], op_calls[2:]
    assert all(c["q"][2] == 7 and c["mask"] == (2, 1, 1, 7) and c["causal"] for c in prefill)
    assert len(decode) == 2 * 7  # 7 more forwards (the 8th token needs none), 2 layers each
    for step, c in enumerate(decode):  # one query against the cache: key padding, no flag
        sk = 8 + step // 2
        assert c["q"][2] == 1 and c["k"][2] == sk and c["mask"] == (2, 1, 1, sk)
        assert c["causal"] is False


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("arch", DECODERS)
def test_prefill_on_top_of_a_cache(arch, padded, op_calls):
    """A second multi-token forward on a filled cache: Sq=4 queries against Sk=10 keys."""
    ref, model = _pair(DECODERS[arch])
    ids, am = _padded_batch([10, 7] if padded else [10, 10], 10, "left")
    outs = []
    for m in (ref, model):
        with torch.no_grad():
            first = m(input_ids=ids[:, :6], attention_mask=am[:, :6], use_cache=True)
            second = m(input_ids=ids[:, 6:], attention_mask=am, use_cache=True,
                       past_key_values=first.past_key_values)
        outs.append(second.logits)
    torch.testing.assert_close(outs[1], outs[0], **TOL)
    c = op_calls[-1]
    assert c["q"][2] == 4 and c["k"][2] == 10 and c["causal"] is True
    assert c["mask"] == ((2, 1, 1, 10) if padded else None)


def test_static_cache_generate_falls_back_to_full_mask(op_calls):
    """Static caches hold empty key slots past the queries: bottom-right causal would be wrong,
    so the mask function hands over sdpa's full mask."""
    ref, model = _pair(_llama)
    ids, am = _padded_batch([6, 4], 6, "left")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=am, **kw)
        got = model.generate(input_ids=ids, attention_mask=am, **kw)
    assert torch.equal(got, want)
    prefill = op_calls[0]
    assert prefill["mask"][2] == 6 and prefill["causal"] is False  # full [B, 1, Sq, Sk]


def test_sliding_window_gets_the_full_mask(op_calls):
    ref, model = _pair(_mistral_sliding)
    ids, am = _padded_batch([9, 6], 9, "left")
    want = _out(ref, input_ids=ids, attention_mask=am)
    got = _out(model, input_ids=ids, attention_mask=am)
    keep = am.bool()
    torch.testing.assert_close(got[keep], want[keep], **TOL)
    assert all(c["mask"] == (2, 1, 9, 9) and c["causal"] is False for c in op_calls)


def test_packed_sequences_get_the_full_mask(op_calls):
    """Two sequences packed in one row (position_ids restart, no attention_mask)."""
    ref, model = _pair(_llama)
    ids = torch.randint(3, V, (1, 9))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    want = _out(ref, input_ids=ids, position_ids=pos, use_cache=False)  # packing needs no cache
    got = _out(model, input_ids=ids, position_ids=pos, use_cache=False)
    assert not torch.allclose(want, _out(ref, input_ids=ids, use_cache=False))  # it is packed
    torch.testing.assert_close(got, want, **TOL)
    assert all(c["mask"] == (1, 1, 9, 9) and c["causal"] is False for c in op_calls)


# --- the mask function against sdpa_mask ----------------------------------------------------

def _effective(mask, causal, B, q_len, kv_len):
    """The keep pattern [B, 1, Sq, Sk] the op applies for (mask, module causality)."""
    compact = mask is None or mask.shape[2] == 1
    keep = torch.ones(B, 1, q_len, kv_len, dtype=torch.bool)
    if causal and compact and q_len > 1:
        keep = keep & torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    return keep if mask is None else keep & mask


_left = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
_right = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
_full = torch.ones(2, 7, dtype=torch.bool)
CAUSAL, BIDIR = masking_utils.causal_mask_function, masking_utils.bidirectional_mask_function
# (name, kwargs of the mask function, layers' causality, expected form)
MASK_CASES = [
    ("causal, no padding", dict(q_length=7, kv_length=7, attention_mask=_full), True, "none"),
    ("causal, no 2D mask", dict(q_length=7, kv_length=7), True, "none"),
    ("causal, left padding", dict(q_length=7, kv_length=7, attention_mask=_left), True,
     "compact"),
    ("causal, right padding", dict(q_length=7, kv_length=7, attention_mask=_right), True,
     "compact"),
    ("causal, prefill on cache", dict(q_length=3, kv_length=7, q_offset=4,
                                      attention_mask=_left), True, "compact"),
    ("causal, decode", dict(q_length=1, kv_length=7, q_offset=6, attention_mask=_left), True,
     "compact"),
    ("causal, static cache", dict(q_length=3, kv_length=7, q_offset=0,
                                  attention_mask=_left[:, :3]), True, "full"),
    ("causal, skip not allowed", dict(q_length=7, kv_length=7, attention_mask=_left,
                                      allow_is_causal_skip=False), True, "full"),
    ("sliding window", dict(q_length=7, kv_length=7, attention_mask=_left, local_size=3,
                            mask_function=masking_utils.sliding_window_causal_mask_function(3)),
     True, "full"),
    ("or overlay", dict(q_length=7, kv_length=7, attention_mask=_left,
                        mask_function=masking_utils.or_masks(CAUSAL, lambda b, h, q, k: k == 0)),
     True, "full"),
    ("bidirectional, padding", dict(q_length=7, kv_length=7, attention_mask=_right,
                                    mask_function=BIDIR, allow_is_causal_skip=False,
                                    allow_is_bidirectional_skip=True), False, "compact"),
    ("bidirectional, no padding", dict(q_length=7, kv_length=7, attention_mask=_full,
                                       mask_function=BIDIR, allow_is_causal_skip=False,
                                       allow_is_bidirectional_skip=True), False, "none"),
    ("decoder made bidirectional", dict(q_length=7, kv_length=7, attention_mask=_right,
                                        mask_function=BIDIR, allow_is_causal_skip=False,
                                        allow_is_bidirectional_skip=True,
                                        config=transformers.LlamaConfig(is_causal=False)),
     True, "full"),
    ("cross-attention", dict(q_length=3, kv_length=7, attention_mask=_right, mask_function=BIDIR,
                             allow_is_causal_skip=False, allow_is_bidirectional_skip=True),
     False, "compact"),
]


@pytest.mark.parametrize("name,kw,causal,form", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_mask_function_is_compact_only_when_exact(name, kw, causal, form):
    mask = pattn.pysparse_mask(batch_size=2, **kw)
    if form == "none":
        assert mask is None
    elif form == "compact":
        assert mask.shape == (2, 1, 1, kw["kv_length"]) and mask.dtype == torch.bool
    else:
        assert mask.shape == (2, 1, kw["q_length"], kw["kv_length"])
    full = dict(kw, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    want = masking_utils.sdpa_mask(batch_size=2, **full)
    got = _effective(mask, causal, 2, kw["q_length"], kw["kv_length"])
    assert torch.equal(got, want.expand_as(got))


# --- fallbacks ----------------------------------------------------------------------------

def test_training_dropout_falls_back_to_sdpa(op_calls):
    ref, model = _pair(_bert, attention_probs_dropout_prob=0.5)
    ref.train()
    model.train()
    ids, am = _padded_batch([8, 5], 8, "right")
    torch.manual_seed(1)
    want = ref(input_ids=ids, attention_mask=am).last_hidden_state
    torch.manual_seed(1)
    with pytest.warns(pattn.AttentionFallbackWarning, match="dropout"):
        got = model(input_ids=ids, attention_mask=am).last_hidden_state
    assert not op_calls
    keep = am.bool()  # same sdpa call with the same random stream: the same dropout draws
    torch.testing.assert_close(got[keep], want[keep], **TOL)
    got.sum().backward()
    assert model.encoder.layer[0].attention.self.query.weight.grad is not None


def test_gradients_run_through_the_op(op_calls, recwarn):
    """With gradients required the op runs (its backward recomputes the reference) and loss and
    gradients match sdpa's."""
    ref, model = _pair(_llama)
    ids, am = _padded_batch([6, 4], 6, "left")
    ref.train()
    model.train()
    want = ref(input_ids=ids, attention_mask=am, labels=ids).loss
    got = model(input_ids=ids, attention_mask=am, labels=ids).loss
    assert op_calls and not [w for w in recwarn if issubclass(w.category, pattn.AttentionFallbackWarning)]
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, **TOL)
    for name in ("q_proj", "k_proj", "v_proj"):
        g_ref = getattr(ref.model.layers[0].self_attn, name).weight.grad
        g = getattr(model.model.layers[0].self_attn, name).weight.grad
        torch.testing.assert_close(g, g_ref, **TOL)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_output_attentions_returns_eager_weights(arch, op_calls):
    """sdpa returns no weights; the pysparse model returns eager's (GPT-2 collects them with
    hooks, without passing output_attentions down)."""
    make = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}[arch]
    eager = make()
    eager.set_attn_implementation("eager")
    model = pysparse.replace_attention(copy.deepcopy(eager))
    ids, am = _padded_batch([7, 5], 7, "left")
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=am, output_attentions=True)
        with pytest.warns(pattn.AttentionFallbackWarning, match="output_attentions"):
            got = model(input_ids=ids, attention_mask=am, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == 2
    keep = am.bool()
    for a, b in zip(got.attentions, want.attentions):
        assert a.shape == (2, 4, 7, 7)
        rows = keep[:, None, :].expand(-1, 4, -1)  # rows of real query tokens
        torch.testing.assert_close(a[rows], b[rows], **TOL)
    assert not op_calls
    with torch.no_grad():  # and without the request, the op is back
        model(input_ids=ids, attention_mask=am)
    assert len(op_calls) == 2


def test_unsupported_arguments_and_shapes_fall_back(op_calls):
    module = nn.Module()
    module.is_causal = True
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.warns(pattn.AttentionFallbackWarning, match="position_bias"):
        out, _ = pattn.pysparse_attention_forward(module, q, k, k, None,
                                                  position_bias=torch.zeros(1, 2, 4, 4))
    assert not op_calls
    want = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True)
    torch.testing.assert_close(out, want.transpose(1, 2), **TOL)
    with pytest.raises(NotImplementedError, match="eager"):  # sdpa would ignore sinks
        pattn.pysparse_attention_forward(module, q, k, k, None, s_aux=torch.zeros(2))
    v = torch.randn(1, 2, 4, 12)  # value head dim != key head dim (as in MLA): sdpa's job
    with pytest.warns(pattn.AttentionFallbackWarning, match="shapes differ"):
        out, _ = pattn.pysparse_attention_forward(module, q, k, v, None)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, want.transpose(1, 2), **TOL)
    assert not op_calls
    with pytest.raises(NotImplementedError, match="head_mask"):
        pattn.pysparse_attention_forward(module, q, k, k, None, head_mask=torch.ones(2))


def _mask_kind(kind):
    """Masks for B=2, Sq=3, Sk=7 that leave every query row something to attend."""
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[0, 5:] = False  # right padding in row 0
    pad[1, :2] = False  # left padding in row 1
    if kind == "none":
        return None
    if kind == "compact bool":
        return pad[:, None, None, :]
    if kind == "compact additive":
        return torch.zeros(2, 1, 1, 7).masked_fill(~pad[:, None, None, :], float("-inf"))
    full = pad[:, None, None, :] & torch.ones(3, 7, dtype=torch.bool).tril(4)
    full[0, 0, 2, 1] = False  # a pattern no flag can express
    return full


@pytest.mark.parametrize("kind", ["none", "compact bool", "compact additive", "full"])
def test_op_sdpa_and_eager_paths_agree(kind, op_calls):
    """The same call through the op, the sdpa fallback (an unknown argument) and the eager fallback
    (weights): GQA, 3 queries on 7 keys as on top of a cache, every kind of mask."""
    layer = _llama().model.layers[0].self_attn  # is_causal, 4 query heads on 2 kv heads
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    mask = _mask_kind(kind)
    with torch.no_grad():
        out, weights = pattn.pysparse_attention_forward(layer, q, k, v, mask, scaling=0.3)
    assert weights is None and len(op_calls) == 1
    assert op_calls[0]["causal"] is (kind != "full")
    with torch.no_grad(), pytest.warns(pattn.AttentionFallbackWarning, match="not supported"):
        via_sdpa, _ = pattn.pysparse_attention_forward(layer, q, k, v, mask, scaling=0.3,
                                                       unknown_option=1)
    with torch.no_grad(), pytest.warns(pattn.AttentionFallbackWarning, match="weights"):
        via_eager, probs = pattn.pysparse_attention_forward(layer, q, k, v, mask, scaling=0.3,
                                                            output_attentions=True)
    assert len(op_calls) == 1
    torch.testing.assert_close(via_sdpa.detach(), out, **TOL)
    torch.testing.assert_close(via_eager, out, **TOL)
    assert probs.shape == (2, 4, 3, 7)
    assert torch.all(probs[0, :, 0, 5:] == 0)  # padded keys and the causal future get nothing


# --- the API ------------------------------------------------------------------------------

class _BertWithoutSdpa(transformers.BertModel):
    _supports_sdpa = False


def test_bad_inputs():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        pysparse.replace_attention(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        pysparse.replace_attention("bert")
    mpnet = transformers.MPNetModel(transformers.MPNetConfig(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64,
        vocab_size=V))
    with pytest.raises(ValueError, match="AttentionInterface"):  # computes attention itself
        pysparse.replace_attention(mpnet)
    no_sdpa = _BertWithoutSdpa(transformers.BertConfig(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64,
        vocab_size=V))
    with pytest.raises(ValueError, match="does not support sdpa"):
        pysparse.replace_attention(no_sdpa)
    assert no_sdpa.config._attn_implementation == "eager"  # untouched


def test_idempotent_and_reversible(op_calls):
    ref, model = _pair(_bert)
    assert pysparse.replace_attention(model) is model
    assert model.config._attn_implementation == "pysparse"
    ids = torch.randint(3, V, (2, 6))
    _out(model, input_ids=ids)
    assert len(op_calls) == 2
    model.set_attn_implementation("sdpa")
    _out(model, input_ids=ids)
    assert len(op_calls) == 2


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_composes_with_replace_linear_in_either_order(arch, op_calls):
    make = {"bert": _bert, "llama": _llama}[arch]
    base = make()
    ids, am = _padded_batch([7, 4], 7, "left")
    linear_first = copy.deepcopy(base)
    pysparse.replace_linear(linear_first, "w8a8")
    only_linear = copy.deepcopy(linear_first)
    pysparse.replace_attention(linear_first)
    attention_first = pysparse.replace_attention(copy.deepcopy(base))
    pysparse.replace_linear(attention_first, "w8a8")
    a = _out(linear_first, input_ids=ids, attention_mask=am)
    b = _out(attention_first, input_ids=ids, attention_mask=am)
    assert torch.equal(a, b)
    assert len(op_calls) == 4
    keep = am.bool()
    ref = _out(only_linear, input_ids=ids, attention_mask=am)
    assert tolerances.sqnr_db(ref[keep], a[keep]) > 40


def test_compiles_without_graph_breaks():
    _, model = _pair(_bert)
    ids, am = _padded_batch([7, 4], 7, "right")
    eager = _out(model, input_ids=ids, attention_mask=am)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(_out(compiled, input_ids=ids, attention_mask=am), eager, **TOL)


# --- the real model -----------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_embeddings(minilm, texts, op_calls):
    from pysparse.models import embed
    from pysparse.report import cosine_fidelity
    base, tok = minilm
    sentences = sorted(texts[:24], key=len)  # batches of mixed lengths: padding everywhere
    model = pysparse.replace_attention(copy.deepcopy(base))
    ref = embed(base, tok, sentences, batch_size=8)
    assert not op_calls
    out = embed(model, tok, sentences, batch_size=8)
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1)
    assert cos.min() >= MINILM_ATTENTION_COSINE
    assert len(op_calls) == 6 * 3  # 6 layers x 3 batches, each with a key-padding mask
    assert all(c["mask"][1:3] == (1, 1) and c["mask_dtype"] == torch.bool for c in op_calls)
    assert not any(c["causal"] for c in op_calls)

    # Composed with W8A8: dynamic per-token int8 rounding turns fp32-level differences into
    # quantization-step ones, so single sentences move more (transformers' own eager vs sdpa
    # gives a per-sentence minimum of 0.9989 here too); the floor is on the mean.
    w8a8 = copy.deepcopy(base)
    pysparse.replace_linear(w8a8, "w8a8")
    both = pysparse.replace_attention(copy.deepcopy(w8a8))
    fidelity = cosine_fidelity(embed(w8a8, tok, sentences, batch_size=8),
                               embed(both, tok, sentences, batch_size=8))
    assert fidelity >= MINILM_ATTENTION_COSINE
