"""What a wheel of this repository contains, and that it imports and runs once installed.

The wheel is built from a copy of the repository's files (tracked plus untracked-not-ignored,
as `git ls-files` lists them) in a temporary directory, so no build artefact lands in the work
tree; it is built with `python -m build --wheel --no-isolation`. PYSPARSE_NO_EXT=1 skips the C++ extension (setup.py), which keeps this test at a few
seconds: the package layout, data files and entry point do not depend on it.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _repo_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot list the repository's files")
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for rel in _repo_files():
        path = ROOT / rel
        if path.is_file():  # a tracked file deleted in the work tree is left out
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / rel)
    env = dict(os.environ, PYSPARSE_NO_EXT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # `python -m build` (the `build` package is in the dev extra), as docs/GPU.md tells users
    res = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                          "--outdir", str(tmp / "dist")],
                         cwd=src, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheels = list((tmp / "dist").glob("pysparse-*.whl"))
    assert len(wheels) == 1, wheels
    return src, wheels[0], tmp


def _names(whl):
    with zipfile.ZipFile(whl) as z:
        return z.namelist()


def _packages(src):
    """Import names of every package in the source tree: pysparse/** and kernels/ (which setup.py
    maps to pysparse.kernels)."""
    pkgs = {".".join(p.parent.relative_to(src).parts)
            for p in (src / "pysparse").rglob("__init__.py")}
    if (src / "kernels" / "__init__.py").exists():
        pkgs.add("pysparse.kernels")
    return pkgs


def test_every_package_is_in_the_wheel(built):
    src, whl, _ = built
    names = set(_names(whl))
    pkgs = _packages(src)
    assert {"pysparse", "pysparse.distill", "pysparse.kernels", "pysparse.ops.backends"} <= pkgs
    missing = sorted(p for p in pkgs if p.replace(".", "/") + "/__init__.py" not in names)
    assert not missing, f"packages missing from the wheel: {missing}"
    # every module of every package, kernels/ included under its import path
    for py in (src / "pysparse").rglob("*.py"):
        assert py.relative_to(src).as_posix() in names
    for py in (src / "kernels").glob("*.py"):
        assert f"pysparse/kernels/{py.name}" in names


def test_data_files_and_markers(built):
    src, whl, _ = built
    names = set(_names(whl))
    data = sorted(p.name for p in (src / "pysparse" / "data").glob("*.jsonl.gz"))
    assert data, "no bundled data in the source tree"
    for name in data:
        assert f"pysparse/data/{name}" in names
    if (src / "pysparse" / "py.typed").exists():
        assert "pysparse/py.typed" in names


def test_no_tests_sources_or_build_outputs(built):
    _, whl, _ = built
    for n in _names(whl):
        base = n.rsplit("/", 1)[-1]
        assert not n.startswith(("tests/", "bench/", "csrc/", "docs/")), n
        assert not (base.startswith("test_") or base == "conftest.py"), n
        assert "__pycache__" not in n and not n.endswith((".pyc", ".o")), n
        assert n.startswith(("pysparse/", "pysparse-")), f"unexpected top-level entry {n}"


def test_console_script_entry_point(built):
    _, whl, _ = built
    with zipfile.ZipFile(whl) as z:
        ep = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = z.read(ep).decode()
        meta = z.read(ep.replace("entry_points.txt", "METADATA")).decode()
    assert "[console_scripts]" in text
    assert "pysparse = pysparse.cli:main" in text
    assert "Requires-Dist: torch" in meta and "Provides-Extra: gpu" in meta


@pytest.mark.slow
def test_installed_wheel_imports_and_runs_info(built):
    """Install the wheel into a scratch directory (pip --target: no venv, no dependencies; torch
    and friends come from this environment) and run it from there, away from the repository."""
    _, whl, tmp = built
    target = tmp / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile",
                          "--target", str(target), str(whl)],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(target))
    env.pop("PYSPARSE_BACKEND", None)
    code = ("import pysparse, pysparse.kernels, pysparse.distill, pysparse.data; "
            "print(pysparse.__file__); print(pysparse.kernels.__file__); "
            "print(len(pysparse.data.load_descriptions(3, seed=0)))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.split()
    assert lines[0].startswith(str(target)) and lines[1].startswith(str(target)), lines
    assert lines[2] == "3"
    script = target / "bin" / "pysparse"
    assert script.exists()
    res = subprocess.run([sys.executable, str(script), "info"], cwd=tmp, capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pysparse" in res.stdout and "reference" in res.stdout
