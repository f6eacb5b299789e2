"""Argument checks shared by every backend: one place, op-prefixed messages.

Errors are ValueError (bad values/shapes/dtypes) or TypeError (not a tensor), never a crash in a
kernel. ``x`` may have any strides (it is made contiguous); packed weights must be contiguous.
"""
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fail(op, msg):
    raise ValueError(f"pysparse.{op}: {msg}")


def tensor(op, name, t, dtypes=None, ndim=None, device=None, contiguous=False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pysparse.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        _fail(op, f"{name} must have dtype {want}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        _fail(op, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        _fail(op, f"{name} is on {t.device} but x is on {device}; move all arguments to one device")
    if contiguous and not t.is_contiguous():
        _fail(op, f"{name} must be contiguous (call .contiguous() when packing weights)")


def activation(op, x, K):
    tensor(op, "x", x, FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] != K:
        _fail(op, f"x must have shape [..., {K}] to match the weight, got {tuple(x.shape)}")


def bias(op, b, N, device):
    if b is None:
        return
    tensor(op, "bias", b, FLOAT_DTYPES, ndim=1, device=device)
    if b.shape[0] != N:
        _fail(op, f"bias must have shape [{N}], got {tuple(b.shape)}")


def int8_weight(op, w_q, w_scale, device):
    tensor(op, "w_q", w_q, (torch.int8,), ndim=2, device=device, contiguous=True)
    N, K = w_q.shape
    if K < 1 or N < 1:
        _fail(op, f"w_q must be non-empty, got shape {tuple(w_q.shape)}")
    tensor(op, "w_scale", w_scale, FLOAT_DTYPES, ndim=1, device=device)
    if w_scale.shape[0] != N:
        _fail(op, f"w_scale must have shape [{N}] (one scale per output channel), "
                  f"got {tuple(w_scale.shape)}")
    return N, K


def packed_int8_weight(op, x, w_packed, w_colsum, w_scale):
    """Sizes of a vnni16-packed weight: N from w_scale, K from x; buffers must match exactly."""
    tensor(op, "w_scale", w_scale, FLOAT_DTYPES, ndim=1, device=x.device)
    tensor(op, "w_packed", w_packed, (torch.int8,), device=x.device, contiguous=True)
    tensor(op, "w_colsum", w_colsum, (torch.int32,), ndim=1, device=x.device, contiguous=True)
    N, K = w_scale.shape[0], (x.shape[-1] if x.dim() else 0)
    if N < 1 or K < 1:
        _fail(op, f"need N >= 1 (w_scale) and K >= 1 (x's last dim), got N={N}, K={K}")
    Np, Kp = -(-N // 16) * 16, -(-K // 4) * 4
    if w_packed.numel() != Np * Kp or w_colsum.shape[0] != Np:
        _fail(op, f"w_packed must hold {Np}x{Kp} int8 and w_colsum {Np} int32 for N={N}, K={K} "
                  f"(x [..., {K}]); got {w_packed.numel()} and {w_colsum.shape[0]}")
    return N, K


def sparse24_weight(op, values, meta, device, value_dtypes):
    tensor(op, "values", values, value_dtypes, ndim=2, device=device, contiguous=True)
    tensor(op, "meta", meta, (torch.uint8,), ndim=2, device=device, contiguous=True)
    N, half = values.shape
    K = 2 * half
    if N < 1 or K < 4 or K % 4:
        _fail(op, f"values must be [N, K/2] with K a positive multiple of 4, got {tuple(values.shape)}")
    if tuple(meta.shape) != (N, (K + 7) // 8):
        _fail(op, f"meta must have shape [{N}, {(K + 7) // 8}] for values {tuple(values.shape)}, "
                  f"got {tuple(meta.shape)}")
    return N, K


def packed_sparse24_weight(op, x, w_values, w_codes, N, int8):
    """Sizes of an sp24i8 (int8) / sp24f (float) packed weight (formats.sparse24.pack_cpu_*):
    N given, K from x; the buffers must match exactly."""
    K = x.shape[-1] if x.dim() else 0
    if N < 1 or K < 4 or K % 4:
        _fail(op, f"need N >= 1 and K (x's last dim) a positive multiple of 4, got N={N}, K={K}")
    NB = -(-N // 16)
    if int8:
        tensor(op, "w_values", w_values, (torch.int8,), device=x.device, contiguous=True)
        tensor(op, "w_codes", w_codes, (torch.uint8,), device=x.device, contiguous=True)
        KB = -(-K // 8)
        want_v, want_c = NB * KB * 64, NB * KB * 16
    else:
        tensor(op, "w_values", w_values, (torch.float32, torch.bfloat16), device=x.device,
               contiguous=True)
        tensor(op, "w_codes", w_codes, (torch.int64,), device=x.device, contiguous=True)
        want_v, want_c = NB * (K // 4) * 32, NB * (K // 4)
    if w_values.numel() != want_v or w_codes.numel() != want_c:
        _fail(op, f"w_values must hold {want_v} and w_codes {want_c} elements for N={N}, K={K} "
                  f"(x [..., {K}]); got {w_values.numel()} and {w_codes.numel()}")
    return N, K


def sparse_finite(op, x, K):
    """2:4 float ops refuse NaN/Inf activations (the CPU kernel never multiplies the activations
    that meet pruned weights, so 0 * Inf = NaN would not appear; refusing keeps every backend
    equal)."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        row = int((~torch.isfinite(x.reshape(-1, K)).all(dim=1)).nonzero()[0])
        _fail(op, f"x contains NaN or Inf (first at token row {row}); a 2:4 kernel never "
                  "multiplies the activations that meet pruned weights, so non-finite activations "
                  "are refused instead of giving a result that differs from the dense product")


def finite_rows(op, amax):
    """amax: per-row max |x|; NaN/Inf anywhere in a row makes it non-finite."""
    bad = ~torch.isfinite(amax)
    if bool(bad.any()):
        row = int(bad.reshape(-1).nonzero()[0])
        _fail(op, f"x contains NaN or Inf (first at token row {row}); int8 quantization of "
                  "non-finite activations is undefined")


def attention(q, k, v, mask=None):
    """Shapes of an attention call, (B, Hq, Hkv, Sq, Sk, D); the canonical errors of every backend."""
    op = "attention"
    tensor(op, "q", q, FLOAT_DTYPES, ndim=4)
    tensor(op, "k", k, (q.dtype,), ndim=4, device=q.device)
    tensor(op, "v", v, (q.dtype,), ndim=4, device=q.device)
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        _fail(op, f"k and v must be [B={B}, Hkv, Sk, D={D}] and equal, got {tuple(k.shape)} and "
                  f"{tuple(v.shape)}")
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hkv < 1 or Hq % Hkv:
        _fail(op, f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if mask is not None:
        tensor(op, "mask", mask, (torch.bool,) + FLOAT_DTYPES, device=q.device)
        full = (B, Hq, Sq, Sk)  # plain loop: torch.broadcast_shapes costs ~100 us per call
        if mask.dim() > 4 or any(m != 1 and m != f for m, f in zip(reversed(mask.shape), reversed(full))):
            _fail(op, f"mask of shape {tuple(mask.shape)} does not broadcast to [B, Hq, Sq, Sk] = "
                      f"{list(full)}")
    return B, Hq, Hkv, Sq, Sk, D
