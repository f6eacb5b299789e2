"""The group-wise int4 weight format of the "w4" scheme.

A weight ``w`` [N, K] is split along K (the reduction dim) into groups of ``group_size``
consecutive elements (K must be a multiple: no padding, the scheme skips such layers); each
(row, group) has an fp32 scale and, when asymmetric, an integer zero point:

* symmetric: codes ``q`` in [-7, 7], ``w ≈ q * scale``; stored as the nibble ``q + 8`` (1..15);
* asymmetric: codes ``q`` in [0, 15], ``w ≈ (q - zero) * scale``, ``zero`` uint8 [N, K/G] in
  [0, 15]; stored as the nibble ``q``.

Storage (``pack``): uint8 [N, K/2], byte ``k // 2`` of a row holds element ``k`` (even) in its
low nibble and element ``k + 1`` in its high nibble (low nibble = earlier element, as the 2:4
metadata). Scales fp32 [N, K/G]; zero points uint8 [N, K/G] (one byte each, unpacked: at
G = 128 they are 1/64 of the packed weight). Quantization follows ``quant.observers`` (round half
to even after a division by the scale; min-max or MSE-clipped ranges per group).
"""
import torch

from . import observers as _obs

DEFAULT_GROUP_SIZE = 128
SYM_OFFSET = 8  # nibble = q + 8 for symmetric codes in [-7, 7]


def check_group_size(group_size, K=None, who="w4"):
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 \
            or group_size % 2:
        raise ValueError(f"pysparse.{who}: group_size must be a positive even int, got "
                         f"{group_size!r}")
    if K is not None and K % group_size:
        raise ValueError(f"pysparse.{who}: in_features={K} is not a multiple of group_size="
                         f"{group_size}; int4 groups run along K and are not padded (choose a "
                         f"group_size dividing K, or exclude the layer)")


def pack(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] with values 0..15 (K even) -> uint8 [N, K/2], low nibble = even k."""
    if nibbles.dtype != torch.uint8 or nibbles.dim() != 2 or nibbles.shape[1] % 2:
        raise ValueError(f"pysparse.quant.int4.pack: expected uint8 [N, K] with K even, got "
                         f"{tuple(nibbles.shape)} {nibbles.dtype}")
    if nibbles.numel() and int(nibbles.max()) > 15:
        raise ValueError("pysparse.quant.int4.pack: values must be in [0, 15]")
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack: uint8 [N, K/2] -> uint8 [N, K]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"pysparse.quant.int4.unpack: expected uint8 [N, K/2], got "
                         f"{tuple(packed.shape)} {packed.dtype}")
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def quantize_weight(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE,
                    symmetric: bool = True, method: str = "minmax"):
    """float [N, K] -> (packed uint8 [N, K/2], scale fp32 [N, K/G], zero uint8 [N, K/G] or None).
    method: how each group's range is chosen, "minmax" or "mse" (quant.observers)."""
    if method not in ("minmax", "mse"):
        raise ValueError(f"pysparse.quant.int4.quantize_weight: method must be 'minmax' or "
                         f"'mse', got {method!r}")
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2 \
            or w.numel() == 0:
        raise ValueError("pysparse.quant.int4.quantize_weight: expected a non-empty float [N, K] "
                         "weight")
    check_group_size(group_size, w.shape[1], who="quant.int4.quantize_weight")
    wf = w.detach().float()
    scale, zp = _obs.qparams(wf, 4, "group", symmetric, method, group_size)
    q = _obs.quantize(wf, scale, zp, 4, "group", symmetric, group_size)
    nibbles = (q.to(torch.int16) + SYM_OFFSET) if symmetric else q.to(torch.int16)
    zero = None if symmetric else zp.to(torch.uint8).contiguous()
    return pack(nibbles.to(torch.uint8)), scale.contiguous(), zero


def quantize_weight_with(w: torch.Tensor, scale: torch.Tensor, zero=None,
                         group_size: int = DEFAULT_GROUP_SIZE):
    """Like quantize_weight, with given scales fp32 [N, K/G] (and zero points uint8, None for
    symmetric): the codes of GPTQ (quant.gptq), whose scales are not the min-max of ``w``."""
    check_group_size(group_size, w.shape[1], who="quant.int4.quantize_weight_with")
    symmetric = zero is None
    scale = scale.to(w.device).float()
    zp = None if symmetric else zero.to(w.device).to(torch.int32)
    q = _obs.quantize(w.detach().float(), scale, zp, 4, "group", symmetric, group_size)
    nibbles = (q.to(torch.int16) + SYM_OFFSET) if symmetric else q.to(torch.int16)
    return (pack(nibbles.to(torch.uint8)), scale.contiguous(),
            None if symmetric else zero.to(w.device).to(torch.uint8).contiguous())


def dequantize_weight(packed, scale, zero=None, group_size=DEFAULT_GROUP_SIZE,
                      dtype=torch.float32):
    """(packed, scale, zero) -> float [N, K] in ``dtype`` (computed in fp32)."""
    codes = unpack(packed).to(torch.int16)
    N, K = codes.shape
    if scale.shape != (N, K // group_size):
        raise ValueError(f"pysparse.quant.int4.dequantize_weight: scale must be [{N}, "
                         f"{K // group_size}], got {tuple(scale.shape)}")
    if zero is None:
        q = codes - SYM_OFFSET
    else:
        q = codes.reshape(N, K // group_size, group_size) - zero.to(torch.int16).unsqueeze(-1)
    w = q.reshape(N, K // group_size, group_size).float() * scale.float().unsqueeze(-1)
    return w.reshape(N, K).to(dtype)


__all__ = ["DEFAULT_GROUP_SIZE", "check_group_size", "pack", "unpack", "quantize_weight",
           "quantize_weight_with",
           "dequantize_weight"]
