"""replace_linear(scheme="auto"): the choice logic on synthetic tables, the timing cache, and
end-to-end runs on tiny random models with injected timings (no test depends on real speed)."""
import copy
import json
import math

import pytest
import torch

import pysparse
from pysparse import auto
from pysparse.auto import DENSE, Candidate, choose
from pysparse.formats.sparse24 import is_24
from pysparse.nn.linear import SCHEMES, _PackedLinear, linear_weight
from pysparse.replace import is_linear
from pysparse.testing import tolerances
from pysparse.testing.models import tiny_bert, tiny_gpt2, tiny_llama

ARCHS = {"gpt2": tiny_gpt2, "bert": tiny_bert, "llama": tiny_llama}
# a machine where every scheme is faster than dense, the quantized ones most
FAST = {DENSE: 1.0, "w8a8": 0.3, "2:4+w8a8": 0.2, "2:4": 0.6, "w8": 0.8, "w4": 0.7}


class FakeTimer:
    """Stands in for auto.time_layers: seconds from a {scheme: s} table (or a function of the
    shape), and counts calls."""

    def __init__(self, table=FAST):
        self.table = table
        self.calls = 0
        self.keys = []

    def __call__(self, N, K, M, dtype, schemes, backend=None, device="cpu", budget_s=0.0):
        self.calls += 1
        self.keys += [(N, K, M, s) for s in schemes]
        t = self.table(N, K, M) if callable(self.table) else self.table
        return {s: t[s] * 1e-3 * M / 128 for s in schemes}


@pytest.fixture
def timer(monkeypatch, tmp_path):
    monkeypatch.setenv(auto.CACHE_ENV, str(tmp_path))
    t = FakeTimer()
    monkeypatch.setattr(auto, "time_layers", t)
    return t


def _out(model, ids):
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _schemes(model):
    return {n: (m.scheme if isinstance(m, _PackedLinear) else DENSE)
            for n, m in model.named_modules() if isinstance(m, _PackedLinear) or is_linear(m)}


# ------------------------------------------------------------------------ the choice, pure

def test_choose_fastest_within_budget():
    c = [Candidate("w8a8", 0.3, 0.01), Candidate("2:4+w8a8", 0.2, 0.05),
         Candidate("w8", 0.8, 0.001)]
    assert choose(1.0, c, 0.02, 0.05).scheme == "w8a8"          # 2:4+w8a8 faster, over budget
    assert choose(1.0, c, 0.1, 0.05).scheme == "2:4+w8a8"
    assert choose(1.0, c, 0.005, 0.05).scheme == "w8"
    ch = choose(1.0, c, 0.0, 0.05)
    assert ch.scheme == DENSE and "no scheme within the error budget" in ch.reason
    assert choose(1.0, [], 0.02).scheme == DENSE


def test_choose_keeps_dense_within_margin():
    c = [Candidate("w8a8", 0.97, 0.01), Candidate("w8", 1.5, 0.001)]
    ch = choose(1.0, c, 0.02, 0.05)
    assert ch.scheme == DENSE
    assert "nothing faster within budget; best w8a8 1.03x" in ch.reason
    assert choose(1.0, c, 0.02, 0.0).scheme == "w8a8"           # no margin: 3% is enough
    assert choose(1.0, [Candidate("w8a8", 0.95, 0.0)], 0.02, 0.05).scheme == DENSE  # strict <
    assert choose(1.0, [Candidate("w8a8", 0.5, math.nan)], 1.0).scheme == DENSE    # NaN error


# ------------------------------------------------------------------------ end to end

@pytest.mark.parametrize("arch", ARCHS)
def test_budget_bounds_measured_error(arch, timer):
    model = ARCHS[arch]()
    for budget in (0.0, 0.007, 1.0):
        m = copy.deepcopy(model)
        r = pysparse.replace_linear(m, "auto", max_fidelity_loss=budget, progress=False)
        assert isinstance(r, pysparse.Report)
        for c in r.choices:
            assert c["error"] <= budget
            for s, cand in c["candidates"].items():
                if cand["error"] > budget:
                    assert c["scheme"] != s
        if budget == 0.0:
            assert not r.replaced
            assert not any(isinstance(x, _PackedLinear) for x in m.modules())
        if budget == 1.0:  # everything within budget: the fastest allowed on a dense model
            assert r.replaced and all(c["scheme"] == "w8a8" for c in r.choices)
            assert len(r.replaced) == len(r.choices)
    # what the report says is what the model holds
    assert {x.name for x in r.replaced} == {n for n, s in _schemes(m).items() if s != DENSE}


