"""pysparse.benchmark (behind `pysparse bench`): outputs, keys, sanity of the numbers, errors."""
import json
import sys

import pytest
import torch

from pysparse import benchmark

SHAPE = (128, 256)  # (N, K): small, so a cell takes microseconds


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, benchmark.run_kernels(out, shapes=(SHAPE,), ms=(1, 5), budget_s=0.01,
                                      progress=False)


def test_run_kernels_writes_json_md_png(kernels):
    out, res = kernels
    data = json.loads((out / "bench.json").read_text())
    assert data["kind"] == "kernels"
    for key in ("machine", "peaks", "rows", "notes", "paths", "config", "definitions"):
        assert key in data
    m = data["machine"]
    for key in ("cpu", "torch_threads", "isa", "torch", "pysparse", "python"):
        assert key in m
    assert m["torch_threads"] == torch.get_num_threads()
    p = data["peaks"]
    assert p["bandwidth"]["peak_gbs"] > 0 and p["fp32_gflops"] > 0 and p["int8"]["gops"] > 0
    assert p["int8"]["source"]
    assert {(r["M"], r["scheme"]) for r in data["rows"]} == {
        (M, s) for M in (1, 5) for s in benchmark.KERNEL_SCHEMES}
    md = (out / "bench.md").read_text()
    assert md.count("\n| 128×256 |") == len(data["rows"])
    assert res["paths"]["json"] == str(out / "bench.json")
    assert res["paths"]["md"] == str(out / "bench.md")
    pytest.importorskip("matplotlib")
    for name in ("speedup_vs_m.png", "floor.png"):
        png = out / name
        assert str(png) in res["paths"]["charts"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_kernels_numbers_are_sane(kernels):
    _, res = kernels
    for r in res["rows"]:
        assert (r["N"], r["K"]) == SHAPE and r["shape"] == "128x256"
        assert r["speedup"] > 0 and r["ms"] > 0 and r["fp32_ms"] > 0
        assert r["p10_ms"] <= r["ms"] <= r["p90_ms"]
        assert 0 < r["fraction_of_floor"] < 1.5, r
        # nn.Linear's fp32 weight is cache-resident here and can beat the DRAM floor at M=1
        assert r["fp32_fraction_of_floor"] > 0
        assert r["floor_bound"] in ("memory", "compute")
        # packed weights: int8 is a quarter of fp32 (+ scales/colsums/bias), 2:4+w8a8 less
        assert r["weight_bytes"] < r["fp32_weight_bytes"]
        assert r["rel_err"] < (1e-5 if r["scheme"] == "2:4" else 0.05)
        assert r["ops"] == (1 if r["scheme"].startswith("2:4") else 2) * r["M"] * 128 * 256


def test_no_matplotlib_means_a_note_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    peaks = {"bandwidth": {"peak_gbs": 10.0}, "fp32_gflops": 50.0,
             "int8": {"gops": 200.0, "source": "given"}}
    res = benchmark.run_kernels(tmp_path, shapes=((32, 64),), ms=(2,), schemes=("w8a8",),
                                budget_s=0.001, progress=False, peaks=peaks)
    assert res["paths"]["charts"] == []
    assert any("matplotlib" in n for n in res["notes"])
    assert not list(tmp_path.glob("*.png"))
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["scheme"] == "w8a8"


@pytest.mark.parametrize("kwargs, match", [
    ({"schemes": ("w8a8", "int3")}, "unknown scheme"),
    ({"schemes": ()}, "schemes is empty"),
    ({"shapes": ()}, "shapes is empty"),
    ({"shapes": ((0, 64),)}, "positive ints"),
    ({"shapes": ((64,),)}, "positive ints"),
    ({"shapes": ((64, 30),)}, "multiple of 4"),
    ({"ms": (1, 0)}, "positive int"),
    ({"ms": (-3,)}, "positive int"),
    ({"ms": ()}, "ms is empty"),
    ({"budget_s": 0}, "budget_s"),
])
def test_run_kernels_bad_input(tmp_path, kwargs, match):
    args = {"shapes": ((64, 64),), "ms": (1,), "budget_s": 0.01} | kwargs
    with pytest.raises(ValueError, match=match):
        benchmark.run_kernels(tmp_path / "x", progress=False, **args)
    assert not (tmp_path / "x").exists()  # nothing measured, nothing written


@pytest.mark.parametrize("kwargs, match", [
    ({"shapes": ()}, "shapes is empty"),
    ({"shapes": ((1, 0),)}, "positive ints"),
    ({"reps": (3,)}, "reps"),
    ({"reps": 0}, "reps"),
    ({"model": torch.nn.Identity()}, "together"),
    ({"model": torch.nn.Identity(), "tokenizer": object(), "model_dir": "x"}, "not both"),
    ({"reference": torch.nn.Identity()}, "reference must be"),
    ({"schemes": ("w8a8", "int3")}, "unknown or no scheme"),
    ({"schemes": ()}, "unknown or no scheme"),
])
def test_run_model_bad_input(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        benchmark.run_model(tmp_path, progress=False, **kwargs)


@pytest.mark.slow
def test_run_model_with_a_given_model(tmp_path, minilm):
    import copy

    import pysparse
    base, tok = minilm
    q = copy.deepcopy(base)
    pysparse.replace_linear(q, "w8a8")
    res = benchmark.run_model(tmp_path, model=q, tokenizer=tok, name="mine w8a8",
                              shapes=((1, 16), (2, 8)), reps=2, progress=False, n_texts=12,
                              reference=minilm)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["kind"] == "model" and [r["model"] for r in data["rows"]] == [
        "fp32 reference", "mine w8a8"]
    row = data["rows"][1]
    for key in ("b1_s16", "b2_s8"):
        assert row[key]["median_ms"] > 0 and row[key]["speedup_vs_fp32"] > 0
        assert row[key]["reps"] == 2
    assert row["fidelity"]["cosine"] > 0.99
    assert data["rows"][0]["b1_s16"]["speedup_vs_fp32"] == 1.0
    assert "| mine w8a8 |" in (tmp_path / "bench.md").read_text()
    assert res["paths"]["json"] == str(tmp_path / "bench.json")
    if res["paths"]["charts"]:
        assert (tmp_path / "speedup.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_run_model_from_a_saved_directory(tmp_path, minilm):
    import copy

    import pysparse
    if not hasattr(pysparse, "save"):
        pytest.skip("pysparse.save/load not in this build")
    base, tok = minilm
    q = copy.deepcopy(base)
    pysparse.replace_linear(q, "w8a8")
    pysparse.save(q, tmp_path / "m", tokenizer=tok)
    res = benchmark.run_model(tmp_path / "out", model_dir=tmp_path / "m", shapes=((1, 8),),
                              reps=1, progress=False, n_texts=12, reference=minilm)
    assert res["model_dir"] == str(tmp_path / "m")
    row = res["rows"][1]
    assert row["model"] == str(tmp_path / "m") and row["b1_s8"]["median_ms"] > 0
    assert row["fidelity"]["cosine"] > 0.99
