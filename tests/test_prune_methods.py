"""The pruning criteria of pysparse.prune: magnitude, random, wanda, taylor, sparsegpt."""
import copy
import sys
import types

import pytest
import torch
from torch import nn

import pysparse
from pysparse import calib as pcalib
from pysparse.formats import sparse24
from pysparse.nn.linear import linear_weight
from pysparse.prune import masks, sparsegpt_solve
from pysparse.prune.criteria import taylor_scores
from pysparse.prune.sequential import find_blocks
from pysparse.replace import is_linear
from pysparse.testing import tolerances
from pysparse.testing.models import tiny_bert, tiny_llama

METHODS = ("magnitude", "random", "wanda", "taylor", "sparsegpt")
# (pattern, sparsity, scope)
TARGETS = {"2:4": ("2:4", None, "layer"), "4:8": ("4:8", None, "layer"),
           "s50": (None, 0.5, "layer"), "s50-global": (None, 0.5, "global")}


# ---------------------------------------------------------------------------------- models


ARCHS = {"bert": tiny_bert, "llama": tiny_llama}


def _calib(n=8, seq=12, vocab=128, seed=0):
    """Two tokenized batches, right-padded rows included."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(1, vocab, (n // 2, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[1::2, seq - 4:] = 0
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


class _Embed(nn.Module):
    """input_ids -> embeddings -> optional blocks (an nn.ModuleList) -> head."""

    def __init__(self, emb: torch.Tensor, blocks=(), head: nn.Module | None = None):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(emb.clone(), freeze=False)
        self.layers = nn.ModuleList(blocks) if blocks else None
        self.head = head

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for block in self.layers or ():
            h = block(h)
        return self.head(h) if self.head is not None else h


def _selected(model):
    return {n: m for n, m in model.named_modules()
            if is_linear(m) and n.split(".")[-1] != "lm_head"}


def _out(model, batch):
    with torch.no_grad():
        o = model(**batch)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


# ---------------------------------------------------------------------------------- masks
def test_nm_mask_matches_mask_24_and_counts():
    w = torch.randn(8, 32)
    w[0, :4] = 1.0  # ties: the lower index is kept, as sparse24.mask_24 does
    assert torch.equal(masks.nm_mask(w.abs(), 2, 4), sparse24.mask_24(w))
    for n, m in ((1, 4), (4, 8), (3, 8)):
        keep = masks.nm_mask(w.abs(), n, m)
        assert bool((keep.reshape(8, -1, m).sum(-1) == n).all())
        assert masks.is_nm(w * keep, n, m) and not masks.is_nm(w, n, m)


def test_lowest_k_exact_count_with_ties():
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 1.0]])
    keep = masks.lowest_k(s, 3)
    assert int((~keep).sum()) == 3
    assert bool(keep[1, 1:3].all())
    assert int((~masks.row_mask(s, 0.5)).sum()) == 4


# ---------------------------------------------------------------------------------- wanda
def test_wanda_hand_computed_mask():
    # X = diag(norms): column j of the layer input has norm norms[j]; a padded token with a
    # huge embedding must not count
    norms = torch.tensor([4.0, 1.0, 0.5, 2.0])
    emb = torch.cat([torch.diag(norms), torch.full((1, 4), 100.0)])
    fc = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 4.0], [-4.0, 3.0, 2.0, 1.0]]))
    model = _Embed(emb, head=fc)
    batch = {"input_ids": torch.tensor([[0, 1, 2, 3, 4]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    # scores |w| * norms: row 0 [4, 2, 1.5, 8] -> keep 0, 3; row 1 [16, 3, 1, 2] -> keep 0, 1
    expected = torch.tensor([[True, False, False, True], [True, True, False, False]])
    m = copy.deepcopy(model)
    pysparse.prune(m, sparsity=0.5, method="wanda", calib=[batch], min_samples=1,
                   progress=False)
    assert torch.equal(m.head.weight != 0, expected)
    # magnitude keeps columns 2, 3 of row 0 instead
    m = copy.deepcopy(model)
    pysparse.prune(m, sparsity=0.5, progress=False)
    assert torch.equal(m.head.weight[0] != 0, torch.tensor([False, False, True, True]))
    # 2:4: one group per row, same comparison
    m = copy.deepcopy(model)
    pysparse.prune(m, pattern="2:4", method="wanda", calib=[batch], min_samples=1,
                   progress=False)
    assert torch.equal(m.head.weight != 0, expected)
    assert torch.equal(m.head.weight[expected], model.head.weight[expected])


# ---------------------------------------------------------------------------------- taylor
def test_taylor_score_is_weight_times_accumulated_grad():
    torch.manual_seed(0)
    model = _Embed(torch.randn(10, 8), blocks=[nn.Sequential(nn.Linear(8, 8), nn.Tanh())],
                   head=nn.Linear(8, 3))
    model.emb.weight.requires_grad_(False)  # flags that must come back as they were
    model.head.bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    target = torch.randn(3)
    data = [{"input_ids": torch.randint(0, 10, (2, 5))} for _ in range(3)]

    def loss_fn(_model, _batch, out):
        return ((out - target) ** 2).sum()

    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    for b in data:  # autograd by hand: the gradient of the summed loss
        loss_fn(ref, b, ref(**b)).backward()
    layers = {"layers.0.0": model.layers[0][0], "head": model.head}
    expected = {"layers.0.0": (ref.layers[0][0].weight * ref.layers[0][0].weight.grad).abs(),
                "head": (ref.head.weight * ref.head.weight.grad).abs()}
    scores = taylor_scores(model, layers, data, loss_fn, progress=False)
    for name in layers:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-5, atol=1e-7)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())

    report = pysparse.prune(model, sparsity=0.5, method="taylor", calib=data, loss_fn=loss_fn,
                            min_samples=1, progress=False)
    assert len(report.pruned) == 2
    for name, module in layers.items():
        assert torch.equal(module.weight != 0, masks.unstructured_mask(expected[name], 0.5))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_taylor_default_loss_and_layers_without_gradient():
    model = tiny_bert()  # default loss reads last_hidden_state: the pooler gets no gradient
    report = pysparse.prune(model, pattern="2:4", method="taylor", calib=_calib(),
                            progress=False)
    pooler = next(r for r in report.layers if r.name == "pooler.dense")
    assert pooler.status == "pruned" and "by magnitude" in pooler.detail
    assert sparse24.is_24(model.pooler.dense.weight)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------- sparsegpt
def _layer_problem(rows=16, K=32, n=2048, seed=0):
    """W [rows, K] and inputs X [n, K] shaped like a transformer's: per-feature scales spread
    over an order of magnitude (log-normal) and mildly correlated features. fp64."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(K, dtype=torch.float64) + 0.3 * torch.randn(K, K, generator=g,
                                                                dtype=torch.float64) / K ** 0.5
    scale = torch.randn(K, generator=g, dtype=torch.float64).exp()
    X = (torch.randn(n, K, generator=g, dtype=torch.float64) @ mix) * scale
    W = torch.randn(rows, K, generator=g, dtype=torch.float64)
    return W, X