def test_dense_layers_never_get_24_and_pruned_ones_do(timer):
    model = tiny_llama()
    pysparse.prune(model, pattern="2:4", include=["*.mlp.*"], progress=False)
    r = pysparse.replace_linear(model, "auto", max_fidelity_loss=1.0, progress=False)
    got = _schemes(model)
    for c in r.choices:
        if ".mlp." in c["name"]:
            assert c["scheme"] == "2:4+w8a8"
            assert set(c["candidates"]) == set(auto.DEFAULT_SCHEMES) - {"w4"}  # K=64/160
        else:
            assert "2:4" not in c["scheme"] and "2:4" not in " ".join(c["candidates"])
            assert got[c["name"]] == "w8a8"
    assert "lm_head" in {x.name for x in r.skipped}


def test_w4_only_where_k_divides_128(timer):
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.Linear(64, 8))
    timer.table = {DENSE: 1.0, "w4": 0.1, "w8a8": 0.5}
    r = pysparse.replace_linear(model, "auto", schemes=("w4", "w8a8"), max_fidelity_loss=1.0,
                                progress=False)
    assert [c["scheme"] for c in r.choices] == ["w4", "w8a8"]
    assert "w4" not in r.choices[1]["candidates"]


def test_output_matches_within_chosen_tolerances(timer):
    model = tiny_bert()
    ids = torch.randint(0, 128, (2, 11))
    ref = _out(model, ids)
    # lossless 2:4 packing is fastest on a pruned model: outputs equal the pruned float model
    pruned = copy.deepcopy(model)
    pysparse.prune(pruned, pattern="2:4", progress=False)
    ref24 = _out(pruned, ids)
    timer.table = {**FAST, "2:4": 0.1}
    r = pysparse.replace_linear(pruned, "auto", max_fidelity_loss=1e-4, progress=False)
    assert r.replaced and all(c["scheme"] == "2:4" for c in r.choices)
    torch.testing.assert_close(_out(pruned, ids), ref24, **tolerances.FLOAT_MATMUL[torch.float32])
    # w8a8 where it is fastest: the W8A8 model fidelity floor of test_replace
    timer.table = FAST
    m = copy.deepcopy(model)
    r = pysparse.replace_linear(m, "auto", max_fidelity_loss=0.05, progress=False)
    assert r.replaced
    assert tolerances.sqnr_db(ref, _out(m, ids)) > 20


def test_calib_measures_real_inputs(timer):
    import transformers
    from pysparse.models import ModelNotInstalled, minilm_path
    try:
        tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    except ModelNotInstalled as exc:
        pytest.skip(str(exc))
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=tok.vocab_size,
                                  max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    texts = ["a small test sentence", "another one, a bit longer than the first"] * 3
    seen = []
    real = auto.relative_error

    def spy(module, packed, x):
        seen.append(x.shape[0])
        return real(module, packed, x)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(auto, "relative_error", spy)
        r = pysparse.replace_linear(model, "auto", calib=texts, tokenizer=tok,
                                    max_fidelity_loss=1.0, progress=False)
    n_tokens = sum(len(tok(t)["input_ids"]) for t in texts)
    # real tokens only (padding dropped); the pooler sees one [CLS] row per text
    assert set(seen) == {n_tokens, len(texts)}
    assert "calib" in r.action and r.replaced


def test_report_rows_and_dict(timer):
    timer.table = {DENSE: 1.0, "w8a8": 0.4, "w8": 0.99, "w4": 2.0, "2:4": 0.1, "2:4+w8a8": 0.1}
    model = tiny_bert()
    r = pysparse.replace_linear(model, "auto", max_fidelity_loss=0.05, progress=False)
    row = r.replaced[0]
    assert row.detail.startswith("w8a8: 2.50x vs fp32 (0.400 ms vs 1.000 ms at M=128), err 0.0")
    r = pysparse.replace_linear(tiny_bert(), "auto", schemes=["w8"], progress=False)
    assert not r.replaced
    assert r.skipped[0].detail.startswith("kept fp32: nothing faster within budget; best w8 1.01x")
    d = r.to_dict()
    json.dumps(d)
    assert d["choices"][0]["candidates"]["w8"]["speedup"] == pytest.approx(1 / 0.99)
    assert r.table()[0]["scheme"] == "fp32"
    assert "skipped" in str(r)
    # tuple of token counts: times summed
    r = pysparse.replace_linear(tiny_bert(), "auto", tokens=(1, 128), max_fidelity_loss=0.05,
                                progress=False)
    assert "at M=1+128" in r.replaced[0].detail
    assert r.choices[0]["dense_ms"] == pytest.approx(1.0 * (1 + 128) / 128)


