"""bench/bench_gpu.py without a GPU: the roofline tables (numbers checked by hand for a few
cells), docs/GPU.md quoting exactly those tables, and the measured mode refusing cleanly."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def roofline(bench):
    return bench.roofline_markdown()


def _row(md, heading, prefix):
    """Cells of the first row starting with ``prefix`` in the table under ``heading``."""
    section = md.split(heading, 1)[1].split("####", 1)[0]
    for line in section.splitlines():
        if line.startswith(prefix):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {prefix!r} under {heading!r}")


def test_roofline_cli_prints_the_tables(bench, roofline, capsys):
    assert bench.main(["--roofline"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == roofline.strip()
    for op in ("int8_linear", "sparse24_linear", "sparse24_int8_linear"):
        for gpu in ("A100-SXM4-80GB", "H100-SXM5-80GB"):
            assert f"#### {op} on {gpu}" in out
    assert "#### attention forward" in out


def test_int8_m1_o_proj_on_a100_by_hand(bench, roofline):
    N = K = 4096
    M = 1
    # int8 weight + fp32 per-channel scale + fp16 x in + fp16 y out, and the quantization
    # launch: int8 x written and read back, one fp32 scale per token
    nbytes = N * K + 4 * N + 2 * M * K + 2 * M * N + 2 * M * K + 4 * M
    assert nbytes == 16_818_180
    us = nbytes / (2039e9 * 0.85) * 1e6  # memory-bound: 85% of the A100's 2039 GB/s
    fp16_us = (2 * N * K + 2 * M * K + 2 * M * N) / (2039e9 * 0.85) * 1e6
    assert us == pytest.approx(9.704, abs=1e-3)
    pred = bench.linear_model("triton", M, N, K, "A100-SXM4-80GB", op="int8")
    assert pred["bytes"] == nbytes and pred["bound"] == "mem"
    assert pred["us"] == pytest.approx(us, rel=1e-9)
    cells = _row(roofline, "#### int8_linear on A100-SXM4-80GB", "| o 4096×4096 | 1 |")
    # shape, M, MB, GOP, ops/B, bound, Triton, CUDA, cuBLAS fp16, _int_mm, x fp16, x peer
    assert cells[2] == f"{nbytes / 1e6:.1f}" == "16.8"
    assert cells[5] == "mem/mem"
    assert cells[6] == cells[7] == f"{us:.1f}" == "9.7"
    assert cells[8] == f"{fp16_us:.1f}" == "19.4"
    assert cells[10] == f"{fp16_us / us:.2f} / {fp16_us / us:.2f}"


def test_compute_bound_cells_by_hand(bench, roofline):
    # int8 M=256 o-proj on A100: 2*M*N*K ops at 75% of 624 TOPS
    us = 2 * 256 * 4096 * 4096 / (624e12 * 0.75) * 1e6
    cells = _row(roofline, "#### int8_linear on A100-SXM4-80GB", "| o 4096×4096 | 256 |")
    assert cells[5] == "math/math" and cells[6] == f"{us:.1f}" == "18.4"
    # 2:4 fp16 on H100, CUDA (mma.sp, mma.sync: 63% of the 1978.9 TFLOPS 2:4 peak) vs Triton
    # (dense tl.dot at 75% of 989.4): M=256 gate_up
    pred_c = bench.linear_model("cuda", 256, 22016, 4096, "H100-SXM5-80GB", op="sparse24")
    pred_t = bench.linear_model("triton", 256, 22016, 4096, "H100-SXM5-80GB", op="sparse24")
    ops = 2 * 256 * 22016 * 4096
    assert pred_t["us"] == pytest.approx(ops / (989.4e12 * 0.75) * 1e6)
    assert pred_c["t_math_us"] == pytest.approx(ops / (1978.9e12 * 0.63) * 1e6)
    # causal attention, A100, batch 1, seq 2048, 32 x 128: MMAs at 75% plus exp2 on the MUFU
    flops = 4 * 32 * 2048 ** 2 * 128 / 2
    exps = 32 * 2048 ** 2 / 2
    us = (flops / (312e12 * 0.75) + exps / (108 * 16 * 1.41e9)) * 1e6
    pred = bench.attention_model("cuda", 1, 32, 2048, 128, True, "A100-SXM4-80GB")
    assert pred["us"] == pytest.approx(us) and pred["bound"] == "math"


def test_docs_quote_the_roofline_verbatim(roofline):
    doc = (ROOT / "docs" / "GPU.md").read_text()
    assert roofline.strip() in doc, "docs/GPU.md disagrees with `bench/bench_gpu.py --roofline`"


def test_bad_op_is_an_argparse_error(bench):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--roofline", "--ops", "int4"])
    assert exc.value.code == 2


def test_without_gpu_exits_2_with_a_message():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU visible, also on a GPU machine
    res = subprocess.run([sys.executable, str(SCRIPT), "--ops", "int8", "--m", "1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    assert "no CUDA GPU here" in res.stderr and "--roofline" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_measurement_plumbing_on_cpu(bench, monkeypatch):
    """The measured path (formats, numerics check, peers, rows, table) on CPU tensors with a
    stand-in timer and tiny shapes, so a first run on a GPU does not die in the plumbing."""
    import torch
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "_do_bench", lambda fn, cudagraph: (fn(), [1e-3, 9e-4, 1.1e-3])[1])
    monkeypatch.setattr(bench, "backend_status", lambda backend, op: (True, "stand-in"))
    monkeypatch.setitem(bench.LINEAR_SHAPES, "tiny", {"o": (64, 128)})
    monkeypatch.setitem(bench.ATTN_SHAPES, "tiny", (2, 32, True))
    monkeypatch.setitem(bench.ATTN_GRID, "tiny", [(1, 40)])
    floors = (1e12, {"fp16": 1e14, "fp16_sparse": 2e14, "int8": 2e14, "int8_sparse": 4e14})
    rows = []
    for op in ("int8", "sparse24", "sparse24_int8"):
        rows += bench.bench_linear(op, "tiny", [1, 3], torch.float32, ["triton"], floors, False)
    rows += bench.bench_attention("tiny", torch.float32, ["cuda"], floors, False)
    impls = {(r["op"], r["impl"]) for r in rows}
    assert ("int8", "pysparse triton") in impls and ("int8", "int_mm + quant") in impls
    assert ("sparse24_int8", "int_mm") in impls and ("attention", "sdpa") in impls
    r = next(r for r in rows if r["op"] == "int8" and r["M"] == 3 and r["impl"] == "cublas")
    assert r["median_us"] == pytest.approx(1.0)
    assert r["tops"] == pytest.approx(2 * 3 * 64 * 128 / 1e-6 / 1e12)
    assert r["gbs"] == pytest.approx((2 * 64 * 128 + 2 * 3 * 128 + 2 * 3 * 64) / 1e-6 / 1e9)
    md = bench.markdown(rows, "peer")
    assert md.count("\n") == len(rows) + 1


def test_numerics_mismatch_stops_the_run(bench):
    import torch
    ref = torch.randn(4, 64)
    assert bench.check_numerics("ok", ref + 1e-4 * torch.randn(4, 64), ref) > 40
    with pytest.raises(SystemExit, match="NUMERICS MISMATCH in wrong"):
        bench.check_numerics("wrong", ref.flip(1), ref)
