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