# ------------------------------------------------------------------------ the cache

def test_cache_written_reused_and_rebuilt(timer, tmp_path):
    model = tiny_gpt2()
    pysparse.replace_linear(copy.deepcopy(model), "auto", progress=False)
    files = list(tmp_path.glob("auto-*.json"))
    assert len(files) == 1 and files[0] == auto.cache_file()
    name = files[0].name
    assert f"-{pysparse.__version__}-torch" in name and name.endswith(
        f"-{torch.get_num_threads()}t.json")
    data = json.loads(files[0].read_text())
    assert "64,64,128,fp32,dense,auto" in data["timings"] or any(
        k.endswith(",dense,auto") for k in data["timings"])
    first = timer.calls
    assert first > 0
    # distinct shapes timed once each (GPT-2: c_attn 192x64, c_proj 64x64, c_fc 256x64,
    # mlp.c_proj 64x256)
    assert len(set(timer.keys)) == len(timer.keys)
    r1 = pysparse.replace_linear(copy.deepcopy(model), "auto", progress=False)
    assert timer.calls == first  # all from the cache
    # corrupt file: warn, re-measure, rewrite
    files[0].write_text("{not json")
    with pytest.warns(UserWarning, match="timing cache"):
        r2 = pysparse.replace_linear(copy.deepcopy(model), "auto", progress=False)
    assert timer.calls > first
    assert json.loads(files[0].read_text())["timings"]
    assert [c["scheme"] for c in r1.choices] == [c["scheme"] for c in r2.choices]
    # wrong structure is corrupt too
    files[0].write_text(json.dumps({"timings": {"a": "fast"}}))
    with pytest.warns(UserWarning, match="timing cache"):
        pysparse.replace_linear(copy.deepcopy(model), "auto", progress=False)
    # cache=False: times again, writes nothing
    files[0].unlink()
    calls = timer.calls
    pysparse.replace_linear(copy.deepcopy(model), "auto", cache=False, progress=False)
    assert timer.calls > calls and not list(tmp_path.glob("auto-*.json"))


def test_real_timer_smoke(monkeypatch, tmp_path):
    """The real timer runs and returns positive seconds for every scheme (speed not asserted)."""
    monkeypatch.setenv(auto.CACHE_ENV, str(tmp_path))
    t = auto.time_layers(8, 128, 4, torch.float32, (DENSE, *SCHEMES), budget_s=0.0)
    assert set(t) == {DENSE, *SCHEMES} and all(v > 0 for v in t.values())
    model = torch.nn.Sequential(torch.nn.Linear(128, 16))
    r = pysparse.replace_linear(model, "auto", progress=False, time_budget=0.0)
    assert len(r.choices) == 1 and set(r.choices[0]["candidates"]) == {"w8a8", "w8", "w4"}
    assert not is_24(linear_weight(model[0])) or r.replaced


# ------------------------------------------------------------------------ errors

def test_bad_arguments(timer):
    m = tiny_bert()
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="max_fidelity_loss"):
            pysparse.replace_linear(m, "auto", max_fidelity_loss=bad)
    with pytest.raises(TypeError, match="max_fidelity_loss"):
        pysparse.replace_linear(m, "auto", max_fidelity_loss="2%")
    with pytest.raises(ValueError, match=r"unknown scheme\(s\) 'w3a3'"):
        pysparse.replace_linear(m, "auto", schemes=("w8a8", "w3a3"))
    for bad in (0, -5, (128, 0), ()):
        with pytest.raises(ValueError, match="tokens"):
            pysparse.replace_linear(m, "auto", tokens=bad)
    with pytest.raises(ValueError, match="tokenizer"):
        pysparse.replace_linear(m, "auto", calib=["some text"])
    with pytest.raises(ValueError, match="margin"):
        pysparse.replace_linear(m, "auto", margin=1.5)
    with pytest.raises(TypeError, match="unknown option"):
        pysparse.replace_linear(m, "auto", group_size=64)
    with pytest.raises(ValueError, match="activation"):
        pysparse.replace_linear(m, "auto", activation="static")
    assert timer.calls == 0
    assert not any(isinstance(x, _PackedLinear) for x in m.modules())
