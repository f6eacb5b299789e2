"""CUDA C++ backend: the kernels of pysparse._C_cuda (csrc/cuda/), called through
``torch.ops.pysparse_cuda.*``.

The wrappers below take the public ops' canonical arguments, apply the reference's checks,
re-pack what the kernels need (2:4 metadata -> mma.sp words, cached per meta tensor) and fall
back to ``reference`` wherever a kernel does not apply:

* ``quantize_per_token``: x float32/float16/bfloat16 on CUDA;
* ``int8_linear``: x float32/float16/bfloat16 on CUDA, K % 16 == 0;
* ``sparse24_linear``: x float16/bfloat16 with values of the same dtype, K % 16 == 0;
* ``sparse24_int8_linear``: x float32/float16/bfloat16, K % 32 == 0;
* ``attention``: fp16/bf16 q, k, v with head_dim 64 or 128 (csrc/cuda/attention.h);

and everything else goes to the fallback: the Triton backend's kernel where Triton is
installed, else the reference (CPU tensors, the extension not built, no device, sm < 80, unaligned
weights, ``PYSPARSE_BACKEND`` naming another backend). Results: int8 paths equal the reference
bit for bit (same quantization, exact int32 sums, the same fp32 epilogue order); the 2:4 float
path accumulates in fp32 in another order (within the float tolerance).

Importing this module never loads the extension nor touches CUDA; ``status()`` does, once.
"""
import importlib
import weakref

import torch

from .. import checks, reference
from ...formats import sparse24 as _sp24
from . import forced

MIN_CAPABILITY = (8, 0)  # mma.sp / IMMA m16n8k32 and cp.async need Ampere or newer
_ext = None
_LOAD_ERROR = None
_tried = False
_meta_cache = {}  # id(meta) -> (weakref to meta, meta._version, kind, K, words)
# op -> what runs where these kernels do not apply: the Triton backend's CUDA kernel when
# Triton is there (backends.register_all sets it), else the reference
FALLBACK = {}


def _fallback(op):
    return FALLBACK.get(op) or getattr(reference, op)


def _load():
    global _ext, _LOAD_ERROR, _tried
    if not _tried:
        _tried = True
        try:
            ext = importlib.import_module("pysparse._C_cuda")
            _register_fakes()
            _ext = ext
        except Exception as exc:  # noqa: BLE001 - any import failure means: no CUDA kernels
            _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    return _ext


def _register_fakes():
    """Fake (meta) impls of torch.ops.pysparse_cuda.*, so torch.compile can trace the wrappers."""
    lib = "pysparse_cuda::"

    @torch.library.register_fake(lib + "quantize_per_token")
    def _quantize_fake(x):
        return (x.new_empty(x.shape, dtype=torch.int8),
                x.new_empty(x.shape[:1], dtype=torch.float32))

    @torch.library.register_fake(lib + "int8_gemm")
    def _int8_gemm_fake(xq, x_scale, w_q, w_scale, bias, out_dtype):
        return xq.new_empty((xq.shape[0], w_q.shape[0]), dtype=out_dtype)

    @torch.library.register_fake(lib + "sparse24_gemm")
    def _sparse24_gemm_fake(x, values, meta, bias):
        return x.new_empty((x.shape[0], values.shape[0]))

    @torch.library.register_fake(lib + "sparse24_int8_gemm")
    def _sparse24_int8_gemm_fake(xq, x_scale, values_q, meta, w_scale, bias, out_dtype):
        return xq.new_empty((xq.shape[0], values_q.shape[0]), dtype=out_dtype)


def status():
    """(usable, reason) of the CUDA C++ backend in this process. Never raises."""
    if _load() is None:
        return False, (f"pysparse._C_cuda is not built ({_LOAD_ERROR}); build with a CUDA torch "
                       "and nvcc, e.g. `PYSPARSE_CUDA=1 pip install -e .`")
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    cap = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if cap < MIN_CAPABILITY:
        return False, f"{name} is sm_{cap[0]}{cap[1]}; the CUDA kernels need sm_80 or newer"
    return True, f"CUDA C++ kernels on {name} (sm_{cap[0]}{cap[1]})"


_usable = None


def _ready(x) -> bool:
    global _usable
    f = forced()
    if f is not None and f != "cuda":
        return False
    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        return False
    if _usable is None:
        _usable = status()[0]
    return _usable


def _aligned(t) -> bool:
    return t.is_contiguous() and t.data_ptr() % 16 == 0


def _rows(x, K):
    x2 = x.reshape(-1, K)
    if not _aligned(x2):
        x2 = x2.contiguous() if not x2.is_contiguous() else x2.clone()
    return x2


def _fp32(t):
    return None if t is None else t.float().contiguous()


def cuda_meta(meta, K, kind):
    """pack_cuda_meta(meta, K, kind), cached for as long as ``meta`` lives unchanged."""
    key = id(meta)
    hit = _meta_cache.get(key)
    if hit is not None and hit[0]() is meta and hit[1] == meta._version and hit[2:4] == (kind, K):
        return hit[4]
    words = _sp24.pack_cuda_meta(meta, K, kind)
    _meta_cache[key] = (weakref.ref(meta, lambda _, k=key: _meta_cache.pop(k, None)),
                        meta._version, kind, K, words)
    return words


