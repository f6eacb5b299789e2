import importlib.util
import json

import pytest

from pysparse import cli


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"]["usable"] is True
    assert set(info["backends"]) == {"cpu", "cuda", "triton", "reference"}


def test_info_text(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CPU kernel ISA" in out and "reference" in out


def test_bad_args():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--texts", "3"])
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, minilm):
    from pysparse import demo
    result, json_path, png = demo.run(tmp_path, n_texts=40, reps=(2, 1), progress=False)
    data = json.loads(json_path.read_text())
    assert [r["scheme"] for r in data["rows"]] == ["fp32", "w8a8", "2:4", "2:4+w8a8"]
    fp32, w8a8 = data["rows"][0], data["rows"][1]
    assert fp32["cosine"] == pytest.approx(1.0) and fp32["recall@10"] == 1.0
    assert w8a8["cosine"] > 0.99
    assert w8a8["linear_weight_bytes"] < 0.3 * fp32["linear_weight_bytes"]
    assert png is None or png.stat().st_size > 1000
    assert "w8a8" in demo.format_table(result)


# --------------------------------------------------------------------------------------------
# compress / eval / info --model on a tiny BERT with the bundled MiniLM's tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A local transformers directory: random 2-layer BERT (hidden 64) + MiniLM's tokenizer."""
    models = pytest.importorskip("pysparse.models")
    try:
        path = models.minilm_path()
    except models.ModelNotInstalled as exc:
        pytest.skip(str(exc))
    import torch
    import transformers
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=30522,
                                  max_position_embeddings=128, architectures=["BertModel"])
    transformers.BertModel(cfg).eval().save_pretrained(d)
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    from pysparse.pipeline import default_texts
    p = tmp_path_factory.mktemp("data") / "data.jsonl"
    recs = default_texts("eval", 40, sections=True)
    p.write_text("\n".join(json.dumps({"text": t, "label": s}) for t, s in recs) + "\n")
    return p


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_compress_eval_round_trip(tmp_path, tiny_dir, labelled, capsys):
    import torch

    import pysparse
    from pysparse.pipeline import load_model
    out = tmp_path / "w8a8"
    assert cli.main(["compress", str(tiny_dir), "--scheme", "w8a8", "--out", str(out),
                     "--no-progress", "--json"]) == 0
    res = _json(capsys)
    assert res["bytes"]["linear_after"] < 0.3 * res["bytes"]["linear_before"]
    assert [s["step"] for s in res["steps"]] == ["replace_linear w8a8"]
    loaded = pysparse.load(out)
    ref, tok, _ = load_model(tiny_dir)
    pysparse.replace_linear(ref, "w8a8")
    ids = tok(["a small test", "another text here"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(loaded(**ids).last_hidden_state, ref(**ids).last_hidden_state)
    assert cli.main(["eval", str(out), "--data", str(labelled), "--no-progress", "--json"]) == 0
    ev = _json(capsys)
    assert ev["texts"] == 40 and 0.95 < ev["cosine"] <= 1.0 + 1e-6 and ev["recall@10"] > 0.5
    assert 0 <= ev["accuracy_model"] <= 1 and "accuracy_retention" in ev
    assert cli.main(["export", str(out), "--to", "compressed-tensors", "--out",
                     str(tmp_path / "ct"), "--json"]) == 0
    assert _json(capsys)["quantization_config"]["quant_method"] == "compressed-tensors"
    if importlib.util.find_spec("onnxruntime") is not None:
        assert cli.main(["export", str(out), "--to", "onnx", "--out", str(tmp_path / "onnx"),
                         "--json"]) == 0
        assert _json(capsys)["bytes"] > 1000
    assert cli.main(["info", "--model", str(out), "--json"]) == 0
    info = _json(capsys)
    assert set(info["model_dir"]["layers"].values()) == {"w8a8"}
    assert info["model_dir"]["extra"]["recipe"]["scheme"] == "w8a8"


@pytest.mark.parametrize("argv, steps", [
    (["--scheme", "2:4+w8a8", "--prune", "sparsegpt"],
     ["prune sparsegpt 2:4", "replace_linear 2:4+w8a8"]),
    (["--scheme", "w8a8", "--activation", "static", "--smooth", "0.5"],
     ["smooth alpha=0.5", "calibrate", "replace_linear w8a8"]),
    (["--scheme", "w4", "--group-size", "32", "--awq", "--gptq"],
     ["awq", "gptq", "replace_linear w4"]),
    (["--scheme", "fp32", "--pattern", "heads", "--sparsity", "0.25"],
     ["prune magnitude heads"]),
    (["--scheme", "2:4+w8a8", "--prune", "sparsegpt", "--distill", "--quick"],
     ["prune sparsegpt 2:4", "distill", "replace_linear 2:4+w8a8"]),
    (["--scheme", "w8a8", "--share", "2", "--distill", "--quick", "--distill-steps", "3"],
     ["share every 2", "distill", "replace_linear w8a8"]),
    (["--scheme", "2:4+w8a8", "--distill", "--quick", "--qat", "--distill-steps", "4"],
     ["prune magnitude 2:4", "distill", "replace_linear 2:4+w8a8"]),
])
def test_compress_recipes(tmp_path, tiny_dir, labelled, capsys, argv, steps):
    import pysparse
    out = tmp_path / "o"
    assert cli.main(["compress", str(tiny_dir), *argv, "--calib", str(labelled), "--calib-n",
                     "16", "--out", str(out), "--no-progress", "--json"]) == 0
    res = _json(capsys)
    assert [s["step"] for s in res["steps"]] == steps
    if "--distill" in argv:  # --qat: fake-quant QAT in the last quarter of the steps
        d = next(s["distill"] for s in res["steps"] if s["step"] == "distill")
        qat = "w8a8" if "--qat" in argv else None
        assert res["recipe"]["distill_options"].get("qat") == qat
        assert d["qat_step"] == (None if qat is None else int(0.75 * d["steps"]))
    model = pysparse.load(out)
    assert model is not None
    assert cli.main(["eval", str(out), "--data", str(labelled), "--no-progress", "--json"]) == 0
    ev = _json(capsys)
    assert ev["cosine"] > 0.5


def test_cli_user_errors_exit_1_without_traceback(tmp_path, tiny_dir, capsys):
    assert cli.main(["compress", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "config.json" in err and "Traceback" not in err
    assert cli.main(["eval", str(tmp_path)]) == 1
    assert "no pysparse.json" in capsys.readouterr().err
    assert cli.main(["compress", str(tiny_dir), "--scheme", "w8a8", "--awq", "--out",
                     str(tmp_path / "o2"), "--no-progress"]) == 1
    assert "--awq" in capsys.readouterr().err
    for argv in (["--scheme", "w8a8", "--qat"], ["--scheme", "2:4", "--distill", "--qat"],
                 ["--scheme", "w8a8", "--distill", "--qat", "--smooth", "0.5"]):
        assert cli.main(["compress", str(tiny_dir), *argv, "--out", str(tmp_path / "o4"),
                         "--no-progress"]) == 1
        assert "--qat needs --distill" in capsys.readouterr().err
    bad = tmp_path / "empty.txt"
    bad.write_text("\n\n")
    assert cli.main(["compress", str(tiny_dir), "--calib", str(bad), "--out",
                     str(tmp_path / "o3"), "--no-progress"]) == 1
    assert "holds no texts" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["compress", "--scheme", "w9"], ["compress"], ["eval"], ["bench", "gpus"],
    ["bench", "kernels", "--m", "0"], ["bench", "kernels", "--shapes", "3y4"],
    ["compress", "--out", "x", "--calib-n", "0"],
])
def test_cli_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("cmd", ["compress", "eval", "export", "bench", "info", "demo"])
def test_help_everywhere(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([cmd, "--help"])
    assert exc.value.code == 0 and "--json" in capsys.readouterr().out


def test_read_texts_formats(tmp_path):
    from pysparse.pipeline import read_texts
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    assert read_texts(tmp_path / "a.txt") == (["one", "two"], None)
    (tmp_path / "b.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y", "label": 2}\n')
    assert read_texts(tmp_path / "b.jsonl") == (["x", "y"], [1, 2])
    (tmp_path / "c.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y"}\n')
    with pytest.raises(ValueError, match="no 'label'"):
        read_texts(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match="'text'"):
        read_texts(tmp_path / "d.jsonl")
    with pytest.raises(FileNotFoundError):
        read_texts(tmp_path / "missing.txt")


def test_default_texts_disjoint():
    from pysparse.pipeline import default_texts
    assert not set(default_texts("eval", 256)) & set(default_texts("calib", 512))


@pytest.mark.slow
def test_compress_minilm_default(tmp_path, minilm, capsys):
    out = tmp_path / "m"
    assert cli.main(["compress", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--n", "64", "--no-progress", "--json"]) == 0
    ev = _json(capsys)
    assert ev["cosine"] > 0.995 and ev["recall@10"] > 0.85
    assert ev["accuracy_retention"] > 0.9


def test_bench_kernels_cli(tmp_path, capsys):
    assert cli.main(["bench", "kernels", "--shapes", "64x64", "--m", "1,3", "--schemes",
                     "w8a8,2:4+w8a8", "--budget", "0.01", "--out", str(tmp_path),
                     "--no-progress", "--json"]) == 0
    res = _json(capsys)
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.md").exists()
    rows = res["rows"]
    assert {r["scheme"] for r in rows} == {"w8a8", "2:4+w8a8"} and len(rows) == 4
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == rows
