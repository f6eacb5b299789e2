"""pysparse.save / pysparse.load: bit-exact round trips for every scheme and model family, shared
modules and tied tensors stored once, and clear errors for broken directories."""
import json

import pytest
import torch

import pysparse
from pysparse import io as psio
from pysparse.nn.linear import _PackedLinear
from pysparse.testing.models import ARCHS, tiny_bert, tiny_gpt2


def _ids(model, batch=2, seq=12):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)


@torch.inference_mode()
def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _tensors(model):
    return {k: v for k, v in list(model.named_parameters()) + list(model.named_buffers())}


def _canonical(model):
    """Every packed layer's canonical tensors (layout-independent), by qualified name."""
    return {f"{n}.{k}": v for n, m in model.named_modules() if isinstance(m, _PackedLinear)
            for k, v in psio._packed_spec(m)[1].items()}


def _prepare(arch, scheme, calib_ids=None):
    model = ARCHS[arch]()
    if scheme.startswith("2:4"):
        pysparse.prune(model, pattern="2:4", method="magnitude")
    if scheme == "static":
        pysparse.calibrate(model, [{"input_ids": _ids(model, 4)}], symmetric=False)
        pysparse.replace_linear(model, "w8a8", activation="static")
    elif scheme == "w4":
        pysparse.replace_linear(model, "w4", group_size=32, symmetric=False)
    elif scheme != "fp32":
        pysparse.replace_linear(model, scheme)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("scheme", ["fp32", "w8a8", "static", "2:4", "2:4+w8a8", "w8", "w4"])
