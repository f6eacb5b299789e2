"""Backend registry and selection.

Every op has the pure-torch ``reference`` registered as its CompositeExplicitAutograd kernel, so
it runs on any device; device backends register on top (``cpu`` = pysparse._C C++ kernels;
``cuda`` = the CUDA C++ kernels of pysparse._C_cuda and, behind them, ``triton`` = the Triton
kernels in pysparse.kernels, for CUDA tensors). ``PYSPARSE_BACKEND=<name>`` forces one
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
    from . import cuda
    out["cuda"] = cuda.status() if has_cuda else (False, "torch has no CUDA device here")
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
    from . import cpu, cuda, triton
    cpu.register()
    # CUDA tensors: the CUDA C++ kernels (pysparse._C_cuda) where built, then the Triton
    # kernels, then the reference, each deciding per call whether it applies. Triton's ops are
    # also defined under TRITON_INTERPRET=1 (the tests run them on CPU tensors); without CUDA
    # or that, neither triton nor torch._inductor (~2 s) is imported.
    kernels = {}
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        if triton.register():  # False when Triton is not importable
            kernels.update(triton.CUDA_KERNELS)
    if torch.cuda.is_available() and cuda.register(dict(kernels)):
        kernels.update(cuda.CUDA_KERNELS)
    for op, fn in kernels.items():
        torch.library.register_kernel(f"pysparse::{op}", "cuda", fn)
    _registered = True
