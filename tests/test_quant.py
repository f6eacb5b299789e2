"""Quantization methods: observers, int4 format, weight-only modules, static calibration,
SmoothQuant, QAT (pysparse.quant)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import pysparse
from pysparse.formats import int8
from pysparse.nn.linear import (Int4Linear, Int8Linear, Int8WeightOnlyLinear, StaticInt8Linear,
                                linear_weight)
from pysparse.ops import reference
from pysparse.quant import int4, observers, qat, smoothquant, state
from pysparse.testing import tolerances
from pysparse.testing.models import tiny_bert, tiny_gpt2, tiny_llama

# Named floors for this file (SQNR in dB of a whole random model's output against fp32).
STATIC_W8A8_SQNR_DB = 20.0   # per-tensor static activations, random models with outlier channels
SMOOTH_EXACT = dict(rtol=1e-4, atol=1e-5)  # smoothing alone, fp32: float rounding only
QAT_CONVERT_SQNR_DB = 40.0   # fake-quant fp32 product vs exact int32 accumulation, whole model
W8_MINILM_COSINE = 0.999     # issue targets
W4_MINILM_RTN_COSINE = 0.93  # what round-to-nearest int4 g128 reaches (measured 0.9397)





ARCHS = {"gpt2": tiny_gpt2, "bert": tiny_bert, "llama": tiny_llama}


def _model(arch):
    model = ARCHS[arch]()
    with torch.no_grad():  # outlier input channels, as trained transformers have: what
        for m in model.modules():  # SmoothQuant is for
            if isinstance(m, (nn.LayerNorm,)) or type(m).__name__.endswith("RMSNorm"):
                m.weight[::16] *= 8.0
    return model


def _calib(n=3, B=4, S=12):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        mask = torch.ones(B, S, dtype=torch.long)
        mask[0, S - 3:] = 0
        out.append({"input_ids": torch.randint(0, 128, (B, S), generator=g),
                    "attention_mask": mask})
    return out


def _out(model, ids):
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _ids():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))


# ----------------------------------------------------------------------------- observers
def test_minmax_hand_computed():
    x = torch.tensor([[-1.0, 0.5, 3.0], [0.25, -0.5, 1.0]])
    s, zp = observers.qparams(x, 8, "tensor")
    assert float(s) == pytest.approx(3.0 / 127) and int(zp) == 0 and s.shape == ()
    s, zp = observers.qparams(x, 8, "tensor", symmetric=False)
    assert float(s) == pytest.approx(4.0 / 255)
    assert int(zp) == 64  # round(1 / (4/255)) = round(63.75)
    s, _ = observers.qparams(x, 4, "token")
    torch.testing.assert_close(s, torch.tensor([3.0 / 7, 1.0 / 7]))
    s, _ = observers.qparams(x, 8, "channel")
    torch.testing.assert_close(s, torch.tensor([3.0 / 127, 1.0 / 127]))
    # asymmetric ranges always contain 0
    s, zp = observers.qparams(torch.tensor([2.0, 3.0]), 8, "tensor", symmetric=False)
    assert float(s) == pytest.approx(3.0 / 255) and int(zp) == 0


def test_percentile_hand_computed():
    x = torch.arange(1, 10001, dtype=torch.float32)
    s, _ = observers.qparams(x, 8, "tensor", method="percentile", percentile=99.0)
    # linear interpolation at position 0.99 * 9999 = 9899.01 of the sorted values 1..10000
    assert float(s) * 127 == pytest.approx(9900.01, rel=1e-6)
    assert float(s) * 127 == pytest.approx(float(torch.quantile(x, 0.99)), rel=1e-6)
    s, zp = observers.qparams(x - 5000.5, 8, "tensor", False, "percentile", percentile=99.0)
    lo, hi = torch.quantile(x - 5000.5, 0.01), torch.quantile(x - 5000.5, 0.99)
    assert float(s) == pytest.approx(float(hi - lo) / 255, rel=1e-6)


def test_mse_clips_heavy_tail_and_lowers_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) ** 3  # heavy-tailed: most values tiny, a long tail
    s_mm, _ = observers.qparams(x, 4, "tensor", method="minmax")
    s_mse, _ = observers.qparams(x, 4, "tensor", method="mse")
    assert float(s_mse) < 0.8 * float(s_mm)
    for bits in (4, 8):
        assert observers.quant_error(x, bits, method="mse") < \
            observers.quant_error(x, bits, method="minmax")
    # a uniform tensor has no tail worth clipping
    u = torch.linspace(-1, 1, 1001)
    assert float(observers.qparams(u, 8, "tensor", method="mse")[0]) > 0.9 / 127


def test_symmetric_int8_per_channel_equals_formats_bitwise():
    w = torch.randn(37, 200) * torch.rand(37, 1) * 3
    q_ref, s_ref = int8.quantize_weight(w)
    s, zp = observers.qparams(w, 8, "channel")
    assert torch.equal(s, s_ref) and not zp.any()
    assert torch.equal(observers.quantize(w, s, zp, 8, "channel"), q_ref)
    x = torch.randn(3, 5, 64)
    q_tok, s_tok = reference.quantize_per_token(x)
    s, zp = observers.qparams(x, 8, "token")
    assert torch.equal(s, s_tok) and torch.equal(observers.quantize(x, s, zp, 8, "token"), q_tok)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "token", "group"])
def test_round_trip_within_half_step(bits, symmetric, granularity):
    x = torch.randn(6, 64) + 0.5
    gs = 16 if granularity == "group" else None
    s, zp = observers.qparams(x, bits, granularity, symmetric, group_size=gs)
    q = observers.quantize(x, s, zp, bits, granularity, symmetric, gs)
    qmin, qmax = observers.qrange(bits, symmetric)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    y = observers.dequantize(q, s, zp, granularity, symmetric, gs)
    step = observers._expand(s, x, granularity, gs)
    err = (y - x).abs()
    if granularity == "group":
        err = err.reshape(6, 4, 16)
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-7).all())
    fq = observers.fake_quantize(x, s, zp, bits, granularity, symmetric, gs)
    torch.testing.assert_close(fq, y)


def test_stateful_observers_accumulate():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(7, 32, generator=g) * (i + 1) for i in range(3)]
    full = torch.cat(batches)
    mm = observers.MinMaxObserver()
    for b in batches:
        mm.update(b)
    assert torch.equal(mm.qparams()[0], observers.qparams(full, 8, "tensor")[0])
    ch = observers.MinMaxObserver(granularity="channel", ch_axis=-1, symmetric=False)
    for b in batches:
        ch.update(b)
    want = observers.qparams(full.T.contiguous(), 8, "channel", symmetric=False)
    assert torch.equal(ch.qparams()[0], want[0]) and torch.equal(ch.qparams()[1], want[1])
    pc = observers.PercentileObserver(percentile=99.0, max_samples=10_000)  # holds everything
    for b in batches:
        pc.update(b)
    want = observers.qparams(full, 8, "tensor", method="percentile", percentile=99.0)[0]
    torch.testing.assert_close(pc.qparams()[0], want)
    small = observers.MSEObserver(max_samples=100)  # bounded reservoir, exact running range
    for b in batches:
        small.update(b)
    assert small.samples.numel() == 100 and small.count == full.numel()
    assert float(small.amax) == float(full.max())
    assert 0 < float(small.qparams()[0]) <= float(full.abs().max()) / 127


def test_observer_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bits"):
        observers.qparams(x, 3)
    with pytest.raises(ValueError, match="granularity"):
        observers.qparams(x, 8, "row")
    with pytest.raises(ValueError, match="multiple of group_size"):
        observers.qparams(x, 8, "group", group_size=3)
    with pytest.raises(ValueError, match="method"):
        observers.qparams(x, 8, method="kl")
    with pytest.raises(ValueError, match="NaN"):
        observers.qparams(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="granularity"):
        observers.MinMaxObserver(granularity="token")
    with pytest.raises(RuntimeError, match="no data"):
        observers.MinMaxObserver().qparams()


# ----------------------------------------------------------------------------- int4 / w8 / w4
def test_int4_pack_unpack_round_trip():
    nib = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = int4.pack(nib)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(nib[0, 0]) | (int(nib[0, 1]) << 4)  # low nibble = even k
    assert torch.equal(int4.unpack(packed), nib)
    with pytest.raises(ValueError, match="K even"):
        int4.pack(torch.zeros(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_weight_round_trip(symmetric):
    w = torch.randn(9, 64)
    packed, scale, zero = int4.quantize_weight(w, 32, symmetric)
    assert packed.shape == (9, 32) and scale.shape == (9, 2)
    assert (zero is None) == symmetric
    deq = int4.dequantize_weight(packed, scale, zero, 32)
    step = scale.repeat_interleave(32, dim=1)
    assert bool(((deq - w).abs() <= step / 2 * (1 + 1e-5)).all())
    want = observers.fake_quantize(w, *observers.qparams(w, 4, "group", symmetric, group_size=32),
                                   4, "group", symmetric, 32)
    torch.testing.assert_close(deq, want)


@pytest.mark.parametrize("cls,kw", [(Int8WeightOnlyLinear, {}), (Int4Linear, {}),
                                    (Int4Linear, {"group_size": 32, "symmetric": False})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_modules_match_dequantized_reference(cls, kw, dtype):
    lin = nn.Linear(256, 40)
    m = cls.from_linear(lin, **kw)
    x = torch.randn(3, 5, 256)
    deq = m.dequantized_weight()
    want = x @ deq.T + lin.bias.detach()
    got = m.to(dtype)(x.to(dtype))
    assert got.dtype == dtype and m.weight_scale.dtype == torch.float32
    torch.testing.assert_close(got.float(), want, **tolerances.FLOAT_MATMUL[dtype])
    err = tolerances.sqnr_db(x @ lin.weight.detach().T, x @ deq.T)
    assert err > (35 if cls is Int8WeightOnlyLinear else 15)


def test_weight_only_bytes_and_replace():
    model = tiny_gpt2()  # Conv1D layers
    ids = _ids()
    ref = _out(model, ids)
    dense = sum(r.weight_bytes for r in pysparse.summary(model) if r.name != "lm_head")
    w8, w4 = copy.deepcopy(model), copy.deepcopy(model)
    assert len(pysparse.replace_linear(w8, "w8").replaced) == 8
    rep = pysparse.replace_linear(w4, "w4", group_size=64)
    assert len(rep.replaced) == 8 and "group_size=64" in rep.action
    for q, cls in ((w8, Int8WeightOnlyLinear), (w4, Int4Linear)):
        rows = [r for r in pysparse.summary(q) if r.name != "lm_head"]
        mods = [m for m in q.modules() if isinstance(m, cls)]
        assert all(r.scheme == cls.scheme for r in rows)
        want = sum(m.out_features * m.in_features * (1 if cls is Int8WeightOnlyLinear else 0.5)
                   + m.weight_scale.numel() * 4 + m.out_features * 4 for m in mods)
        assert sum(r.weight_bytes for r in rows) == want  # packed bytes + fp32 scales + bias
    assert sum(r.weight_bytes for r in pysparse.summary(w4) if r.name != "lm_head") < 0.2 * dense
    assert tolerances.sqnr_db(ref, _out(w8, ids)) > 30
    assert tolerances.sqnr_db(ref, _out(w4, ids)) > 10


def test_w4_group_rules():
    model = nn.Sequential(nn.Linear(96, 8), nn.Linear(8, 4))
    rep = pysparse.replace_linear(model, "w4", group_size=32)
    assert [r.status for r in rep.layers] == ["replaced", "skipped"]
    assert "not a multiple of group_size=32" in rep.layers[1].detail
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        Int4Linear.from_linear(nn.Linear(100, 4))
    with pytest.raises(ValueError, match="group_size must be a positive even int"):
        pysparse.replace_linear(nn.Sequential(nn.Linear(8, 4)), "w4", group_size=3)
    with pytest.raises(TypeError, match="no options"):
        pysparse.replace_linear(nn.Sequential(nn.Linear(8, 4)), "w8a8", group_size=32)
    with pytest.raises(ValueError, match="unknown scheme"):
        pysparse.replace_linear(nn.Sequential(nn.Linear(8, 4)), "w3")


# ----------------------------------------------------------------------------- static W8A8
def test_int8_linear_static_op():
    x = torch.randn(5, 3, 40)
    w_q, w_s = int8.quantize_weight(torch.randn(24, 40))
    x_s = torch.tensor(0.02)
    b = torch.randn(24)
    y = torch.ops.pysparse.int8_linear_static(x, w_q, w_s, x_s, b)
    xq = torch.round(x / 0.02).clamp(-127, 127)  # saturates beyond 127 * 0.02
    want = (xq.double() @ w_q.double().T) * 0.02 * w_s.double() + b.double()
    torch.testing.assert_close(y, want.float(), **tolerances.QUANT_EPILOGUE[torch.float32])
    assert torch.ops.pysparse.int8_linear_static(x.bfloat16(), w_q, w_s, x_s, None).dtype \
        == torch.bfloat16
    torch.library.opcheck(torch.ops.pysparse.int8_linear_static.default, (x, w_q, w_s, x_s, b),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
    with pytest.raises(ValueError, match="one value"):
        torch.ops.pysparse.int8_linear_static(x, w_q, w_s, torch.ones(2), None)
    with pytest.raises(ValueError, match="positive"):
        torch.ops.pysparse.int8_linear_static(x, w_q, w_s, torch.tensor(0.0), None)


@pytest.mark.parametrize("shape", [(1, 40), (7, 33), (2, 5, 129)])
@pytest.mark.parametrize("zero", [0, 37, 128, 255])
def test_int8_linear_static_op_asymmetric(shape, zero):
    g = torch.Generator().manual_seed(zero)
    K = shape[-1]
    x = torch.randn(*shape, generator=g) * 2
    w_q, w_s = int8.quantize_weight(torch.randn(24, K, generator=g))
    b = torch.randn(24, generator=g)
    x_s = torch.tensor(0.015)
    for z in (torch.tensor(zero, dtype=torch.int32), torch.tensor([zero], dtype=torch.uint8)):
        y = torch.ops.pysparse.int8_linear_static(x, w_q, w_s, x_s, b, z)
        # uint8 codes (saturating at 0 and 255) minus the zero point, exact integer product
        xq = (torch.round(x.double() / 0.015) + zero).clamp(0, 255) - zero
        want = (xq @ w_q.double().T) * 0.015 * w_s.double() + b.double()
        torch.testing.assert_close(y, want.float(), **tolerances.QUANT_EPILOGUE[torch.float32])
    # a range that holds x: the asymmetric grid's error is half a step per element at most
    lo, hi = float(x.min()), float(x.max())
    s = (hi - lo) / 255
    zp = torch.tensor(round(-lo / s), dtype=torch.int32)
    y = torch.ops.pysparse.int8_linear_static(x, w_q, w_s, torch.tensor(s), None, zp)
    dq = w_q.float() * w_s[:, None]
    bound = 0.5 * s * dq.abs().sum(1) + 1e-4 * (x.abs() @ dq.abs().T)
    assert ((y - x @ dq.T).abs() <= bound).all()
    torch.library.opcheck(torch.ops.pysparse.int8_linear_static.default,
                          (x, w_q, w_s, x_s, b, torch.tensor(zero, dtype=torch.int32)),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_int8_linear_static_op_zero_point_errors():
    x = torch.randn(3, 16)
    w_q, w_s = int8.quantize_weight(torch.randn(8, 16))
    op, s = torch.ops.pysparse.int8_linear_static, torch.tensor(0.1)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        op(x, w_q, w_s, s, None, torch.tensor(256, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        op(x, w_q, w_s, s, None, torch.tensor(-1, dtype=torch.int32))
    with pytest.raises(ValueError, match="one value"):
        op(x, w_q, w_s, s, None, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="x_zero"):
        op(x, w_q, w_s, s, None, torch.tensor(3.0))
    with pytest.raises(ValueError, match="NaN"):
        op(torch.full((3, 16), float("nan")), w_q, w_s, s, None, torch.tensor(3, dtype=torch.int32))
    assert op(x[:0], w_q, w_s, s, None, torch.tensor(3, dtype=torch.int32)).shape == (0, 8)


def test_calibrate_asymmetric_one_sided_inputs():
    """A GELU-fed layer: asymmetric calibration records the real range and a zero point, the
    module carries it (through a state_dict too), and its error is well below symmetric's."""
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.fc1, self.act, self.fc2 = nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)

        def forward(self, input_ids, attention_mask=None):
            return self.fc2(self.act(self.fc1(self.emb(input_ids))))

    torch.manual_seed(0)
    model = Tiny()
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(0, 50, (4, 9), generator=g)} for _ in range(3)]
    sym, asym = copy.deepcopy(model), copy.deepcopy(model)
    pysparse.calibrate(sym, data, progress=False)
    rep = pysparse.calibrate(asym, data, symmetric=False, progress=False)
    assert "zero=" in [r for r in rep.layers if r.name == "fc2"][0].detail
    with torch.no_grad():
        acts = torch.cat([model.act(model.fc1(model.emb(d["input_ids"]))).reshape(-1, 64)
                          for d in data])
    lo, hi = float(acts.min()), float(acts.max())
    assert -0.2 < lo < 0  # GELU's one-sided range
    s, z = state.input_scale(asym.fc2), state.input_zero(asym.fc2)
    assert s == pytest.approx((hi - lo) / 255, rel=1e-5) and z == round(-lo / s)
    assert state.input_zero(sym.fc2) is None
    for m in (sym, asym):
        pysparse.replace_linear(m, "w8a8", activation="static")
    assert asym.fc2.input_zero.dtype == torch.int32 and int(asym.fc2.input_zero) == z
    assert sym.fc2.input_zero is None and "input_zero" in repr(asym.fc2)
    x = torch.randint(0, 50, (6, 9), generator=g)
    with torch.no_grad():
        want = model(x)
        e_sym, e_asym = (sym(x) - want).norm(), (asym(x) - want).norm()
    assert e_asym < 0.75 * e_sym
    twin = copy.deepcopy(model)
    twin.fc1, twin.fc2 = StaticInt8Linear(32, 64), StaticInt8Linear(64, 16)
    twin.load_state_dict(asym.state_dict())
    assert torch.equal(twin(x), asym(x))
    # re-calibrating symmetric drops the zero point; clearing drops both
    pysparse.calibrate(model, data, symmetric=False, progress=False)
    pysparse.calibrate(model, data, progress=False)
    assert state.input_zero(model.fc2) is None
    state.set_input_scale(model.fc2, 0.1, 7)
    state.clear_input_scale(model.fc2)
    assert state.input_scale(model.fc2) is None and state.input_zero(model.fc2) is None
    with pytest.raises(ValueError, match="symmetric"):
        pysparse.calibrate(model, data, symmetric="no", progress=False)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", observers.METHODS)
