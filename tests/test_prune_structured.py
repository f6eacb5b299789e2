"""Structured pruning: heads / neurons / blocks physically removed, config kept true."""
import pickle

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertModel, DistilBertConfig, DistilBertModel, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)

from pysparse.prune.structured import prune_structured

VOCAB = 96


def tiny(family, layers=2):
    if family == "bert":
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4,
                         intermediate_size=128, num_hidden_layers=layers,
                         max_position_embeddings=32)
        return BertModel(cfg).eval()
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=layers, n_positions=32,
                         bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=128, num_hidden_layers=layers,
                      max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


FAMILIES = ["bert", "gpt2", "llama"]


def ids(batch=2, seq=7):
    return torch.randint(1, VOCAB, (batch, seq))


@torch.no_grad()
def out(model, x):
    o = model(input_ids=x)
    return o.logits if hasattr(o, "logits") and o.logits is not None else o.last_hidden_state


def attn_linears(model, family, layer=0):
    """(q, k, v, o) [out, in] weights of one block (GPT-2: the fused c_attn thirds)."""
    if family == "bert":
        a = model.encoder.layer[layer].attention
        return (a.self.query.weight, a.self.key.weight, a.self.value.weight,
                a.output.dense.weight)
    if family == "gpt2":
        a = model.transformer.h[layer].attn
        q, k, v = a.c_attn.weight.t().split(a.split_size, 0)
        return q, k, v, a.c_proj.weight.t()
    a = model.model.layers[layer].self_attn
    return a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight


def mlp_linears(model, family, layer=0):
    """(up, down) [out, in] weights of one block."""
    if family == "bert":
        b = model.encoder.layer[layer]
        return b.intermediate.dense.weight, b.output.dense.weight
    if family == "gpt2":
        m = model.transformer.h[layer].mlp
        return m.c_fc.weight.t(), m.c_proj.weight.t()
    m = model.model.layers[layer].mlp
    return m.up_proj.weight, m.down_proj.weight


