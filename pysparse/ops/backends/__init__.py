"""Backend registry and selection.

Every op has the pure-torch ``reference`` registered as its CompositeExplicitAutograd kernel, so
it runs on any device; device backends register on top (``cpu`` = pysparse._C C++ kernels;
``triton`` = the Triton kernels in pysparse.kernels for CUDA tensors; ``cuda`` arrives with
the CUDA C++ kernels). ``PYSPARSE_BACKEND=<name>`` forces one
(``reference`` makes every op take the reference path; forcing a backend that cannot run raises).
"""
import os

import torch

from .. import reference

NAMES = ("cpu", "cuda", "triton", "reference")
ENV = "PYSPARSE_BACKEND"


_forced_cache = (None, None)  # (raw env value, parsed) — ops read it on every call


def forced() -> str | None:
    """The backend named by PYSPARSE_BACKEND, validated; None when unset or 'auto'."""
    global _forced_cache
    raw = os.environ.get(ENV)
    if raw == _forced_cache[0]:
        return _forced_cache[1]
    name = (raw or "").strip().lower()
    if name in ("", "auto"):
        name = None
    elif name not in NAMES:
        raise ValueError(f"pysparse: {ENV}={name!r} is not a backend; choose one of "
                         f"{', '.join(NAMES)} or auto")
    _forced_cache = (raw, name)
    return name


def availability() -> dict:
    """{backend: (usable, reason)} for this process and machine."""
    from . import cpu
    out = {"cpu": cpu.status()}
    has_cuda = torch.cuda.is_available()
    out["cuda"] = (False, "no CUDA kernels in this build (pysparse._C_cuda not built)"
                   if has_cuda else "torch has no CUDA device here")
    from . import triton
    out["triton"] = triton.status()
    out["reference"] = (True, "pure torch, any device")
    return out


def check_usable(name: str | None, device: torch.device) -> None:
    """Raise a clear error when backend ``name`` cannot run tensors on ``device``."""
    if name is None or name == "reference":
        return
    if name not in NAMES:
        raise ValueError(f"pysparse: unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    ok, why = availability()[name]
    if not ok:
        raise RuntimeError(f"pysparse: backend {name!r} is not usable: {why}")
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"pysparse: backend 'cpu' cannot run tensors on {device}")


_registered = False


def register_all() -> None:
    global _registered
    if _registered:
        return
    from ..library import OPS
    for op in OPS:
        torch.library.impl(f"pysparse::{op}", "CompositeExplicitAutograd",
                           getattr(reference, op))
    from . import cpu, triton
    cpu.register()
    # Triton kernels serve CUDA tensors (and CPU tensors under TRITON_INTERPRET=1, the tests):
    # without either, neither triton nor torch._inductor (~2 s) is imported
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        triton.register()  # a no-op when Triton is not importable
    _registered = True