def test_calibrate_static_w8a8(arch, method):
    model = _model(arch)
    ids = _ids()
    ref = _out(model, ids)
    rep = pysparse.calibrate(model, _calib(), method=method, progress=False)
    n = len(rep.layers) - len(rep.skipped)
    assert n > 0 and all(r.status == "calibrated" for r in rep.layers if r.status != "skipped")
    pysparse.replace_linear(model, "w8a8", activation="static")
    mods = [m for m in model.modules() if isinstance(m, StaticInt8Linear)]
    assert len(mods) == n and all(m.input_scale.dtype == torch.float32 for m in mods)
    assert tolerances.sqnr_db(ref, _out(model, ids)) > STATIC_W8A8_SQNR_DB


def test_calibrate_ignores_padding_and_honours_state():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.lin = nn.Linear(8, 4)

        def forward(self, input_ids, attention_mask=None):
            return self.lin(self.emb(input_ids))

    model = Tiny()
    with torch.no_grad():
        model.emb.weight.uniform_(-1, 1)
        model.emb.weight[0] = 100.0  # the padding token: huge, never read
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    mask = (ids != 0).long()
    pysparse.calibrate(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    real = model.emb.weight.detach()[ids[mask.bool()]].abs().max()
    assert state.input_scale(model.lin) == pytest.approx(float(real) / 127)
    # padded positions saturate in the static module but are not used
    pysparse.replace_linear(model, "w8a8", activation="static")
    assert float(model.lin.input_scale) == pytest.approx(float(real) / 127)


def test_static_errors():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"pysparse.calibrate\(model"):
        pysparse.replace_linear(model, "w8a8", activation="static")
    assert not any(isinstance(m, StaticInt8Linear) for m in model.modules())  # untouched
    with pytest.raises(ValueError, match="activation"):
        pysparse.replace_linear(model, "w8a8", activation="per-tensor")
    with pytest.raises(ValueError, match="static"):
        pysparse.replace_linear(model, "w4", activation="static")
    with pytest.raises(ValueError, match="calibration data"):
        pysparse.calibrate(model, None)
    with pytest.raises(ValueError, match="tokenizer"):
        pysparse.calibrate(model, ["some text"])
    with pytest.raises(ValueError, match="method"):
        pysparse.calibrate(model, _calib(), method="entropy")
    with pytest.raises(ValueError, match="calibration data"):
        pysparse.smooth(model, None)
    with pytest.raises(ValueError, match="alpha"):
        pysparse.smooth(model, _calib(), alpha=1.5)
    with pytest.raises(ValueError, match="calibrated"):
        StaticInt8Linear.from_linear(nn.Linear(8, 4))


