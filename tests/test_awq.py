"""AWQ scaling (quant.awq) and GPTQ's act order with groups, clipping and smoothed layers
(quant.gptq), against references built here."""
import copy
import warnings

import pytest
import torch
from torch import nn

import pysparse
from pysparse.nn.linear import Int4Linear, Int8WeightOnlyLinear, linear_weight
from pysparse.quant import int4, state
from pysparse.quant.awq import RowSample, awq_smooth
from pysparse.quant.gptq import gptq_quantize, gptq_solve
from pysparse.testing import tolerances
from pysparse.testing.models import tiny_bert

from test_quant import ARCHS, _calib, _correlated_inputs, _ids, _model, _out  # shared helpers

SMOOTH_EXACT = dict(rtol=1e-4, atol=1e-5)  # rescaling alone, fp32: float rounding only


# ----------------------------------------------------------------------------- RowSample
def test_row_sample_is_capped_uniform_and_exact_below_cap():
    rs = RowSample(cap=50, seed=0)
    rows = torch.arange(40.0)[:, None].expand(40, 3)
    rs.add(rows[:25])
    rs.add(rows[25:])
    assert torch.equal(rs.rows[rs.rows[:, 0].argsort()], rows)  # under the cap: everything
    counts = torch.zeros(400)
    for seed in range(200):
        rs = RowSample(cap=100, seed=seed)
        for i in range(0, 400, 64):
            rs.add(torch.arange(400.0)[i:i + 64, None])
        assert rs.rows.shape == (100, 1) and len(torch.unique(rs.rows)) == 100
        counts[rs.rows[:, 0].long()] += 1
    # each row kept with probability 1/4: 50 of 200 draws on average, no position favoured
    assert abs(counts[:200].mean() - counts[200:].mean()) < 5 and 40 < counts.mean() < 60


# ----------------------------------------------------------------------------- AWQ
@pytest.mark.parametrize("arch", ARCHS)
def test_awq_keeps_float_model_and_lowers_w4_error(arch):
    model = _model(arch)
    ids = _ids()
    ref = _out(model, ids)
    scaled = copy.deepcopy(model)
    rep = awq_smooth(scaled, _calib(S=16), group_size=32, progress=False)
    done = [r for r in rep.layers if r.status == "smoothed"]
    assert done and all("alpha=" in r.detail for r in done)
    torch.testing.assert_close(_out(scaled, ids), ref, **SMOOTH_EXACT)  # rescaling is exact
    if arch != "bert":  # pre-norm: folded into the norms (and v rows), nothing pending
        assert any("folded into" in r.detail for r in done)
    errs = {}
    for name, m in (("rtn", copy.deepcopy(model)), ("awq", scaled)):
        pysparse.replace_linear(m, "w4", group_size=32, symmetric=False)
        errs[name] = (ref - _out(m, ids)).norm()
    # the search minimises each layer's error on its calibration sample; end to end on other
    # tokens of a random model it is not guaranteed to win, but must not lose much
    assert errs["awq"] < 1.1 * errs["rtn"]


