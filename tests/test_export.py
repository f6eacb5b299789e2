"""pysparse.export: compressed-tensors checkpoints (read back with the compressed-tensors package
and transformers) and ONNX graphs (run with onnxruntime), on tiny random models."""
import copy
import json
import os
import warnings

import pytest
import torch
from torch import nn

import pysparse
from pysparse.export import export_compressed_tensors, export_onnx
from pysparse.nn.linear import _PackedLinear
from pysparse.quant import state
from pysparse.testing.models import tiny_bert, tiny_gpt2, tiny_llama
from test_quant import _calib  # shared helper: tokenized batches with a padded row

ARCHS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}

# ONNX vs pysparse (backend="reference"), relative to max |reference output|:
# * ORT_FP32_RTOL: ONNX Runtime with fp32 MatMul arithmetic (session option
#   qdq_matmulnbits_accuracy_level=1). The graph quantizes activations with pysparse's own
#   formula, so the codes match and only fp32 accumulation order differs; a last-bit difference
#   can still land a later layer's x / scale on the other side of a .5 and flip one code (one
#   step of amax / 127 in one element), hence not 1e-6.
# * ORT_DEFAULT_RTOL: ONNX Runtime's default optimizations fuse DequantizeLinear + MatMul into
#   MatMulNBits with accuracy_level 4, which re-quantizes the activations to int8 per block:
#   a second rounding (measured ~0.6 % of max |y| on these models).
ORT_FP32_RTOL = 1e-3
ORT_DEFAULT_RTOL = 1e-2
ORT_MEAN_RTOL = 2e-3  # mean |diff| / max |ref| under the default optimizations
# transformers + compressed-tensors run W8A8 dynamic as fake quantization with
# scale = amax / 127.5 per token (its symmetric int8 range is [-128, 127]) where pysparse and
# vLLM's int8 kernels use amax / 127: different activation codes, same weights.
CT_FAKEQUANT_RTOL = 3e-2


def _model(arch, **cfg):
    torch.manual_seed(0)
    return ARCHS[arch](**cfg)


def _feed(B=3, S=9):
    ids = torch.randint(0, 128, (B, S), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, S - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _out(model, feed):
    with torch.no_grad():
        o = model(**feed)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _prepare(arch, scheme, **cfg):
    """A tiny model replaced with ``scheme`` (backend reference); "w8a8-static" calibrates,
    "w8a8-static-asym" calibrates asymmetrically, "2:4+w8a8" prunes 2:4 first."""
    model = _model(arch, **cfg)
    if scheme.startswith("w8a8-static"):
        pysparse.calibrate(model, _calib(2), symmetric=not scheme.endswith("asym"),
                           progress=False)
        pysparse.replace_linear(model, "w8a8", activation="static", backend="reference")
    elif scheme == "2:4+w8a8":
        pysparse.prune(model, pattern="2:4", progress=False)
        pysparse.replace_linear(model, "2:4+w8a8", backend="reference")
    elif scheme.startswith("w4"):
        pysparse.replace_linear(model, "w4", group_size=32, symmetric=scheme == "w4",
                                backend="reference")
    else:
        pysparse.replace_linear(model, scheme, backend="reference")
    return model


def _packed(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, _PackedLinear)}


# ----------------------------------------------------------------------------- compressed-tensors
def _ct_read(d):
    """(config dict, QuantizationConfig, tensors) read back with compressed-tensors."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    assert ct.__version__
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    qcfg = QuantizationConfig.model_validate(config["quantization_config"])
    return config, qcfg, load_file(os.path.join(d, "model.safetensors"))


def _ct_dequantize(qcfg, tensors, name, scheme, conv1d=False):
    """The float weight of layer ``name``, dequantized by compressed-tensors' own compressor
    for the scheme's format."""
    from compressed_tensors.compressors.base import BaseCompressor
    local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")
             and "." not in k[len(name) + 1:]}
    if conv1d and "weight" in local:  # Conv1D's [in, out] layout (packed ones are [out, ...])
        local["weight"] = local["weight"].t()
    fmt = scheme.format or qcfg.format
    return BaseCompressor.get_value_from_registry(fmt).decompress(local, scheme)["weight"]