def test_static_and_smoothed_modules_compile_bf16_state_dict():
    a, b = nn.Linear(32, 24), nn.Linear(24, 16)
    state.set_smooth_vector(a, torch.rand(32) + 0.5)
    state.set_input_scale(a, 0.03)
    state.set_smooth_vector(b, torch.rand(24) + 0.5)
    model = nn.Sequential(StaticInt8Linear.from_linear(a), nn.ReLU(), Int8Linear.from_linear(b))
    assert model[2].input_multiplier is not None
    x = torch.randn(5, 32)
    eager = model(x)
    want = nn.functional.linear(nn.functional.relu(a(x)), b.weight, b.bias)
    assert tolerances.sqnr_db(want.detach(), eager) > tolerances.W8A8_SQNR_DB - 5
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # no graph break
    torch.testing.assert_close(compiled(x), eager, rtol=1e-4, atol=1e-4)
    twin = nn.Sequential(StaticInt8Linear(32, 24), nn.ReLU(),
                         Int8Linear(24, 16, layout=model[2].layout))
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin(x), eager)
    model.to(torch.bfloat16)
    assert model[0].input_scale.dtype == model[0].input_multiplier.dtype == torch.float32
    y = model(x.bfloat16())
    assert y.dtype == torch.bfloat16 and tolerances.sqnr_db(eager.detach(), y.float()) > 25