def _recon_error(W, Wp, X):
    return float((X @ (W - Wp).T).pow(2).sum())


def _least_squares(W, X, keep):
    """Per row, the kept weights minimizing ||X w - X w'||^2: H_kk w'_k = (H w)_k."""
    H = X.T @ X
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        k = keep[r]
        out[r, k] = torch.linalg.solve(H[k][:, k], (H @ W[r])[k])
    return out


@pytest.mark.parametrize("blocksize", [64, 8])
def test_sparsegpt_equals_least_squares_when_pruned_weights_come_first(blocksize):
    # SparseGPT fixes columns left to right: pruning column i updates the columns after i
    # optimally (OBS) but never the kept weights before it. When, in every row, the pruned
    # weights precede the kept ones, nothing kept is frozen early and the result is the exact
    # least-squares reconstruction for that mask (any blocksize: lazy batching is exact).
    # Tolerance: fp64 round-off of a 32x32 Cholesky/solve (measured ~1e-13).
    W, X = _layer_problem()
    H = 2 * X.T @ X / X.shape[0]
    keep = torch.ones_like(W, dtype=torch.bool)
    for r in range(W.shape[0]):
        keep[r, : 1 + (5 * r) % 20] = False
    Wp, got_keep = sparsegpt_solve(W, H, mask=keep, blocksize=blocksize, percdamp=0.0)
    assert torch.equal(got_keep, keep)
    torch.testing.assert_close(Wp, _least_squares(W, X, keep), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"nm": (2, 4)}])