def _quantize(op, x2):
    q, s = torch.ops.pysparse_cuda.quantize_per_token(x2)
    if not bool(torch.isfinite(s).all()):
        checks.finite_rows(op, s)  # raises the canonical message
    return q, s


def quantize_per_token(x):
    """pysparse::quantize_per_token on the CUDA kernel: (q int8 [..., K], scale fp32 [...])."""
    if not _ready(x) or x.dtype not in checks.FLOAT_DTYPES or x.dim() < 1 or x.numel() == 0:
        return _fallback("quantize_per_token")(x)
    K = x.shape[-1]
    q, s = _quantize("quantize_per_token", _rows(x, K))
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


def int8_linear(x, w_q, w_scale, bias=None):
    """pysparse::int8_linear on the CUDA kernels (reference semantics; see module docstring)."""
    if not _ready(x) or x.dtype not in checks.FLOAT_DTYPES or not isinstance(w_q, torch.Tensor):
        return _fallback("int8_linear")(x, w_q, w_scale, bias)
    op = "int8_linear"
    N, K = checks.int8_weight(op, w_q, w_scale, x.device)
    checks.activation(op, x, K)
    checks.bias(op, bias, N, x.device)
    if K % 16 or not _aligned(w_q) or x.numel() == 0:
        return _fallback("int8_linear")(x, w_q, w_scale, bias)
    q, s = _quantize(op, _rows(x, K))
    y = torch.ops.pysparse_cuda.int8_gemm(q, s, w_q, _fp32(w_scale), _fp32(bias), x.dtype)
    return y.reshape(*x.shape[:-1], N)


def sparse24_linear(x, values, meta, bias=None):
    """pysparse::sparse24_linear on mma.sp (f16/bf16 x with values of x's dtype)."""
    if (not _ready(x) or x.dtype not in (torch.float16, torch.bfloat16)
            or not isinstance(values, torch.Tensor) or values.dtype != x.dtype):
        return _fallback("sparse24_linear")(x, values, meta, bias)
    op = "sparse24_linear"
    N, K = checks.sparse24_weight(op, values, meta, x.device, checks.FLOAT_DTYPES)
    checks.activation(op, x, K)
    checks.bias(op, bias, N, x.device)
    if K % 16 or not _aligned(values) or x.numel() == 0:
        return _fallback("sparse24_linear")(x, values, meta, bias)
    checks.sparse_finite(op, x, K)
    words = cuda_meta(meta, K, "f16")
    y = torch.ops.pysparse_cuda.sparse24_gemm(_rows(x, K), values, words, _fp32(bias))
    return y.reshape(*x.shape[:-1], N)


def sparse24_int8_linear(x, values_q, meta, w_scale, bias=None):
    """pysparse::sparse24_int8_linear on per-token quantization + int8 mma.sp."""
    if (not _ready(x) or x.dtype not in checks.FLOAT_DTYPES
            or not isinstance(values_q, torch.Tensor)):
        return _fallback("sparse24_int8_linear")(x, values_q, meta, w_scale, bias)
    op = "sparse24_int8_linear"
    N, K = checks.sparse24_weight(op, values_q, meta, x.device, (torch.int8,))
    checks.tensor(op, "w_scale", w_scale, checks.FLOAT_DTYPES, ndim=1, device=x.device)
    if w_scale.shape[0] != N:
        return _fallback("sparse24_int8_linear")(x, values_q, meta, w_scale, bias)
    checks.activation(op, x, K)
    checks.bias(op, bias, N, x.device)
    if K % 32 or not _aligned(values_q) or x.numel() == 0:
        return _fallback("sparse24_int8_linear")(x, values_q, meta, w_scale, bias)
    q, s = _quantize(op, _rows(x, K))
    words = cuda_meta(meta, K, "int8")
    y = torch.ops.pysparse_cuda.sparse24_int8_gemm(q, s, values_q, words, _fp32(w_scale),
                                                   _fp32(bias), x.dtype)
    return y.reshape(*x.shape[:-1], N)


def attention(q, k, v, mask=None, causal=False, scale=None):
    """pysparse::attention on the flash-attention kernel of csrc/cuda/attention.cu: fp16/bf16,
    head_dim 64 or 128, masks of the same device (anything else: the fallback)."""
    if (not _ready(q) or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in (k, v))
            or q.dtype not in (torch.float16, torch.bfloat16) or q.dim() != 4
            or q.shape[-1] not in (64, 128) or k.dtype != q.dtype or v.dtype != q.dtype
            or (mask is not None and (not isinstance(mask, torch.Tensor)
                                      or mask.device != q.device))):
        return _fallback("attention")(q, k, v, mask, causal, scale)
    checks.attention(q, k, v, mask)  # the canonical errors before the kernel's own checks
    return torch.ops.pysparse_cuda.attention(q, k, v, mask, bool(causal), scale)


CUDA_KERNELS = {"attention": attention, "quantize_per_token": quantize_per_token,
                "int8_linear": int8_linear, "sparse24_linear": sparse24_linear,
                "sparse24_int8_linear": sparse24_int8_linear}


def register(fallbacks: dict) -> bool:
    """Load pysparse._C_cuda where torch has a CUDA device and the extension is built; then
    ``CUDA_KERNELS`` serve the public ops, falling back to ``fallbacks[op]`` (the Triton
    kernels) or the reference. Returns whether the kernels can run."""
    FALLBACK.update(fallbacks)
    return torch.cuda.is_available() and status()[0]