def test_awq_search_never_worse_than_no_scaling_on_its_sample():
    """alpha = 0 (s = 1) is a candidate: on the calibration tokens themselves, every layer's
    w4 output error after AWQ is at most round-to-nearest's."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(256, 64) * (torch.rand(64) * 4 + 0.1)
    x[:, 5] *= 30  # a salient channel

    m = _OneBlock(lin, x)
    data = [{"input_ids": torch.arange(256).reshape(4, 64)}]
    want = lin(x).detach()
    rtn = Int4Linear.from_linear(lin, group_size=32, symmetric=False)
    rep = awq_smooth(m, data, group_size=32, max_tokens=1024, progress=False)
    assert state.smooth_vector(lin) is not None  # no norm upstream: a pending multiplier
    q = Int4Linear.from_linear(lin, group_size=32, symmetric=False)
    assert q.input_multiplier is not None
    e_awq, e_rtn = (want - q(x)).norm(), (want - rtn(x)).norm()
    assert e_awq <= e_rtn * (1 + 1e-6)
    assert e_awq < 0.9 * e_rtn  # with a salient channel the search finds a real gain
    assert "alpha=0.00" not in rep.layers[0].detail


def test_awq_errors():
    model = tiny_bert()
    with pytest.raises(ValueError, match="bits"):
        awq_smooth(model, _calib(), bits=3)
    with pytest.raises(ValueError, match="group_size"):
        awq_smooth(model, _calib(), group_size=7)
    with pytest.raises(ValueError, match="symmetric"):
        awq_smooth(model, _calib(), symmetric=1)
    with pytest.raises(ValueError, match="grid"):
        awq_smooth(model, _calib(), grid=0)
    with pytest.raises(ValueError, match="max_tokens"):
        awq_smooth(model, _calib(), max_tokens=2.5)
    with pytest.raises(ValueError, match="calibration data"):
        awq_smooth(model, None)
    with pytest.raises(ValueError, match="no linear layer"):
        awq_smooth(model, _calib(), include="nothing.*")


# ----------------------------------------------------------------------------- GPTQ
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", ["minmax", "mse"])
@pytest.mark.parametrize("K,group_size", [(128, 32), (96, 32), (64, 64)])
def test_gptq_act_order_static_groups(symmetric, clip, K, group_size):
    """act order with groups: every group's scale fixed from the original weights; the codes
    lie on that grid, pack losslessly, and the layer error is below round-to-nearest's."""
    x = _correlated_inputs(K=K, seed=K)
    lin = nn.Linear(K, 24)
    h = 2 * x.T @ x / x.shape[0]
    w = linear_weight(lin).detach().clone()
    new, scale, zero = gptq_solve(w, h, group_size=group_size, symmetric=symmetric,
                                  act_order=True, clip=clip)
    assert torch.equal(linear_weight(lin), w)  # input untouched
    G = K // group_size
    assert scale.shape == (24, G) and (zero is None) == symmetric
    from pysparse.quant import observers
    s0, z0 = observers.qparams(w.reshape(24 * G, group_size), 4, "channel", symmetric, clip)
    torch.testing.assert_close(scale, s0.reshape(24, G), rtol=0, atol=0)
    lo, hi = observers.qrange(4, symmetric)
    codes = new.reshape(24, G, group_size) / scale[..., None]
    if zero is not None:
        codes = codes + zero[..., None].float()
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= lo - 1e-4 and codes.max() <= hi + 1e-4
    with torch.no_grad():
        lin.weight.copy_(new)
    state.set_gptq_qparams(lin, 4, group_size, symmetric, scale, zero)
    q = Int4Linear.from_linear(lin, group_size=group_size, symmetric=symmetric)
    assert torch.equal(q.dequantized_weight(), new)
    rtn = int4.dequantize_weight(*int4.quantize_weight(w, group_size, symmetric), group_size)
    assert ((new - w) @ h * (new - w)).sum() < ((rtn - w) @ h * (rtn - w)).sum()


class _OneBlock(nn.Module):
    """A one-block "model" whose token i is the row x[i] (a ModuleList, as GPTQ's replay needs)."""

    def __init__(self, lin, x):
        super().__init__()
        self.x = x
        self.layers = nn.ModuleList([nn.Sequential(lin)])

    def forward(self, input_ids, attention_mask=None):
        h = self.x[input_ids]
        for block in self.layers:
            h = block(h)
        return h


def test_gptq_on_a_smoothed_layer_packs_losslessly():
    """A pending vector s: GPTQ solves for W * s; the float layer holds result / s, the w4
    module packs exactly GPTQ's codes and computes what the float model computes."""
    x = _correlated_inputs(K=64, seed=3)
    lin = nn.Linear(64, 16)
    s = torch.rand(64, generator=torch.Generator().manual_seed(4)) * 3 + 0.2
    state.set_smooth_vector(lin, s)
    data = [{"input_ids": torch.arange(512).reshape(8, 64)}]
    gptq_quantize(_OneBlock(lin, x), data, group_size=32, act_order=True, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = Int4Linear.from_linear(lin, group_size=32)
    stored = state.gptq_qparams(lin, 4, 32, True)
    assert torch.equal(q.weight_scale, stored[0])
    with torch.no_grad():
        torch.testing.assert_close(q(x), lin(x), rtol=1e-4, atol=1e-4)
    # the same for w8 (per-row scales)
    lin8 = nn.Linear(64, 16)
    state.set_smooth_vector(lin8, s)
    gptq_quantize(_OneBlock(lin8, x), data, bits=8, group_size=None, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q8 = Int8WeightOnlyLinear.from_linear(lin8)
    assert q8.input_multiplier is not None
    with torch.no_grad():
        torch.testing.assert_close(q8(x), lin8(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_awq_then_gptq_then_w4_tiny_models(arch):
    model = _model(arch)
    ids = _ids()
    ref = _out(model, ids)
    rtn = copy.deepcopy(model)
    pysparse.replace_linear(rtn, "w4", group_size=32, symmetric=False)
    awq_smooth(model, _calib(), group_size=32, progress=False)
    gptq_quantize(model, _calib(), group_size=32, symmetric=False, act_order=True, clip="mse",
                  progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pysparse.replace_linear(model, "w4", group_size=32, symmetric=False)
    out = _out(model, ids)
    assert torch.isfinite(out).all()
    assert tolerances.sqnr_db(ref, out) > tolerances.sqnr_db(ref, _out(rtn, ids))