def _ct_compress(qcfg, local, scheme, conv1d=False):
    """compressed-tensors' compressor applied to the decompressed float weight (with our
    scales / zero points): the tensors it would have written."""
    from compressed_tensors.compressors.base import BaseCompressor
    local = dict(local)
    if conv1d and "weight" in local:
        local["weight"] = local["weight"].t()
    cls = BaseCompressor.get_value_from_registry(scheme.format or qcfg.format)
    dense = cls.decompress(local, scheme)  # unpacks zero points too
    state = {k: v for k, v in dense.items() if k in ("weight", "weight_scale", "weight_zero_point")}
    if "weight_zero_point" not in state and "weight_zero_point" in local:
        state["weight_zero_point"] = local["weight_zero_point"]
    return cls.compress(state, scheme)


def _scheme_of(qcfg, name):
    for scheme in qcfg.config_groups.values():
        if name in scheme.targets or "Linear" in scheme.targets:
            return scheme
    raise AssertionError(f"{name} in no config group")


@pytest.mark.parametrize("arch,scheme", [
    ("bert", "w8a8"), ("gpt2", "w8a8"), ("llama", "w8a8"),
    ("llama", "w8a8-static"), ("bert", "w8a8-static-asym"),
    ("llama", "w8"), ("gpt2", "w8"),
    ("llama", "w4"), ("llama", "w4-asym"),
    ("bert", "2:4+w8a8"), ("llama", "2:4+w8a8"),
])
def test_ct_weights_roundtrip_exact(tmp_path, arch, scheme):
    model = _prepare(arch, scheme)
    original = copy.deepcopy(model.state_dict())
    qdict = export_compressed_tensors(model, tmp_path)
    config, qcfg, tensors = _ct_read(tmp_path)
    assert config["model_type"] == model.config.model_type
    assert config["quantization_config"] == json.loads(json.dumps(qdict))
    assert qcfg.quant_method == "compressed-tensors" and len(qcfg.config_groups) == 1
    group = next(iter(qcfg.config_groups.values()))
    assert group.targets == ["Linear"]
    w = group.weights
    if scheme.startswith("w4"):
        assert qcfg.format == "pack-quantized"
        assert (w.num_bits, w.strategy, w.group_size, w.symmetric) == (4, "group", 32,
                                                                       scheme == "w4")
        assert group.input_activations is None
    else:
        assert (w.num_bits, w.type, w.strategy, w.symmetric) == (8, "int", "channel", True)
        a = group.input_activations
        if scheme == "w8":
            assert qcfg.format == "pack-quantized" and a is None
        else:
            assert qcfg.format == "int-quantized"
            if scheme.startswith("w8a8-static"):
                assert (a.strategy, a.dynamic, a.symmetric) == ("tensor", False,
                                                                not scheme.endswith("asym"))
            else:
                assert (a.num_bits, a.strategy, a.dynamic, a.symmetric) == (8, "token", True,
                                                                            True)
    if arch != "bert":
        assert "lm_head" in qcfg.ignore
    conv1d = arch == "gpt2"
    layers = _packed(model)
    for name, module in layers.items():
        got = _ct_dequantize(qcfg, tensors, name, group, conv1d=conv1d)
        assert torch.equal(got, module.dequantized_weight()), name
        # compressed-tensors' own compressor writes the same bytes from the float weight
        ours = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        again = _ct_compress(qcfg, ours, group, conv1d)
        for k, v in again.items():
            if k != "bias":
                want = ours[k].t() if conv1d and k == "weight" else ours[k]
                assert torch.equal(v, want), (name, k)
        N = module.out_features
        if scheme in ("w8a8", "2:4+w8a8") or scheme.startswith("w8a8-static"):
            q = tensors[f"{name}.weight"]
            assert q.dtype == torch.int8
            assert q.shape == ((module.in_features, N) if conv1d else (N, module.in_features))
            assert tensors[f"{name}.weight_scale"].shape == (N, 1)
        if scheme.startswith("w8a8-static"):
            assert tensors[f"{name}.input_scale"].shape == (1,)
            assert float(tensors[f"{name}.input_scale"]) == float(module.input_scale)
            if module.input_zero is None:
                assert f"{name}.input_zero_point" not in tensors
            else:
                zp = tensors[f"{name}.input_zero_point"]
                assert zp.dtype == torch.int8 and int(zp) == int(module.input_zero) - 128
        if scheme in ("w8", "w4", "w4-asym"):
            assert tensors[f"{name}.weight_packed"].dtype == torch.int32
            assert tensors[f"{name}.weight_shape"].tolist() == [N, module.in_features]
    # everything else is written as it was (tied weights once)
    for key, t in tensors.items():
        owner = key.rpartition(".")[0]
        if owner not in layers:
            assert torch.equal(t, original[key]), key
    if scheme == "2:4+w8a8":
        from compressed_tensors.config import SparsityCompressionConfig
        raw = config["quantization_config"]["sparsity_config"]
        sp = SparsityCompressionConfig.load_from_registry(raw["format"], **raw)
        assert sp.sparsity_structure == "2:4" and sp.format == "dense"
        assert sorted(sp.targets) == sorted(layers)
        assert 0.4 < sp.global_sparsity <= 0.5
        for name in layers:
            q = tensors[f"{name}.weight"].reshape(-1, 4)
            assert int((q != 0).sum(-1).max()) <= 2


