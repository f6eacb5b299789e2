"""Triton backend: the kernels in ``pysparse.kernels`` for CUDA tensors.

``pysparse::attention_triton`` is a ``torch.library.triton_op`` (its launcher calls the kernel
through ``torch.library.wrap_triton``), so torch.compile traces into the kernel instead of
breaking the graph; the public op ``pysparse::attention`` gets a ``CUDA`` kernel that calls it.
Cases the kernel does not take (head_dim > 128, more than 65535 heads or batch rows,
``PYSPARSE_BACKEND`` naming another backend) run the reference. Importing this module never
needs Triton or a GPU; ``status()`` says why the backend cannot run here.
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


_registered = False


def register() -> bool:
    """Define pysparse::attention_triton and register it as pysparse::attention's CUDA kernel.
    Returns False (and registers nothing) when Triton is not importable."""
    global _registered, _IMPORT_ERROR
    if _registered:
        return True
    if _load() is None:
        return False
    try:
        from ...kernels import attention as _attn
    except Exception as exc:  # noqa: BLE001 - e.g. a Triton too old for the kernel: say so
        _IMPORT_ERROR = f"pysparse.kernels.attention did not import ({type(exc).__name__}: {exc})"
        return False

    @torch.library.triton_op("pysparse::attention_triton", mutates_args=())
    def _attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None = None, causal: bool = False,
                          scale: float | None = None) -> torch.Tensor:
        return _attn.attention_fwd(q, k, v, mask, causal, scale)

    torch.library.register_kernel("pysparse::attention", "cuda", _attention_cuda)
    _registered = True
    return True
