"""Triton backend: the kernels in ``pysparse.kernels`` for CUDA tensors.

Each kernel is a ``torch.library.triton_op`` (its launcher calls the kernel through
``torch.library.wrap_triton``), so torch.compile traces into the kernel instead of breaking the
graph; the public op gets a ``CUDA`` kernel that calls it where it applies and the reference
otherwise:

* ``pysparse::attention_triton`` -> ``pysparse::attention`` (reference for head_dim > 128,
  more than 65535 heads or batch rows);
* ``pysparse::quantize_per_token_triton``, ``pysparse::int8_linear_triton``,
  ``pysparse::sparse24_linear_triton``, ``pysparse::sparse24_int8_linear_triton`` -> the public
  ops of the same name without the suffix (reference when an offset would pass 2**31
  elements, or for 2:4 float values of another dtype than x).

``PYSPARSE_BACKEND`` naming another backend sends every op to the reference. The "where it
applies" tests are the small ``_use_triton_*`` functions (a CUDA C++ backend goes in front of
them). Importing this module never needs Triton or a GPU; ``status()`` says why the backend
cannot run here.
"""
import importlib

import torch

from .. import reference
from . import forced

_triton = None  # imported on first use (importing triton costs ~0.25 s; CPU-only users never pay)
_IMPORT_ERROR = None
_tried = False


def _load():
    """The triton module, or None (then _IMPORT_ERROR says why)."""
    global _triton, _IMPORT_ERROR, _tried
    if not _tried:
        _tried = True
        try:
            _triton = importlib.import_module("triton")
        except Exception as exc:  # noqa: BLE001 - any import failure means: no Triton kernels
            _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    return _triton

MIN_CAPABILITY = (8, 0)  # bf16 tensor-core MMA and the tile configs assume Ampere or newer


def status():
    """(usable, reason) of the Triton backend in this process."""
    if _load() is None:
        return False, (f"triton is not importable ({_IMPORT_ERROR}); install it with "
                       "`pip install pysparse[gpu]`")
    if _IMPORT_ERROR is not None:
        return False, _IMPORT_ERROR
    if not torch.cuda.is_available():
        return False, (f"no CUDA device: the Triton kernels need an NVIDIA GPU (sm_80+) and a "
                       f"CUDA build of torch (torch {torch.__version__}, "
                       f"CUDA {torch.version.cuda or 'not built'})")
    cap = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if cap < MIN_CAPABILITY:
        return False, (f"{name} is sm_{cap[0]}{cap[1]}; the Triton kernels need sm_80 or newer")
    return True, f"Triton {_triton.__version__} kernels on {name} (sm_{cap[0]}{cap[1]})"


def _use_triton(q) -> bool:
    f = forced()
    if f is not None and f != "triton":
        return False
    from ...kernels.attention import MAX_GRID_YZ, MAX_HEAD_DIM
    return (q.dim() == 4 and q.shape[3] <= MAX_HEAD_DIM and q.shape[0] <= MAX_GRID_YZ
            and q.shape[1] <= MAX_GRID_YZ)


def _attention_cuda(q, k, v, mask=None, causal=False, scale=None):
    """CUDA kernel of pysparse::attention: the Triton op where it applies, else the reference."""
    if not _use_triton(q):
        return reference.attention(q, k, v, mask, causal, scale)
    return torch.ops.pysparse.attention_triton(q, k, v, mask, causal, scale)


def _not_forced_elsewhere() -> bool:
    f = forced()
    return f is None or f == "triton"