@pytest.mark.parametrize("scheme", ["w8", "w4", "w4-asym", "w8a8-static", "w8a8-static-asym",
                                    "2:4+w8a8", "w8a8"])
def test_ct_transformers_load_matches(tmp_path, scheme):
    """transformers + compressed-tensors load the checkpoint (decompressing it) and give
    pysparse's outputs: exactly for weight-only, up to fp32 order for static W8A8 (same
    activation codes), within CT_FAKEQUANT_RTOL for dynamic W8A8 (its own per-token scale)."""
    pytest.importorskip("compressed_tensors")
    import transformers
    model = _prepare("llama", scheme)
    export_compressed_tensors(model, tmp_path)
    kw = {}
    if scheme == "w4-asym":
        # compressed-tensors 0.20 builds the compressed module on the meta device without
        # packing weight_zero_point (its compressor, and vLLM, use the packed [N/8, G] int32
        # this checkpoint has): load it through the dequantize-on-load path instead
        kw["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **kw).eval()
    feed = _feed()
    ref, got = _out(model, feed), _out(loaded, feed)
    rel = float((got - ref).abs().max() / ref.abs().max())
    if scheme in ("w8", "w4", "w4-asym"):
        assert rel == 0.0
    elif scheme.startswith("w8a8-static"):
        # same codes up to fp32 order on the calibration data; beyond the calibrated range
        # compressed-tensors saturates symmetric int8 at -128 where pysparse stops at -127
        feed = _calib(2)[0]
        ref, got = _out(model, feed), _out(loaded, feed)
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
        assert rel < CT_FAKEQUANT_RTOL
    else:
        assert rel < CT_FAKEQUANT_RTOL
    for name, module in _packed(model).items():
        assert torch.equal(loaded.get_submodule(name).weight.float(),
                           module.dequantized_weight()), name


def test_ct_mixed_schemes_and_float_24(tmp_path):
    """Several schemes in one model: one group each, targets by name, mixed-precision; float
    2:4 layers and unreplaced layers are written float and listed in ignore."""
    model = _model("llama")
    pysparse.prune(model, pattern="2:4", include="*.mlp.*", progress=False)
    pysparse.replace_linear(model, "w8a8", include="*.self_attn.*", backend="reference")
    pysparse.replace_linear(model, "w4", include="*.mlp.up_proj", group_size=32,
                            backend="reference")
    pysparse.replace_linear(model, "2:4", include="*.mlp.gate_proj", backend="reference")
    qdict = export_compressed_tensors(model, tmp_path)
    config, qcfg, tensors = _ct_read(tmp_path)
    assert qcfg.format == "mixed-precision" and len(qcfg.config_groups) == 2
    layers = _packed(model)
    for name, module in layers.items():
        if module.scheme == "2:4":
            assert name in qcfg.ignore
            assert torch.equal(tensors[f"{name}.weight"], module.dequantized_weight())
            continue
        scheme = _scheme_of(qcfg, name)
        assert name in scheme.targets
        got = _ct_dequantize(qcfg, tensors, name, scheme)
        assert torch.equal(got, module.dequantized_weight()), name
    for i in range(2):
        assert f"model.layers.{i}.mlp.down_proj" in qcfg.ignore
        assert tensors[f"model.layers.{i}.mlp.down_proj.weight"].dtype == torch.float32
    assert "lm_head" in qcfg.ignore
    assert qdict["sparsity_config"]["targets"] == sorted(
        n for n, m in layers.items() if m.scheme == "2:4")


def test_ct_errors(tmp_path):
    with pytest.raises(TypeError, match="pysparse.export_compressed_tensors: expected a torch"):
        export_compressed_tensors("model", tmp_path)
    model = _model("bert")
    with pytest.raises(ValueError, match="nothing replaced"):
        export_compressed_tensors(model, tmp_path)
    pysparse.replace_linear(model, "w8a8", backend="reference")
    layer = model.encoder.layer[0].intermediate.dense
    layer.input_multiplier = torch.ones(layer.in_features)
    with pytest.raises(ValueError, match="smoothing multiplier"):
        export_compressed_tensors(model, tmp_path)

    class Odd(_PackedLinear):
        scheme = "odd"

    model.encoder.layer[0].intermediate.dense = Odd(64, 128)
    with pytest.raises(ValueError, match="supported schemes: w8a8"):
        export_compressed_tensors(model, tmp_path)
    assert not os.path.exists(tmp_path / "model.safetensors")


# ----------------------------------------------------------------------------- ONNX
def _ort(path, feed, fp32=False):
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if fp32:
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in feed.items()
                                            if k in names})[0])


