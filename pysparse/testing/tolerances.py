"""Named tolerances, one place. Tests and benchmarks import these; no magic numbers elsewhere.

* Float paths: within 2x PyTorch's own same-dtype error vs an fp32/fp64 reference (the
  flash-attention habit); expressed here as per-dtype rtol/atol for matmul-like ops.
* Quantized paths: integer accumulation is exact (compare int32 with ==); the fp32 epilogue of a
  kernel may differ from the reference by a few ulps (fma contraction, order of the two scale
  multiplies), and a bf16 output by one bf16 rounding.
* Model fidelity: SQNR floors (dB) and embedding cosine floors.
"""
import torch

# epilogue of quantized kernels vs reference (same int32 accumulator)
QUANT_EPILOGUE = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2 ** -7, atol=1e-5),  # one bf16 ulp of a re-rounded value
    torch.float16: dict(rtol=2 ** -10, atol=1e-5),
}

# float matmul paths computed in the input dtype vs an fp32 reference
FLOAT_MATMUL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}

# W8A8 vs the float layer it replaces: symmetric int8 on both sides of a random matmul
W8A8_SQNR_DB = 30.0
# whole-model fidelity floors (issue targets)
W8A8_MINILM_COSINE = 0.99
W8A8_MINILM_RECALL10 = 0.85


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's compute_error)."""
    ref, out = ref.double(), out.double()
    noise = (ref - out).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(ref.norm() / noise))

# fused attention (flash-attention habit): max |error| vs the fp32 reference at most this many
# times PyTorch's own same-dtype scaled_dot_product_attention error, plus a floor per dtype
# (for cases where torch happens to be almost exact, e.g. a single key)
ATTENTION_VS_SDPA = 2.0
ATTENTION_FLOOR = {torch.float32: 3e-6, torch.bfloat16: 2 ** -9, torch.float16: 2 ** -12}
