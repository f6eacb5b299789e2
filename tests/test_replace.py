import copy

import pytest
import torch
from torch import nn

import pysparse
from pysparse.nn import Int8Linear, Sparse24Int8Linear, Sparse24Linear
from pysparse.replace import is_linear
from pysparse.testing import tolerances
from pysparse.testing.models import tiny_bert, tiny_gpt2, tiny_llama





ARCHS = {"gpt2": tiny_gpt2, "bert": tiny_bert, "llama": tiny_llama}
SCHEME_CLS = {"w8a8": Int8Linear, "2:4": Sparse24Linear, "2:4+w8a8": Sparse24Int8Linear}


def _out(model, ids):
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _n_linear(model):
    return sum(1 for n, m in model.named_modules() if is_linear(m) and n.split(".")[-1] != "lm_head")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", SCHEME_CLS)
def test_replace_random_models(arch, scheme):
    model = ARCHS[arch]()
    if scheme.startswith("2:4"):
        pysparse.prune(model, pattern="2:4")
    ids = torch.randint(0, 128, (2, 11))
    ref = _out(model, ids)
    n = _n_linear(model)
    report = pysparse.replace_linear(model, scheme)
    assert len(report.replaced) == n > 0
    assert sum(isinstance(m, SCHEME_CLS[scheme]) for m in model.modules()) == n
    assert all(r.detail == "excluded by pattern" for r in report.skipped)  # only lm_head
    out = _out(model, ids)
    if scheme == "2:4":  # lossless packing of an already-pruned weight
        torch.testing.assert_close(out, ref, **tolerances.FLOAT_MATMUL[torch.float32])
    else:
        assert tolerances.sqnr_db(ref, out) > 20


def test_gpt2_conv1d_is_handled():
    model = tiny_gpt2()
    assert any(type(m).__name__ == "Conv1D" for m in model.modules())
    pysparse.replace_linear(model, "w8a8")
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())
    assert isinstance(model.lm_head, nn.Linear)  # tied head skipped by default


def test_include_exclude_filter():
    model = tiny_bert()
    r = pysparse.replace_linear(copy.deepcopy(model), include=["*.attention.self.*"])
    assert {x.name.split(".")[-1] for x in r.replaced} == {"query", "key", "value"}
    r = pysparse.replace_linear(copy.deepcopy(model), exclude=["pooler.dense", "*.query"])
    assert not any(x.name.endswith("query") or x.name == "pooler.dense" for x in r.replaced)
    r = pysparse.replace_linear(copy.deepcopy(model),
                                filter_fn=lambda m, name: m.out_features > 64)
    assert r.replaced and all(x.shape[0] > 64 for x in r.replaced)
    assert "filter_fn returned False" in str(r)