def _check_close(path, model, feed):
    ref = _out(model, feed)
    scale = float(ref.abs().max())
    exact = _ort(path, feed, fp32=True)
    assert exact.shape == ref.shape
    assert float((exact - ref).abs().max()) / scale < ORT_FP32_RTOL
    default = _ort(path, feed)
    diff = (default - ref).abs()
    assert float(diff.max()) / scale < ORT_DEFAULT_RTOL
    assert float(diff.mean()) / scale < ORT_MEAN_RTOL


def _graph(path):
    onnx = pytest.importorskip("onnx")
    g = onnx.load(str(path)).graph
    inits = {i.name: i for i in g.initializer}
    return onnx, g, inits


def _used(model):
    """The replaced layers the exported output depends on (BertModel's pooler is not used by
    last_hidden_state, so the exporter drops it)."""
    return {n: m for n, m in _packed(model).items() if "pooler" not in n}


def _int8_dq_weights(path):
    """Names of int8 initializers feeding a DequantizeLinear."""
    onnx, g, inits = _graph(path)
    return {n.input[0] for n in g.node if n.op_type == "DequantizeLinear"
            and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8}


def test_onnx_bert_w8a8_dynamic_int8_weights(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    import transformers
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=1, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
        vocab_size=128, max_position_embeddings=32)).eval()
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    pysparse.replace_linear(model, "w8a8", backend="reference")
    path = tmp_path / "bert.onnx"
    before = dict(model.named_modules())
    assert export_onnx(model, path, _feed(2, 7)) == path
    assert dict(model.named_modules()).keys() == before.keys()
    assert all(m is before[n] for n, m in model.named_modules())  # originals put back
    assert len(_int8_dq_weights(path)) == len(_used(model)) == 6
    _, g, _ = _graph(path)
    ops = {n.op_type for n in g.node}
    assert {"ReduceMax", "Round", "Clip", "MatMul"} <= ops and "QuantizeLinear" not in ops
    assert os.path.getsize(path) < 0.4 * fp32_bytes
    _check_close(path, model, _feed(3, 9))  # other batch / sequence length, with padding