def test_sparsegpt_one_shot_close_to_least_squares_and_beats_magnitude(target):
    # One-shot mask (blocksize >= K: the whole mask is chosen before any update). For a general
    # mask SparseGPT is the least-squares solution up to the frozen-kept-weights approximation
    # above, so LS <= SparseGPT <= 1.10 * LS. Measured on these inputs: 1.063 (50%) and 1.037
    # (2:4); the gap grows with feature correlation (1.0 for uncorrelated inputs, ~1.4-1.7
    # for strongly correlated ones), 10% leaves room for this mild correlation only.
    W, X = _layer_problem()
    H = 2 * X.T @ X / X.shape[0]
    Wp, keep = sparsegpt_solve(W, H, blocksize=W.shape[1], percdamp=0.0, **target)
    if "nm" in target:
        assert masks.is_nm(Wp, 2, 4) and bool(keep.reshape(16, -1, 4).sum(-1).eq(2).all())
    else:
        assert int((~keep).sum()) == W.numel() // 2
    assert torch.equal(Wp != 0, keep)
    err = _recon_error(W, Wp, X)
    ls = _recon_error(W, _least_squares(W, X, keep), X)
    assert ls <= err <= 1.10 * ls
    scores = W.abs()
    magnitude = (masks.nm_mask(scores, 2, 4) if "nm" in target
                 else masks.unstructured_mask(scores, 0.5))
    assert err <= _recon_error(W, W * magnitude, X)
    # the default (adaptive masks per block of 128 columns, dampening 0.01) in fp32 too
    Wp32, _ = sparsegpt_solve(W.float(), H.float(), **target)
    assert _recon_error(W, Wp32.double(), X) <= _recon_error(W, W * magnitude, X)


