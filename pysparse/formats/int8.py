"""Symmetric int8: per-output-channel weights and per-token activations.

``w ≈ q * scale[:, None]`` with ``q`` int8 in [-127, 127] (−128 is never produced, so negation
and the u8 shift used by VNNI kernels cannot overflow), zero-point 0, ``scale`` fp32.
The scale of an all-zero row is ``EPS / 127`` (not 0), so division is always defined.
"""
import torch

QMAX = 127
EPS = 1e-12  # floor on amax; the C++ kernels use the same constant


def symmetric_scale(amax: torch.Tensor) -> torch.Tensor:
    """fp32 scale from fp32 amax: max(amax, EPS) / 127 (same formula in every kernel)."""
    return amax.clamp_min(EPS) / QMAX


def quantize_rows(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round-half-to-even(x / scale) clamped to [-127, 127], per row of the last dim."""
    return torch.round(x.float() / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)


def _check_weight(w, who):
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"pysparse.{who}: expected a floating-point weight tensor, got "
                         f"{getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"pysparse.{who}: expected a non-empty 2-D weight [N, K], got "
                         f"{tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"pysparse.{who}: weight contains NaN or Inf")


def quantize_weight(w: torch.Tensor):
    """float [N, K] -> (q int8 [N, K], scale fp32 [N]), symmetric per output channel."""
    _check_weight(w, "formats.int8.quantize_weight")
    wf = w.detach().float()
    scale = symmetric_scale(wf.abs().amax(dim=1))
    return quantize_rows(wf, scale).contiguous(), scale.contiguous()


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32):
    if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
        raise ValueError("pysparse.formats.int8.dequantize_weight: expected q int8 [N, K] and "
                         f"scale [N], got {tuple(q.shape)} {q.dtype} and {tuple(scale.shape)}")
    return (q.float() * scale.float()[:, None]).to(dtype)


# ----------------------------------------------------------------------------- CPU packing
# "vnni16": the layout the CPU kernels stream. Kp = ceil(K/4)*4, Np = ceil(N/16)*16;
# packed int8 [Np/16, Kp/4, 64] with packed[nb, kg, 4*j + t] = q[16*nb + j, 4*kg + t] (zero
# padded). One 64-byte line = 16 output channels x 4 consecutive k: exactly one zmm operand of
# vpdpbusd, so a 16-channel panel is a contiguous stream along K. colsum int32 [Np] holds
# sum_k q[n, k]; the kernels feed activations as u8 = q_x + 128 and subtract 128 * colsum.
VNNI_N, VNNI_K = 16, 4


def pack_vnni16(q: torch.Tensor):
    """int8 [N, K] -> (packed int8 [Np/16, Kp/4, 64], colsum int32 [Np])."""
    if q.dtype != torch.int8 or q.dim() != 2 or q.numel() == 0:
        raise ValueError("pysparse.formats.int8.pack_vnni16: expected a non-empty int8 [N, K] "
                         f"weight, got {tuple(q.shape)} {q.dtype}")
    N, K = q.shape
    Np, Kp = -(-N // VNNI_N) * VNNI_N, -(-K // VNNI_K) * VNNI_K
    padded = torch.nn.functional.pad(q, (0, Kp - K, 0, Np - N))
    packed = (padded.reshape(Np // VNNI_N, VNNI_N, Kp // VNNI_K, VNNI_K)
              .permute(0, 2, 1, 3).reshape(Np // VNNI_N, Kp // VNNI_K, VNNI_N * VNNI_K))
    colsum = padded.sum(dim=1, dtype=torch.int32)
    return packed.contiguous(), colsum.contiguous()


def unpack_vnni16(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of pack_vnni16: int8 [N, K]."""
    Np, Kp = -(-N // VNNI_N) * VNNI_N, -(-K // VNNI_K) * VNNI_K
    if packed.dtype != torch.int8 or packed.numel() != Np * Kp:
        raise ValueError(f"pysparse.formats.int8.unpack_vnni16: expected {Np * Kp} int8 values "
                         f"for N={N}, K={K}, got {packed.numel()} {packed.dtype}")
    return (packed.reshape(Np // VNNI_N, Kp // VNNI_K, VNNI_N, VNNI_K).permute(0, 2, 1, 3)
            .reshape(Np, Kp)[:N, :K].contiguous())