@pytest.mark.parametrize("arch,scheme", [("bert", "w8a8-static"), ("gpt2", "2:4+w8a8")])
def test_onnx_static_and_sparse(tmp_path, arch, scheme):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = _prepare(arch, scheme)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, _feed(2, 7))
    assert len(_int8_dq_weights(path)) == len(_used(model))
    _, g, _ = _graph(path)
    n_q = sum(n.op_type == "QuantizeLinear" for n in g.node)
    if scheme == "w8a8-static":  # one per distinct input (query / key / value share theirs)
        assert 0 < n_q <= len(_used(model))
    else:
        assert n_q == 0
    _check_close(path, model, _feed())


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 16, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _mlp():
    torch.manual_seed(0)
    return _MLP().eval()


def test_onnx_small_schemes(tmp_path):
    """Asymmetric static, w8, a smoothing multiplier, w4 as float weights (warning), positional
    inputs: on a two-layer MLP (fast to export)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    for scheme in ("w8a8-static-asym", "w8", "w4"):
        model = _mlp()
        if scheme.startswith("w8a8-static"):
            state.set_input_scale(model.up, 4.0 / 255, 128)
            state.set_input_scale(model.down, 3.0 / 255, 0)
            pysparse.replace_linear(model, "w8a8", activation="static", backend="reference")
            model.up.input_multiplier = torch.linspace(0.5, 2.0, 32)  # a pending smoothing
        elif scheme == "w4":
            pysparse.replace_linear(model, "w4", group_size=16, backend="reference")
        else:
            pysparse.replace_linear(model, scheme, backend="reference")
        path = tmp_path / "mlp.onnx"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_onnx(model, path, x, input_names=["x"])
        warned = [str(w.message) for w in caught if "export_onnx" in str(w.message)]
        assert bool(warned) == (scheme == "w4"), warned
        assert len(_int8_dq_weights(path)) == (0 if scheme == "w4" else 2)
        ref = _out_plain(model, x)
        got = _ort(path, {"x": torch.randn(7, 32)}, fp32=True)
        assert got.shape == (7, 16)
        got = _ort(path, {"x": x}, fp32=True)
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5, scheme
    with pytest.raises(ValueError, match="no int8 QDQ form"):
        export_onnx(model, path, x, unsupported="error")


def _out_plain(model, x):
    with torch.no_grad():
        return model(x)


def test_onnx_errors_restore_modules(tmp_path):
    with pytest.raises(TypeError, match="pysparse.export_onnx: expected a torch"):
        export_onnx(None, tmp_path / "m.onnx", torch.zeros(1, 32))
    model = _mlp()
    with pytest.raises(ValueError, match="nothing replaced"):
        export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 32))
    pysparse.replace_linear(model, "w8a8", backend="reference")
    with pytest.raises(TypeError, match="example_inputs must be"):
        export_onnx(model, tmp_path / "m.onnx", [1, 2])
    with pytest.raises(ValueError, match="give example_inputs"):
        export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="unsupported must be"):
        export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 32), unsupported="skip")
    pytest.importorskip("onnxscript")
    up, down = model.up, model.down
    with pytest.raises(Exception):  # the export itself fails: wrong input width
        export_onnx(model, tmp_path / "m.onnx", torch.zeros(2, 31))
    assert model.up is up and model.down is down