def test_sparsegpt_layer_sequential_matches_by_hand():
    # two blocks; block 1's Hessian must come from block 0's *pruned* outputs, padding excluded
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(2)]
    model = _Embed(torch.randn(20, 16), blocks=blocks)
    data = _calib(n=8, seq=10, vocab=20)
    dense = copy.deepcopy(model)
    pysparse.prune(model, pattern="2:4", method="sparsegpt", calib=data, progress=False)

    def hessian(x, batches):
        rows = torch.cat([x(b)[b["attention_mask"].bool()] for b in batches])
        return 2 * rows.T @ rows / rows.shape[0]

    with torch.no_grad():
        h0 = hessian(lambda b: dense.emb(b["input_ids"]), data)
        w0, _ = sparsegpt_solve(dense.layers[0][0].weight, h0, nm=(2, 4))
        pruned0 = copy.deepcopy(dense.layers[0])
        pruned0[0].weight.copy_(w0)
        h1 = hessian(lambda b: pruned0(dense.emb(b["input_ids"])), data)
        w1, _ = sparsegpt_solve(dense.layers[1][0].weight, h1, nm=(2, 4))
        h1_dense = hessian(lambda b: dense.layers[0](dense.emb(b["input_ids"])), data)
        w1_dense, _ = sparsegpt_solve(dense.layers[1][0].weight, h1_dense, nm=(2, 4))
    torch.testing.assert_close(model.layers[0][0].weight, w0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.layers[1][0].weight, w1, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(w1, w1_dense, rtol=1e-3, atol=1e-4)  # the test can tell
    assert find_blocks(model)[0] == "layers"


def test_sparsegpt_needs_blocks():
    model = _Embed(torch.randn(20, 16), head=nn.Linear(16, 8))
    with pytest.raises(ValueError, match="ModuleList"):
        pysparse.prune(model, pattern="2:4", method="sparsegpt", calib=_calib(vocab=20),
                       progress=False)
    with pytest.raises(ValueError, match="blocks="):
        pysparse.prune(tiny_bert(), pattern="2:4", method="sparsegpt", calib=_calib(),
                       blocks="encoder.nope", progress=False)
    with pytest.raises(ValueError, match="multiple of M=8"):
        pysparse.prune(tiny_bert(), pattern="4:8", method="sparsegpt", calib=_calib(), blocksize=12,
                       progress=False)


# ---------------------------------------------------------------------------------- every method
# scope="global" is refused for sparsegpt (test_errors)
@pytest.mark.parametrize("method,target", [(m, t) for m in METHODS for t in TARGETS
                                           if not (m == "sparsegpt" and t == "s50-global")])
@pytest.mark.parametrize("arch", ARCHS)
def test_methods_on_random_models(arch, method, target):
    pattern, sparsity, scope = TARGETS[target]
    model = ARCHS[arch]()
    data = _calib()
    dense = {n: linear_weight(m).clone() for n, m in _selected(model).items()}
    report = pysparse.prune(model, pattern, sparsity, method=method, calib=data, scope=scope,
                            progress=False)
    layers = _selected(model)
    assert {r.name for r in report.pruned} == set(layers)
    total = zeros = 0
    for name, module in layers.items():
        w = linear_weight(module)
        K = w.shape[1]
        if pattern == "2:4":
            assert sparse24.is_24(w)
        if pattern is not None:
            n, m = masks.parse_nm(pattern)
            assert masks.is_nm(w, n, m)
            assert float((w == 0).float().mean()) == pytest.approx(1 - n / m, abs=1e-6)
        elif scope == "layer":  # rounding: per layer, per row (wanda) or per block (sparsegpt)
            assert abs(float((w == 0).float().mean()) - sparsity) <= 1.0 / K
        total, zeros = total + w.numel(), zeros + int((w == 0).sum())
        if method != "sparsegpt":  # masks only; sparsegpt also updates the kept weights
            kept = w != 0
            assert torch.equal(w[kept], dense[name][kept])
    if scope == "global":
        assert abs(zeros / total - sparsity) <= 1.0 / total
    batch = {k: v[:2] for k, v in data[0].items()}
    ref = _out(model, batch)
    assert bool(torch.isfinite(ref).all())
    if pattern == "2:4":
        pysparse.replace_linear(model, "2:4")
        torch.testing.assert_close(_out(model, batch), ref, **tolerances.FLOAT_MATMUL[torch.float32])


def test_random_is_seeded():
    def mask(seed):
        model = tiny_bert()
        pysparse.prune(model, pattern="2:4", method="random", seed=seed, progress=False)
        return model.encoder.layer[0].attention.self.query.weight != 0
    assert torch.equal(mask(0), mask(0))
    assert not torch.equal(mask(0), mask(1))


# ---------------------------------------------------------------------------------- errors
def test_errors():
    bert, data = tiny_bert(), _calib()
    for method in ("wanda", "taylor", "sparsegpt"):
        with pytest.raises(ValueError, match="needs calibration data"):
            pysparse.prune(bert, pattern="2:4", method=method, progress=False)
        with pytest.raises(ValueError, match="tokenizer"):
            pysparse.prune(bert, pattern="2:4", method=method, calib=["a text", "another"],
                           progress=False)
        with pytest.raises(ValueError, match="at least 8"):
            pysparse.prune(bert, pattern="2:4", method=method, calib=data[:1], progress=False)
    for bad in ("2:2", "0:4", "5:4", "2-4", "rows", 24):
        with pytest.raises(ValueError, match="pattern.*'N:M'"):
            pysparse.prune(bert, pattern=bad)
    for bad in (1.0, -0.1, "0.5", True, float("nan")):
        with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
            pysparse.prune(bert, sparsity=bad)
    with pytest.raises(ValueError, match="exactly one"):
        pysparse.prune(bert, pattern="2:4", sparsity=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        pysparse.prune(bert)
    with pytest.raises(ValueError, match="not meaningful for sparsegpt"):
        pysparse.prune(bert, sparsity=0.5, method="sparsegpt", calib=data, scope="global")
    with pytest.raises(ValueError, match="'layer', 'global'"):
        pysparse.prune(bert, sparsity=0.5, scope="model")
    with pytest.raises(ValueError, match="applies to sparsity"):
        pysparse.prune(bert, pattern="2:4", scope="global")
    with pytest.raises(ValueError, match="'magnitude', 'random', 'wanda', 'taylor', 'sparsegp"):
        pysparse.prune(bert, pattern="2:4", method="obs")
    with pytest.raises(ValueError, match="takes no option.*percdamp"):
        pysparse.prune(bert, pattern="2:4", method="wanda", calib=data, percdamp=0.1)
    with pytest.raises(ValueError, match="loss_fn"):
        pysparse.prune(bert, pattern="2:4", loss_fn=lambda *a: 0)
    with pytest.raises(ValueError, match="blocksize"):
        pysparse.prune(bert, pattern="2:4", method="sparsegpt", calib=data, blocksize=0)
    assert all(float((m.weight == 0).float().mean()) < 0.01 for m in _selected(bert).values())


def test_structured_is_delegated(monkeypatch):
    calls = []
    fake = types.ModuleType("pysparse.prune.structured")
    fake.prune_structured = lambda *a, **k: calls.append((a, k)) or "report"
    monkeypatch.setitem(sys.modules, "pysparse.prune.structured", fake)
    model = tiny_bert()
    assert pysparse.prune(model, "heads", 0.25, method="taylor", calib="c", tokenizer="t",
                          progress=False, foo=1) == "report"
    assert calls == [((model, "heads", 0.25), dict(method="taylor", calib="c", tokenizer="t",
                                                   progress=False, foo=1))]
    pysparse.prune(model, "layers", layers=[1])  # the block indices instead of a fraction
    assert calls[-1] == ((model, "layers", None), dict(method="magnitude", calib=None,
                                                       tokenizer=None, progress=True,
                                                       layers=[1]))
    with pytest.raises(ValueError, match="needs sparsity"):
        pysparse.prune(model, "neurons")
    with pytest.raises(ValueError, match="does not take include"):
        pysparse.prune(model, "neurons", 0.5, include=["*.intermediate.*"])
    monkeypatch.setitem(sys.modules, "pysparse.prune.structured", None)  # import fails
    with pytest.raises(NotImplementedError, match="structured pruning"):
        pysparse.prune(model, "heads", 0.25)


# ---------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_minilm_24_sparsegpt_beats_wanda_beats_magnitude(minilm):
    from pysparse.data import load_descriptions
    from pysparse.models import embed
    from pysparse.report import cosine_fidelity

    model, tok = minilm
    calib_texts = load_descriptions(32, seed=1)
    held_out = load_descriptions(64, seed=0)
    assert not set(calib_texts) & set(held_out)
    ref = embed(model, tok, held_out)
    cos = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = copy.deepcopy(model)
        pysparse.prune(m, pattern="2:4", method=method, calib=calib_texts, tokenizer=tok,
                       progress=False)
        cos[method] = cosine_fidelity(ref, embed(m, tok, held_out))
    # measured: magnitude 0.566, wanda 0.743, sparsegpt 0.844 (the issue: "2:4: SparseGPT and
    # Wanda clearly better than magnitude, SparseGPT best"); margins of 0.03 are "clearly"
    assert cos["wanda"] > cos["magnitude"] + 0.03, cos
    assert cos["sparsegpt"] > cos["wanda"] + 0.03, cos


def test_calib_convention_is_shared():
    # strings + tokenizer go through pysparse.calib.batches like everywhere else
    class Tok:
        def __call__(self, texts, **kw):
            n = max(len(t) for t in texts)
            ids = torch.tensor([[1 + ord(c) % 100 for c in t.ljust(n)] for t in texts])
            mask = torch.tensor([[1] * len(t) + [0] * (n - len(t)) for t in texts])
            return {"input_ids": ids, "attention_mask": mask}
    texts = [f"text number {i}" for i in range(8)]
    assert len(pcalib.batches(texts, Tok(), batch_size=4)) == 2
    model = tiny_bert()
    report = pysparse.prune(model, pattern="2:4", method="wanda", calib=texts, tokenizer=Tok(),
                            progress=False)
    assert len(report.pruned) == len(_selected(model))