# ----------------------------------------------------------------------------- SmoothQuant
@pytest.mark.parametrize("arch", ARCHS)
def test_smooth_is_exact_before_quantization(arch):
    model = _model(arch)
    ids = _ids()
    ref = _out(model, ids)
    rep = pysparse.smooth(model, _calib(), alpha=0.5, progress=False)
    torch.testing.assert_close(_out(model, ids), ref, **SMOOTH_EXACT)
    details = {r.name: r.detail for r in rep.layers if r.status == "smoothed"}
    assert len(details) == sum(1 for r in rep.layers if r.status != "skipped") > 0
    if arch == "gpt2":
        h = "transformer.h.0."
        assert details[h + "attn.c_attn"].startswith(f"folded into {h}ln_1")
        assert details[h + "mlp.c_fc"].startswith(f"folded into {h}ln_2")
        assert details[h + "attn.c_proj"].startswith(f"folded into {h}attn.c_attn")
        assert details[h + "mlp.c_proj"].startswith("activation multiplier")  # behind GELU
    if arch == "llama":
        h = "model.layers.0."
        for p in ("q_proj", "k_proj", "v_proj"):
            assert details[h + "self_attn." + p].startswith(f"folded into {h}input_layernorm")
        for p in ("gate_proj", "up_proj"):
            assert details[h + "mlp." + p].startswith(f"folded into {h}post_attention_layernorm")
        # GQA: o_proj is smoothed through v_proj per kv channel
        assert "per kv channel" in details[h + "self_attn.o_proj"]
        assert details[h + "mlp.down_proj"].startswith(f"folded into {h}mlp.up_proj")
        assert not any(hasattr(m, state.SMOOTH) for m in model.modules())
    if arch == "bert":  # post-LN: q/k/v, FFN carry a multiplier; value -> output.dense folds
        h = "encoder.layer.0."
        for p in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "intermediate.dense", "output.dense"):
            assert details[h + p].startswith("activation multiplier")
        assert details[h + "attention.output.dense"].startswith(
            f"folded into {h}attention.self.value")
        assert state.smooth_vector(model.encoder.layer[0].attention.self.query) is not None