def assert_rebuilds(model, x, tmp_path):
    """config describes the model: a fresh build loads the state dict strictly, and the
    save_pretrained / from_pretrained round trip gives the same outputs."""
    ref = out(model, x)
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(out(fresh, x), ref, rtol=0, atol=0)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    loaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(out(loaded, x), ref, rtol=0, atol=0)
    assert type(loaded) is type(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_shrink_config_and_round_trip(family, tmp_path):
    model = tiny(family)
    x = ids()
    hidden = 64
    heads, kv = (8, 4) if family == "llama" else (4, 4)
    hd = hidden // heads
    report = prune_structured(model, "heads", 0.25, progress=False)
    kept_kv = kv - 1
    kept = kept_kv * heads // kv
    c = model.config
    assert c.num_attention_heads == kept and c.head_dim == hd
    if family == "llama":
        assert c.num_key_value_heads == kept_kv
    for layer in range(2):
        q, k, v, o = attn_linears(model, family, layer)
        assert q.shape == (kept * hd, hidden)
        assert k.shape == v.shape == (kept_kv * hd, hidden)
        assert o.shape == (hidden, kept * hd)
    assert len(report.pruned) == 2
    unit = "kv groups" if family == "llama" else "heads"
    assert report.pruned[0].detail.startswith(f"1/{kv} {unit}")
    assert out(model, x).shape[:2] == x.shape
    # the stock classes cannot rebuild these (see the module docstring): the subclasses can
    assert type(model).__name__.endswith("WithPrunedHeads")
    assert type(model.config).__name__.endswith("ConfigWithPrunedHeads")
    # hidden states / attention maps are still recorded (distillation needs them)
    with torch.no_grad():
        res = model(input_ids=x, output_hidden_states=True, output_attentions=True)
    assert res.hidden_states is not None and len(res.hidden_states) == 3
    assert res.hidden_states[-1].shape == (*x.shape, hidden)
    assert_rebuilds(model, x, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_neurons_shrink_config_and_round_trip(family, tmp_path):
    model = tiny(family)
    x = ids()
    inner = 256 if family == "gpt2" else 128
    kept = inner - inner // 4
    report = prune_structured(model, "neurons", 0.25, progress=False)
    assert (model.config.n_inner if family == "gpt2" else model.config.intermediate_size) == kept
    for layer in range(2):
        up, down = mlp_linears(model, family, layer)
        assert up.shape == (kept, 64) and down.shape == (64, kept)
    if family == "llama":
        assert model.model.layers[0].mlp.gate_proj.weight.shape == (kept, 64)
        assert model.model.layers[0].mlp.intermediate_size == kept
    assert type(model).__name__ == {"bert": "BertModel", "gpt2": "GPT2LMHeadModel",
                                    "llama": "LlamaForCausalLM"}[family]
    assert report.pruned[0].detail.startswith(f"{inner // 4}/{inner} neurons")
    assert_rebuilds(model, x, tmp_path)


def zero_head(model, family, unit):
    """Zero every weight head ``unit`` (Llama: kv group) owns, in every block."""
    with torch.no_grad():
        for layer in range(model.config.num_hidden_layers):
            q, k, v, o = attn_linears(model, family, layer)
            hd, qw = k.shape[0] // 4, q.shape[0] // 4  # 4 units: k/v rows, q rows (o cols)
            q[unit * qw:(unit + 1) * qw] = 0
            k[unit * hd:(unit + 1) * hd] = 0
            v[unit * hd:(unit + 1) * hd] = 0
            o[:, unit * qw:(unit + 1) * qw] = 0


@pytest.mark.parametrize("method", ["magnitude", "taylor"])
@pytest.mark.parametrize("family", FAMILIES)
def test_removing_zero_heads_is_exact(family, method):
    model = tiny(family)
    x = ids()
    zero_head(model, family, unit=2)
    ref = out(model, x)
    calib = [{"input_ids": ids(4, 9)}] if method == "taylor" else None
    report = prune_structured(model, "heads", 0.25, method=method, calib=calib, progress=False)
    assert all(r.detail.endswith("[2]") for r in report.pruned)
    torch.testing.assert_close(out(model, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_zero_neurons_is_exact(family):
    model = tiny(family)
    x = ids()
    gone = None
    with torch.no_grad():
        for layer in range(2):
            up, down = mlp_linears(model, family, layer)
            gone = torch.randperm(up.shape[0])[:up.shape[0] // 4]
            up[gone] = 0  # so magnitude picks exactly these
            down[:, gone] = 0
            if family == "llama":
                model.model.layers[layer].mlp.gate_proj.weight[gone] = 0
    ref = out(model, x)
    report = prune_structured(model, "neurons", 0.25, progress=False)
    assert str(sorted(gone.tolist())[:8])[1:-1] in report.pruned[-1].detail
    torch.testing.assert_close(out(model, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layer_drop_keeps_kv_cache_generation(family, tmp_path):
    model = tiny(family, layers=3)
    report = prune_structured(model, "layers", None, layers=[1], progress=False)
    assert model.config.num_hidden_layers == 2
    assert [r.name for r in report.pruned] == [
        ("transformer.h" if family == "gpt2" else "model.layers") + ".1"]
    blocks = model.transformer.h if family == "gpt2" else model.model.layers
    idx = [m.layer_idx for b in blocks for m in b.modules() if hasattr(m, "layer_idx")]
    assert sorted(set(idx)) == [0, 1]
    x = ids(1, 5)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(x, use_cache=True, **kw)
    uncached = model.generate(x, use_cache=False, **kw)
    assert cached.shape == (1, 11)
    torch.testing.assert_close(cached, uncached)
    assert_rebuilds(model, x, tmp_path)


def test_layer_drop_by_importance_bert(tmp_path):
    model = tiny("bert", layers=4)
    with torch.no_grad():
        for m in model.encoder.layer[2].modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(0.01)
    report = prune_structured(model, "layers", 0.25, progress=False)
    assert [r.name for r in report.pruned] == ["encoder.layer.2"]
    assert model.config.num_hidden_layers == 3 and len(model.encoder.layer) == 3
    assert_rebuilds(model, ids(), tmp_path)


def test_taylor_restores_flags_and_grads():
    model = tiny("gpt2")
    model.transformer.wte.weight.requires_grad_(False)
    model.transformer.h[1].mlp.c_fc.weight.requires_grad_(False)
    probe = model.transformer.ln_f.weight
    probe.grad = torch.ones_like(probe)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    prune_structured(model, "neurons", 0.25, method="taylor", calib=[{"input_ids": ids(2, 6)}],
                     progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(probe.grad, torch.ones_like(probe))
    assert all(p.grad is None for p in model.parameters() if p is not probe)


def test_taylor_takes_strings_with_tokenizer():
    class Tok:
        def __call__(self, texts, **kw):
            n = max(len(t) for t in texts)
            return {"input_ids": torch.tensor([[1 + ord(c) % (VOCAB - 1) for c in t.ljust(n)]
                                               for t in texts]),
                    "attention_mask": torch.tensor([[1] * len(t) + [0] * (n - len(t))
                                                    for t in texts])}
    model = tiny("bert")
    report = prune_structured(model, "heads", 0.5, method="taylor", calib=["a text", "more"],
                              tokenizer=Tok(), progress=False)
    assert model.config.num_attention_heads == 2 and len(report.pruned) == 2


def test_random_is_seeded():
    chosen = []
    for _ in range(2):
        model = tiny("llama")
        r = prune_structured(model, "neurons", 0.5, method="random", seed=3, progress=False)
        chosen.append([row.detail for row in r.pruned])
    assert chosen[0] == chosen[1]


def test_heads_and_neurons_compose(tmp_path):
    model = tiny("gpt2")
    prune_structured(model, "heads", 0.5, progress=False)
    prune_structured(model, "neurons", 0.5, progress=False)
    prune_structured(model, "heads", 0.5, progress=False)
    assert model.config.num_attention_heads == 1 and model.config.n_inner == 128
    assert_rebuilds(model, ids(), tmp_path)
    x = ids()
    torch.testing.assert_close(out(pickle.loads(pickle.dumps(model)), x), out(model, x))


def test_llama_valid_head_count_keeps_stock_classes():
    model = tiny("llama")
    prune_structured(model, "heads", 0.5, progress=False)  # 4 of 8 heads: 64 % 4 == 0
    assert type(model) is LlamaForCausalLM and type(model.config) is LlamaConfig


# --------------------------------------------------------------------------------- errors


def test_unsupported_models():
    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_heads=2, hidden_dim=64, n_layers=1)
    with pytest.raises(NotImplementedError, match="bert.*gpt2.*llama"):
        prune_structured(DistilBertModel(cfg), "heads", 0.5)
    with pytest.raises(NotImplementedError, match="not supported"):
        prune_structured(nn.Sequential(nn.Linear(4, 4)), "neurons", 0.5)


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5, 0.1, 0.9, "half"])
def test_bad_fractions_leave_model_untouched(sparsity):
    model = tiny("bert")  # 4 heads: 0.1 rounds to removing 0, 0.9 to removing all 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="sparsity"):
        prune_structured(model, "heads", sparsity)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.num_attention_heads == 4 and type(model) is BertModel


def test_argument_errors():
    model = tiny("bert")
    with pytest.raises(ValueError, match="calib"):
        prune_structured(model, "heads", 0.25, method="taylor")
    with pytest.raises(ValueError, match="pattern"):
        prune_structured(model, "2:4", 0.5)
    with pytest.raises(ValueError, match="method"):
        prune_structured(model, "heads", 0.25, method="wanda")
    with pytest.raises(TypeError, match="unknown option"):
        prune_structured(model, "heads", 0.25, blocks=[1])
    with pytest.raises(ValueError, match="include"):
        prune_structured(model, "heads", 0.25, include=["encoder.layer.0.*"])
    with pytest.raises(ValueError, match="not both"):
        prune_structured(model, "layers", 0.5, layers=[0])
    with pytest.raises(ValueError, match="out of range"):
        prune_structured(model, "layers", None, layers=[5])
    with pytest.raises(ValueError, match="keep at least one"):
        prune_structured(model, "layers", None, layers=[0, 1])
    assert model.config.num_hidden_layers == 2 and model.config.num_attention_heads == 4


# --------------------------------------------------------------------------------- MiniLM


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "taylor"])
def test_minilm_heads_and_neurons(minilm, method):
    import copy

    from pysparse.data import load_descriptions
    from pysparse.models import embed
    from pysparse.report import cosine_fidelity
    base, tok = minilm
    model = copy.deepcopy(base)
    texts = load_descriptions(40, seed=2)
    calib = texts[:8] if method == "taylor" else None
    c = base.config
    L, H, hd, hidden, inner = (c.num_hidden_layers, c.num_attention_heads,
                               c.hidden_size // c.num_attention_heads, c.hidden_size,
                               c.intermediate_size)
    n0 = sum(p.numel() for p in model.parameters())
    prune_structured(model, "heads", 0.25, method=method, calib=calib, tokenizer=tok,
                     progress=False)
    prune_structured(model, "neurons", 0.25, method=method, calib=calib, tokenizer=tok,
                     progress=False)
    gone_heads, gone_neurons = round(0.25 * H), round(0.25 * inner)
    expected = L * (gone_heads * hd * (4 * hidden + 3) + gone_neurons * (2 * hidden + 1))
    assert n0 - sum(p.numel() for p in model.parameters()) == expected
    assert model.config.num_attention_heads == H - gone_heads
    assert model.config.intermediate_size == inner - gone_neurons
    cos = cosine_fidelity(embed(base, tok, texts[8:]), embed(model, tok, texts[8:]))
    assert 0.5 < cos < 1.0