def test_24_on_dense_weights_raises_and_leaves_model_untouched():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r'pysparse.prune\(model, pattern="2:4"\)'):
        pysparse.replace_linear(model, "2:4")
    assert not any(isinstance(m, Sparse24Linear) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown scheme"):
        pysparse.replace_linear(tiny_bert(), "w3a3")
    with pytest.raises(TypeError, match="nn.Module"):
        pysparse.replace_linear("not a model")
    with pytest.raises((RuntimeError, ValueError), match="backend"):
        pysparse.replace_linear(tiny_bert(), backend="cuda")
    with pytest.raises(ValueError, match="method"):
        pysparse.prune(tiny_bert(), pattern="2:4", method="wanda-typo")
    with pytest.raises(ValueError, match="exactly one"):
        pysparse.prune(tiny_bert())


@pytest.mark.parametrize("scheme", ["w8a8", "2:4+w8a8", "2:4"])
def test_bf16_model_and_dtype_moves(scheme):
    model = tiny_llama()
    if scheme.startswith("2:4"):
        pysparse.prune(model, pattern="2:4")
    ids = torch.randint(0, 128, (1, 9))
    ref = _out(model, ids)
    pysparse.replace_linear(model, scheme)
    model.to(torch.bfloat16)
    for m in model.modules():
        if hasattr(m, "weight_scale"):
            assert m.weight_scale.dtype == torch.float32  # not rounded by .to(bf16)
    out = _out(model, ids)
    assert out.dtype == torch.bfloat16
    assert tolerances.sqnr_db(ref, out.float()) > 15


def test_state_dict_roundtrip():
    a, b = tiny_bert(), tiny_bert()
    pysparse.replace_linear(a, "w8a8")
    pysparse.replace_linear(b, "w8a8")
    sd = a.state_dict()
    assert any(k.endswith(("weight_q", "weight_packed")) for k in sd)
    assert any(k.endswith("weight_scale") for k in sd)
    b.load_state_dict(sd)
    ids = torch.randint(0, 128, (2, 7))
    assert torch.equal(_out(a, ids), _out(b, ids))


def test_forced_reference_backend_module():
    model = tiny_bert()
    ids = torch.randint(0, 128, (2, 7))
    auto = copy.deepcopy(model)
    pysparse.replace_linear(auto, "w8a8")
    pysparse.replace_linear(model, "w8a8", backend="reference")
    assert all(m.backend == "reference" for m in model.modules() if isinstance(m, Int8Linear))
    torch.testing.assert_close(_out(model, ids), _out(auto, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["w8a8", "2:4+w8a8"])
def test_torch_compile_no_graph_break(scheme):
    model = tiny_bert()
    if scheme.startswith("2:4"):
        pysparse.prune(model, pattern="2:4")
    pysparse.replace_linear(model, scheme)
    ids = torch.randint(0, 128, (2, 7))
    eager = _out(model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")  # fullgraph: no breaks
    torch.testing.assert_close(_out(compiled, ids), eager, rtol=1e-4, atol=1e-4)


def test_summary_bytes():
    model = tiny_bert()
    dense = sum(r.weight_bytes for r in pysparse.summary(model))
    pysparse.replace_linear(model, "w8a8")
    rows = pysparse.summary(model)
    assert all(r.scheme == "w8a8" for r in rows)
    assert sum(r.weight_bytes for r in rows) < 0.3 * dense


@pytest.mark.slow
def test_minilm_w8a8_fidelity(minilm, texts):
    from pysparse.models import embed
    from pysparse.report import cosine_fidelity, recall_at_k
    model, tok = minilm
    q = copy.deepcopy(model)
    report = pysparse.replace_linear(q, "w8a8")
    assert len(report.replaced) == 37 and not report.skipped
    ref, out = embed(model, tok, texts), embed(q, tok, texts)
    assert cosine_fidelity(ref, out) >= tolerances.W8A8_MINILM_COSINE
    assert recall_at_k(ref, out, 10) >= tolerances.W8A8_MINILM_RECALL10


@pytest.mark.parametrize("layout", ["canonical", "sp24"])
def test_sparse24_layouts_agree_and_follow_dtype(layout):
    """Both 2:4 layouts give the reference result; the packed sp24 float values keep a valid
    layout through model.to(bfloat16) / .to(float16) (the latter runs the reference)."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(40, 37))
    pysparse.prune(lin, pattern="2:4")
    lin = lin[0]
    x = torch.randn(5, 40)
    for cls in (Sparse24Linear, Sparse24Int8Linear):
        m = cls.from_linear(lin, layout=layout)
        assert m.layout == layout
        ref = m.dequantized_weight().float()
        torch.testing.assert_close(m(x), x @ ref.T + lin.bias.detach(), rtol=0.05, atol=0.05)
    m = Sparse24Linear.from_linear(lin, layout=layout)
    want = x @ lin.weight.detach().T + lin.bias.detach()
    for dt in (torch.bfloat16, torch.float16):
        y = m.to(dt)(x.to(dt))
        assert y.dtype == dt
        torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.05)
    assert m.bias.dtype == torch.float32