@pytest.mark.parametrize("arch", ARCHS)
def test_smooth_then_quantize(arch):
    model = _model(arch)
    ids = _ids()
    ref = _out(model, ids)
    pysparse.smooth(model, _calib(), progress=False)
    dyn = copy.deepcopy(model)
    pysparse.replace_linear(dyn, "w8a8")
    assert tolerances.sqnr_db(ref, _out(dyn, ids)) > tolerances.W8A8_SQNR_DB - 5
    if arch == "bert":
        assert any(m.input_multiplier is not None for m in dyn.modules()
                   if isinstance(m, Int8Linear))
    pysparse.calibrate(model, _calib(), progress=False)
    pysparse.replace_linear(model, "w8a8", activation="static")
    assert tolerances.sqnr_db(ref, _out(model, ids)) > STATIC_W8A8_SQNR_DB


def test_smooth_composes_and_clears_stale_scales():
    model = _model("bert")
    ids = _ids()
    ref = _out(model, ids)
    pysparse.calibrate(model, _calib(), progress=False)
    q = model.encoder.layer[0].attention.self.query
    assert state.input_scale(q) is not None
    pysparse.smooth(model, _calib(), alpha=0.5, progress=False)
    assert state.input_scale(q) is None  # its input changed: calibrate again
    s1 = state.smooth_vector(q).clone()
    pysparse.smooth(model, _calib(), alpha=0.5, progress=False)
    assert not torch.equal(state.smooth_vector(q), s1)
    torch.testing.assert_close(_out(model, ids), ref, **SMOOTH_EXACT)
    with pytest.raises(ValueError, match="calibrate"):
        pysparse.replace_linear(model, "w8a8", activation="static")


def test_smooth_falls_back_when_a_fold_is_not_exact(monkeypatch):
    # a wrong rule: BERT's attention LayerNorm also feeds the residual, so folding into it
    # changes the model; smooth must notice, undo every fold and use multipliers
    monkeypatch.setattr(smoothquant, "NORM_RULES", smoothquant.NORM_RULES + (
        ("attention.output.LayerNorm", ("intermediate.dense",)),))
    model = _model("bert")
    ids = _ids()
    ref = _out(model, ids)
    rep = pysparse.smooth(model, _calib(), progress=False)
    torch.testing.assert_close(_out(model, ids), ref, **SMOOTH_EXACT)
    assert all(r.detail.startswith("activation multiplier") for r in rep.layers
               if r.status == "smoothed")
    assert any("folds undone" in r.detail for r in rep.layers)