def test_round_trip_bit_exact(tmp_path, arch, scheme):
    model = _prepare(arch, scheme)
    ids = _ids(model)
    ref = _out(model, ids)
    pysparse.save(model, tmp_path)
    loaded = pysparse.load(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(_out(loaded, ids), ref)
    a, b = _canonical(model), _canonical(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kinds = {type(m).__name__ for m in loaded.modules() if isinstance(m, _PackedLinear)}
    assert kinds == {type(m).__name__ for m in model.modules() if isinstance(m, _PackedLinear)}
    # dense tensors (embeddings, norms, unreplaced layers) identical too
    ta, tb = _tensors(model), _tensors(loaded)
    for k, v in ta.items():
        if not any(k.startswith(p + ".") for p in
                   [n for n, m in model.named_modules() if isinstance(m, _PackedLinear)]):
            assert torch.equal(v, tb[k]), k


def test_packed_bytes_are_what_is_stored(tmp_path):
    model = _prepare("bert", "2:4+w8a8")
    pysparse.save(model, tmp_path)
    dense = _prepare("bert", "fp32")
    pysparse.save(dense, tmp_path / "dense")
    lin = sum(m.in_features * m.out_features for m in model.modules()
              if isinstance(m, _PackedLinear))
    saved = (tmp_path / psio.WEIGHTS).stat().st_size
    dense_saved = (tmp_path / "dense" / psio.WEIGHTS).stat().st_size
    # 2:4 int8: half the values at 1 byte + 1/8 byte of metadata per weight instead of 4 bytes
    assert dense_saved - saved > 0.8 * lin * (4 - 0.5 - 0.125)
    manifest = psio.read_manifest(tmp_path)
    assert manifest["modules"]["encoder.layer.0.attention.self.query"]["scheme"] == "2:4+w8a8"
    assert manifest["tensors"]["encoder.layer.0.attention.self.query.values_q"]["dtype"] == "int8"


def test_reference_backend_and_bf16(tmp_path):
    model = _prepare("llama", "w8a8").to(torch.bfloat16)
    ids = _ids(model)
    ref = _out(model, ids)
    pysparse.save(model, tmp_path)
    loaded = pysparse.load(tmp_path)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(_out(loaded, ids), ref)
    as_ref = pysparse.load(tmp_path, backend="reference")
    assert all(m.backend == "reference" for m in as_ref.modules() if isinstance(m, _PackedLinear))
    torch.testing.assert_close(_out(as_ref, ids).float(), ref.float(), rtol=0.05, atol=0.05)


def test_tied_embeddings_stored_once(tmp_path):
    model = _prepare("gpt2", "w8a8")
    assert model.lm_head.weight is model.transformer.wte.weight
    pysparse.save(model, tmp_path)
    m = psio.read_manifest(tmp_path)
    assert m["aliases"].get("lm_head.weight") == "transformer.wte.weight"
    assert "lm_head.weight" not in m["tensors"]
    loaded = pysparse.load(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_shared_layers_stored_once(tmp_path):
    """ALBERT-style sharing: layer 1 is layer 0 (one module under two names)."""
    model = tiny_bert()
    model.encoder.layer[1] = model.encoder.layer[0]
    pysparse.replace_linear(model, "w8a8")
    ids = _ids(model)
    ref = _out(model, ids)
    pysparse.save(model, tmp_path)
    m = psio.read_manifest(tmp_path)
    assert m["shared_modules"] == {"encoder.layer.1": "encoder.layer.0"}
    assert not any(k.startswith("encoder.layer.1.") for k in m["tensors"])
    loaded = pysparse.load(tmp_path)
    assert loaded.encoder.layer[1] is loaded.encoder.layer[0]
    assert torch.equal(_out(loaded, ids), ref)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_structured_pruned_round_trip(tmp_path, arch):
    model = ARCHS[arch]()
    pysparse.prune(model, pattern="heads", sparsity=0.5 if arch == "llama" else 0.25)
    pysparse.prune(model, pattern="neurons", sparsity=0.25)
    pysparse.replace_linear(model, "w8a8")
    ids = _ids(model)
    ref = _out(model, ids)
    pysparse.save(model, tmp_path)
    loaded = pysparse.load(tmp_path)
    assert torch.equal(_out(loaded, ids), ref)


def test_pysparse_attention_survives(tmp_path):
    model = tiny_bert()
    pysparse.replace_linear(model, "w8a8")
    pysparse.replace_attention(model)
    ids = _ids(model)
    ref = _out(model, ids)
    pysparse.save(model, tmp_path)
    loaded = pysparse.load(tmp_path)
    assert loaded.config._attn_implementation == "pysparse"
    assert torch.equal(_out(loaded, ids), ref)


def test_load_allocates_no_fp32_linear_weights(tmp_path, monkeypatch):
    """The model is built on the meta device: no dense weight of a packed layer is created."""
    model = _prepare("bert", "w8a8")
    pysparse.save(model, tmp_path)
    made = []
    orig = torch.nn.Linear.reset_parameters

    def spy(self):
        made.append(self.weight.device.type)
        return orig(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", spy)
    pysparse.load(tmp_path)
    assert made and set(made) == {"meta"}


def test_save_with_tokenizer_and_overwrite_rules(tmp_path):
    model = tiny_bert()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "other.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        pysparse.save(model, tmp_path / "x")
    pysparse.save(model, tmp_path / "x", overwrite=True)
    pysparse.save(model, tmp_path / "x")  # a pysparse save may be replaced
    assert (tmp_path / "x" / "other.txt").read_text() == "keep"


def _saved(tmp_path, scheme="w8a8"):
    model = _prepare("bert", scheme)
    pysparse.save(model, tmp_path)
    return tmp_path


def test_truncated_file(tmp_path):
    d = _saved(tmp_path)
    w = d / psio.WEIGHTS
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(psio.FormatError, match="truncated"):
        pysparse.load(d)


def test_corrupted_byte(tmp_path):
    d = _saved(tmp_path)
    w = d / psio.WEIGHTS
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(psio.FormatError, match="corrupted"):
        pysparse.load(d)


def _edit_manifest(d, fn):
    p = d / psio.MANIFEST
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def test_wrong_format_version(tmp_path):
    d = _saved(tmp_path)
    _edit_manifest(d, lambda m: m.update(format_version=99))
    with pytest.raises(psio.FormatError, match="format version 99"):
        pysparse.load(d)


def test_manifest_shape_mismatch(tmp_path):
    d = _saved(tmp_path)
    key = "encoder.layer.0.attention.self.query.weight_q"
    _edit_manifest(d, lambda m: m["tensors"][key].update(shape=[64, 32]))
    with pytest.raises(psio.FormatError, match="weight_q"):
        pysparse.load(d)


def test_manifest_missing_tensor(tmp_path):
    d = _saved(tmp_path)
    _edit_manifest(d, lambda m: m["tensors"].pop("embeddings.word_embeddings.weight"))
    with pytest.raises(psio.FormatError, match="do not match"):
        pysparse.load(d)


def test_manifest_config_mismatch(tmp_path):
    """A config that builds other shapes than the tensors: clear error, not a wrong model."""
    d = _saved(tmp_path, "fp32")
    _edit_manifest(d, lambda m: m["config"].update(intermediate_size=96))
    with pytest.raises(psio.FormatError, match="intermediate|96|128"):
        pysparse.load(d)


def test_manifest_unknown_class_and_garbage(tmp_path):
    d = _saved(tmp_path)
    _edit_manifest(d, lambda m: m["model"].update({"class": "os.system"}))
    with pytest.raises(psio.FormatError, match="not a transformers model class"):
        pysparse.load(d)
    (d / psio.MANIFEST).write_text("{not json")
    with pytest.raises(psio.FormatError, match="not valid JSON"):
        pysparse.load(d)
    with pytest.raises(psio.FormatError, match="no pysparse.json"):
        pysparse.load(tmp_path / "nowhere" if False else d / "..")  # parent has no manifest
    with pytest.raises(psio.FormatError, match="not a directory"):
        pysparse.load(tmp_path / "missing")


def test_manifest_packed_layer_missing_tensor(tmp_path):
    d = _saved(tmp_path)

    def drop(m):
        m["modules"]["encoder.layer.0.output.dense"]["bias"] = False
        m["modules"]["encoder.layer.0.output.dense"]["class"] = "Int4Linear"
        m["modules"]["encoder.layer.0.output.dense"].update(group_size=32, symmetric=True)
    _edit_manifest(d, drop)
    with pytest.raises(psio.FormatError, match="encoder.layer.0.output.dense"):
        pysparse.load(d)


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        pysparse.save(torch.nn.Linear(4, 4), tmp_path)
    model = tiny_gpt2()
    pysparse.prepare_qat(model)
    with pytest.raises(TypeError, match="convert_qat"):
        pysparse.save(model, tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        pysparse.save(tiny_bert(), tmp_path / "f")


def test_load_never_unpickles(tmp_path):
    d = _saved(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == [psio.WEIGHTS, psio.MANIFEST]
    assert psio.read_manifest(d)["pysparse_version"] == pysparse.__version__