def _linear_sizes(x, w) -> tuple | None:
    """(M, N, K) of x [..., K] against a weight with N rows, or None when the arguments are
    malformed (then the reference raises its own error)."""
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or x.dim() < 1 \
            or w.dim() != 2:
        return None
    K = x.shape[-1]
    return (x.numel() // K if K else 0), w.shape[0], K


def _use_triton_quantize(x) -> bool:
    """quantize_per_token: any float x whose element count fits 32-bit offsets."""
    return (_not_forced_elsewhere() and isinstance(x, torch.Tensor) and x.dim() >= 1
            and x.numel() < 2 ** 31)


def _use_triton_linear(x, w) -> bool:
    """int8_linear / sparse24_int8_linear (w: w_q or values_q): offsets within 32 bits."""
    from ...kernels.int8_linear import fits_int32
    sizes = _linear_sizes(x, w)
    return _not_forced_elsewhere() and sizes is not None and fits_int32(*sizes)


def _use_triton_sparse24_float(x, values) -> bool:
    """sparse24_linear: as _use_triton_linear, and values of x's dtype (the kernel multiplies
    x and the expanded weight in one dtype)."""
    return _use_triton_linear(x, values) and values.dtype == x.dtype


def _quantize_per_token_cuda(x):
    if not _use_triton_quantize(x):
        return reference.quantize_per_token(x)
    return torch.ops.pysparse.quantize_per_token_triton(x)


def _int8_linear_cuda(x, w_q, w_scale, bias=None):
    if not _use_triton_linear(x, w_q):
        return reference.int8_linear(x, w_q, w_scale, bias)
    return torch.ops.pysparse.int8_linear_triton(x, w_q, w_scale, bias)


def _sparse24_linear_cuda(x, values, meta, bias=None):
    if not _use_triton_sparse24_float(x, values):
        return reference.sparse24_linear(x, values, meta, bias)
    return torch.ops.pysparse.sparse24_linear_triton(x, values, meta, bias)


def _sparse24_int8_linear_cuda(x, values_q, meta, w_scale, bias=None):
    if not _use_triton_linear(x, values_q):
        return reference.sparse24_int8_linear(x, values_q, meta, w_scale, bias)
    return torch.ops.pysparse.sparse24_int8_linear_triton(x, values_q, meta, w_scale, bias)


_registered = False


# the public ops' CUDA kernels on this backend (backends.register_all registers them, behind
# the CUDA C++ kernels where those are built)
CUDA_KERNELS = {"attention": _attention_cuda, "quantize_per_token": _quantize_per_token_cuda,
                "int8_linear": _int8_linear_cuda, "sparse24_linear": _sparse24_linear_cuda,
                "sparse24_int8_linear": _sparse24_int8_linear_cuda}


def register() -> bool:
    """Define the ``*_triton`` ops (their CUDA kernels for the public ops: ``CUDA_KERNELS``).
    Returns False (and defines nothing) when Triton is not importable."""
    global _registered, _IMPORT_ERROR
    if _registered:
        return True
    if _load() is None:
        return False
    try:
        from ...kernels import attention as _attn
        from ...kernels import int8_linear as _i8
        from ...kernels import sparse24 as _sp24
    except Exception as exc:  # noqa: BLE001 - e.g. a Triton too old for the kernel: say so
        _IMPORT_ERROR = f"pysparse.kernels did not import ({type(exc).__name__}: {exc})"
        return False

    @torch.library.triton_op("pysparse::attention_triton", mutates_args=())
    def _attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None = None, causal: bool = False,
                          scale: float | None = None) -> torch.Tensor:
        return _attn.attention_fwd(q, k, v, mask, causal, scale)

    @torch.library.triton_op("pysparse::quantize_per_token_triton", mutates_args=())
    def _quantize_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _i8.quantize_per_token(x)

    @torch.library.triton_op("pysparse::int8_linear_triton", mutates_args=())
    def _int8_linear_triton(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
        return _i8.int8_linear(x, w_q, w_scale, bias)

    @torch.library.triton_op("pysparse::sparse24_linear_triton", mutates_args=())
    def _sparse24_linear_triton(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                                bias: torch.Tensor | None = None) -> torch.Tensor:
        return _sp24.sparse24_linear(x, values, meta, bias)

    @torch.library.triton_op("pysparse::sparse24_int8_linear_triton", mutates_args=())
    def _sparse24_int8_linear_triton(x: torch.Tensor, values_q: torch.Tensor,
                                     meta: torch.Tensor, w_scale: torch.Tensor,
                                     bias: torch.Tensor | None = None) -> torch.Tensor:
        return _sp24.sparse24_int8_linear(x, values_q, meta, w_scale, bias)

    _registered = True
    return True