# ----------------------------------------------------------------------------- QAT
def test_ste_gradient_is_identity_inside_clip_range():
    x = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.4, 1.1, 5.0], requires_grad=True)
    scale = torch.tensor(1.2 / 127)  # clip range [-1.2, 1.2]
    y = qat.fake_quantize_ste(x, scale, bits=8)
    g = torch.arange(1.0, 8.0)
    y.backward(g)
    inside = (x.detach().abs() <= 1.2).float()
    assert torch.equal(x.grad, g * inside)
    torch.testing.assert_close(y.detach(), observers.fake_quantize(x.detach(), scale))


def test_qat_linear_matches_int8_linear_and_gradients_flow():
    lin = nn.Linear(48, 20)
    m = qat.QATLinear.from_linear(lin)
    x = torch.randn(4, 7, 48, requires_grad=True)
    y = m(x)
    real = Int8Linear.from_linear(lin, layout="canonical")
    torch.testing.assert_close(y.detach(), real(x.detach()), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    w_fq = m.fake_quant_weight().detach()
    # STE with min-max scales: every value is inside its range, so the gradient is the identity
    torch.testing.assert_close(x.grad, g @ w_fq, rtol=1e-5, atol=1e-5)
    x_fq = qat.fake_quantize_ste(x.detach(), qat._per_row_scale(x.detach()), granularity="token")
    torch.testing.assert_close(m.weight.grad, g.reshape(-1, 20).T @ x_fq.reshape(-1, 48),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.bias.grad, g.sum(dim=(0, 1)))


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_prepare_train_convert(arch):
    model = ARCHS[arch]()
    ids = _ids()
    ref = _out(model, ids)
    before = dict(model.named_parameters())
    rep = pysparse.prepare_qat(model)
    n = len(rep.replaced)
    assert n > 0 and sum(isinstance(m, qat.QATLinear) for m in model.modules()) == n
    if arch == "bert":  # nn.Linear turns into QATLinear in place: the same parameter tensors
        assert all(p is before[name] for name, p in model.named_parameters())
    assert tolerances.sqnr_db(ref, _out(model, ids)) > tolerances.W8A8_SQNR_DB - 5
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    out = model(input_ids=ids)
    loss = (out.logits if hasattr(out, "logits") else out.last_hidden_state).pow(2).mean()
    if getattr(out, "pooler_output", None) is not None:  # so that BERT's pooler gets a gradient
        loss = loss + out.pooler_output.pow(2).mean()
    loss.backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0
               for m in model.modules() if isinstance(m, qat.QATLinear))
    opt.step()
    model.eval()
    fake = _out(model, ids)
    conv = pysparse.convert_qat(model)
    assert len(conv.replaced) == n
    assert not any(isinstance(m, qat.QATLinear) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == n
    assert tolerances.sqnr_db(fake, _out(model, ids)) > QAT_CONVERT_SQNR_DB


def test_qat_errors():
    with pytest.raises(ValueError, match="scheme"):
        pysparse.prepare_qat(tiny_bert(), scheme="w4a4")
    with pytest.raises(ValueError, match="prepare_qat"):
        pysparse.convert_qat(tiny_bert())
    model = tiny_bert()
    pysparse.prepare_qat(model)
    assert all(r.detail == "already a QATLinear" or r.status == "skipped"
               for r in pysparse.prepare_qat(model).layers)


def test_qat_carries_smoothing():
    model = _model("bert")
    pysparse.smooth(model, _calib(), progress=False)
    q = model.encoder.layer[0].attention.self.query
    s = state.smooth_vector(q)
    pysparse.prepare_qat(model)
    m = model.encoder.layer[0].attention.self.query
    assert isinstance(m, qat.QATLinear) and torch.equal(state.smooth_vector(m), s)
    x = torch.randn(3, 64)
    want = Int8Linear.from_linear(q, layout="canonical")(x)
    torch.testing.assert_close(m(x).detach(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(linear_weight(m), linear_weight(q))


# ----------------------------------------------------------------------------- real MiniLM
# 64 calibration texts (seed 1), 64 held-out texts (seed 0); fidelity = mean cosine of the
# sentence embeddings against fp32. Measured (RESULTS in the PR): dynamic w8a8 0.9982, static
# minmax 0.9867, SmoothQuant a=0.8 + static 0.9973, same with the FFN output layers dynamic
# 0.9986, SmoothQuant a=0.5 + dynamic 0.9992, w8 0.9996, w4 g128 0.9397.
@pytest.fixture(scope="module")
def minilm_eval(minilm):
    from pysparse.data import load_descriptions
    from pysparse.models import embed
    from pysparse.report import cosine_fidelity
    model, tok = minilm
    cal, held = load_descriptions(64, seed=1), load_descriptions(64, seed=0)
    ref = embed(model, tok, held)

    def fidelity(*steps, base=None):
        q = copy.deepcopy(base if base is not None else model)
        for step in steps:
            step(q)
        return cosine_fidelity(ref, embed(q, tok, held))

    def smoothed(alpha):
        q = copy.deepcopy(model)
        pysparse.smooth(q, cal, alpha, tok, progress=False)
        return q

    return model, tok, cal, fidelity, smoothed


FFN_OUT = ("encoder.layer.*.output.dense",)


def _static(cal, tok, exclude=("lm_head",), symmetric=True):
    def step(q):
        pysparse.calibrate(q, cal, tok, symmetric=symmetric, progress=False)
        pysparse.replace_linear(q, "w8a8", activation="static", exclude=exclude)
    return step


@pytest.mark.slow
def test_minilm_weight_only(minilm_eval):
    _model, _tok, _cal, fidelity, _smoothed = minilm_eval
    assert fidelity(lambda q: pysparse.replace_linear(q, "w8")) >= W8_MINILM_COSINE
    # round-to-nearest int4 g128 measures 0.940 (asymmetric 0.958, MSE clipping 0.952/0.963):
    # the floor guards the format; the issue's 0.99 target is the xfail below
    assert fidelity(lambda q: pysparse.replace_linear(q, "w4")) >= W4_MINILM_RTN_COSINE


@pytest.fixture(scope="module")
def minilm_w4(minilm_eval):
    """MiniLM w4 g128 fidelity: round-to-nearest (symmetric min-max; asymmetric MSE-clipped) and
    GPTQ (64 calibration texts, seed 1) then replace_linear, symmetric and asymmetric."""
    from pysparse.quant.gptq import gptq_quantize
    _model, tok, cal, fidelity, _smoothed = minilm_eval

    def gptq(symmetric):
        def step(q):
            gptq_quantize(q, cal, tok, symmetric=symmetric, progress=False)
            pysparse.replace_linear(q, "w4", symmetric=symmetric)
        return step

    return {"rtn": fidelity(lambda q: pysparse.replace_linear(q, "w4")),
            "rtn_asym_mse": fidelity(lambda q: pysparse.replace_linear(q, "w4", symmetric=False,
                                                                        method="mse")),
            "gptq": fidelity(gptq(True)), "gptq_asym": fidelity(gptq(False))}


# GPTQ's gain over round-to-nearest on MiniLM w4 g128 (measured: symmetric 0.9397 -> 0.9770,
# asymmetric 0.958 (0.963 MSE-clipped) -> 0.9830); the margins leave ~0.01 of slack
W4_MINILM_GPTQ_GAIN = 0.025      # symmetric GPTQ over symmetric RTN (measured +0.037)
W4_MINILM_GPTQ_BEST_GAIN = 0.01  # best GPTQ over best RTN (measured +0.020)


@pytest.mark.slow
def test_minilm_w4_gptq(minilm_w4):
    r = minilm_w4
    assert r["gptq"] >= r["rtn"] + W4_MINILM_GPTQ_GAIN
    assert max(r["gptq"], r["gptq_asym"]) >= max(r["rtn"], r["rtn_asym_mse"]) + \
        W4_MINILM_GPTQ_BEST_GAIN


# AWQ + GPTQ (act order, MSE-clipped static asymmetric groups) on MiniLM w4 g128, 256
# calibration texts: bench_accuracy measures 0.9901 on its 256 held-out texts (the issue's 0.99);
# this file's 64 held-out texts measure 0.9898
W4_MINILM_AWQ_GPTQ_COSINE = 0.9875
W4_MINILM_AWQ_GAIN = 0.004  # over asymmetric GPTQ alone with 64 texts (measured 0.9830)


@pytest.mark.slow
def test_minilm_w4_awq_gptq(minilm_eval, minilm_w4):
    from pysparse.data import load_descriptions
    from pysparse.quant.awq import awq_smooth
    from pysparse.quant.gptq import gptq_quantize
    _model, tok, _cal, fidelity, _smoothed = minilm_eval
    cal = load_descriptions(64 + 256, seed=0)[64:]  # the held-out texts are the first 64

    def step(q):
        awq_smooth(q, cal, tok, progress=False)
        gptq_quantize(q, cal, tok, symmetric=False, act_order=True, clip="mse", progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # packing GPTQ's codes must be lossless
            pysparse.replace_linear(q, "w4", symmetric=False)
        assert all(isinstance(m, Int4Linear) and m.input_multiplier is not None
                   for n, m in q.named_modules() if n.endswith("intermediate.dense"))

    got = fidelity(step)
    assert got >= W4_MINILM_AWQ_GPTQ_COSINE
    assert got >= minilm_w4["gptq_asym"] + W4_MINILM_AWQ_GAIN


@pytest.mark.slow
def test_minilm_smoothquant(minilm_eval):
    _model, tok, cal, fidelity, smoothed = minilm_eval
    dynamic = fidelity(lambda q: pysparse.replace_linear(q, "w8a8"))
    assert dynamic >= tolerances.W8A8_MINILM_COSINE
    static = fidelity(_static(cal, tok))
    s08 = smoothed(0.8)
    assert fidelity(base=s08) == pytest.approx(1.0, abs=1e-6)  # smoothing alone is exact
    assert fidelity(_static(cal, tok), base=s08) > static  # smoothing helps static W8A8
    # static everywhere but the FFN output layers (GELU outputs with token-wise outliers that
    # a per-tensor scale cannot follow), which stay dynamic: at least as faithful as dynamic
    mixed = fidelity(_static(cal, tok, exclude=("lm_head",) + FFN_OUT),
                     lambda q: pysparse.replace_linear(q, "w8a8"), base=s08)
    assert mixed >= dynamic
    assert fidelity(lambda q: pysparse.replace_linear(q, "w8a8"), base=smoothed(0.5)) > dynamic


@pytest.mark.slow
def test_minilm_smoothquant_static_issue_target(minilm_eval):
    """Every layer static: SmoothQuant (alpha 0.85) + asymmetric per-tensor activations (uint8
    codes with a zero point) are at least as faithful as dynamic per-token W8A8; symmetric
    static falls short (the GELU-fed FFN output layers waste half their int8 range)."""
    _model, tok, cal, fidelity, smoothed = minilm_eval
    dynamic = fidelity(lambda q: pysparse.replace_linear(q, "w8a8"))
    s = smoothed(0.85)
    asym = fidelity(_static(cal, tok, symmetric=False), base=s)
    assert asym >= dynamic
    assert asym > fidelity(_static(cal, tok), base=s)


# ----------------------------------------------------------------------------- GPTQ
def _correlated_inputs(n=512, K=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)
    scale = torch.rand(K, generator=g) * 3 + 0.1  # uneven column magnitudes
    return (torch.randn(n, K, generator=g) @ mix) * scale


def _gptq_linear(lin, x, bits=4, group_size=128, symmetric=True, **kw):
    """GPTQ one layer from its inputs x [n, K], as gptq_quantize does per layer."""
    from pysparse.quant.gptq import gptq_solve
    w = linear_weight(lin)
    new, scale, zero = gptq_solve(w, 2 * x.T @ x / x.shape[0], bits=bits, group_size=group_size,
                                  symmetric=symmetric, **kw)
    with torch.no_grad():
        w.copy_(new)
    state.set_gptq_qparams(lin, bits, group_size, symmetric, scale, zero)
    return lin


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128])
def test_gptq_beats_rtn_on_a_linear(symmetric, group_size):
    torch.manual_seed(0)
    x = _correlated_inputs()
    ref = nn.Linear(128, 48)
    g = _gptq_linear(copy.deepcopy(ref), x, group_size=group_size, symmetric=symmetric)
    rtn = Int4Linear.from_linear(ref, group_size=group_size, symmetric=symmetric)
    gq = Int4Linear.from_linear(g, group_size=group_size, symmetric=symmetric)
    with torch.no_grad():
        want = ref(x)
        e_rtn, e_gptq = (want - rtn(x)).norm(), (want - gq(x)).norm()
    assert e_gptq <= e_rtn
    assert e_gptq < 0.8 * e_rtn  # correlated inputs: GPTQ is clearly better, not just equal


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_codes_are_valid_int4(symmetric):
    from pysparse.quant import gptq
    x = _correlated_inputs(K=64, seed=1)
    lin = _gptq_linear(nn.Linear(64, 16), x, group_size=16, symmetric=symmetric)
    w = linear_weight(lin).detach().clone()
    q = Int4Linear.from_linear(lin, group_size=16, symmetric=symmetric)
    assert torch.equal(q.dequantized_weight(), w)  # packing GPTQ's codes is lossless
    stored = state.gptq_qparams(lin, 4, 16, symmetric)
    assert torch.equal(q.weight_scale, stored[0])
    # every group lies on its grid: at most 15 (sym) / 16 (asym) distinct levels per group
    groups = w.reshape(16, 4, 16)
    assert all(len(torch.unique(gr)) <= (15 if symmetric else 16) for gr in groups.flatten(0, 1))
    # a layer changed after GPTQ no longer matches its scales: round-to-nearest, with a warning
    with torch.no_grad():
        lin.weight.mul_(1.5)
    with pytest.warns(UserWarning, match="no longer reproduce"):
        q2 = Int4Linear.from_linear(lin, group_size=16, symmetric=symmetric)
    rtn = int4.dequantize_weight(*int4.quantize_weight(linear_weight(lin), 16, symmetric), 16)
    assert torch.equal(q2.dequantized_weight(), rtn)
    # options that differ from GPTQ's: plain round-to-nearest, silently
    assert state.gptq_qparams(lin, 4, 32, symmetric) is None
    with pytest.raises(ValueError, match="clip"):
        gptq.gptq_solve(w, torch.eye(64), group_size=16, clip="percentile")


def test_gptq_w8_lossless_and_act_order():
    x = _correlated_inputs(K=64, seed=2)
    ref = nn.Linear(64, 16)
    lin = _gptq_linear(copy.deepcopy(ref), x, bits=8, group_size=None, act_order=True)
    w = linear_weight(lin).detach().clone()
    q = Int8WeightOnlyLinear.from_linear(lin)
    assert torch.equal(q.dequantized_weight(), w)
    rtn = Int8WeightOnlyLinear.from_linear(ref)
    with torch.no_grad():
        assert (ref(x) - q(x)).norm() <= (ref(x) - rtn(x)).norm()


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_gptq_tiny_models_then_w4(arch):
    from pysparse.quant.gptq import gptq_quantize
    model = ARCHS_GPTQ[arch]()
    ids = _ids()
    ref = _out(model, ids)
    calib = [{"input_ids": torch.randint(1, 128, (4, 16)),
              "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(2)]
    calib[1]["attention_mask"][:, 12:] = 0  # padding is left out of the Hessians
    rep = gptq_quantize(model, calib, group_size=32, progress=False)
    assert {r.status for r in rep.layers} == {"quantized"} | (
        {"skipped"} if any(r.name == "lm_head" for r in rep.layers) else set())
    floats = {n: linear_weight(m).detach().clone() for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n != "lm_head"}
    pysparse.replace_linear(model, "w4", group_size=32)
    for n, m in model.named_modules():
        if n in floats:
            assert isinstance(m, Int4Linear) and torch.equal(m.dequantized_weight(), floats[n])
    out = _out(model, ids)
    assert torch.isfinite(out).all()
    assert tolerances.sqnr_db(ref, out) > 10


ARCHS_GPTQ = {"bert": tiny_bert, "llama": tiny_llama}
