"""Triton kernels (GPU), importable as ``pysparse.kernels``.

Importing this package never requires Triton; its modules do:

* ``attention``: flash-attention forward, the CUDA kernel of ``pysparse::attention``
  (registered by ``pysparse/ops/backends/triton.py``).
* ``int8_linear``: per-token int8 quantization and the W8A8 GEMM (int32 tensor-core
  accumulation, fp32 scale epilogue), the CUDA kernels of ``pysparse::quantize_per_token``
  and ``pysparse::int8_linear``.
* ``sparse24``: 2:4 sparse linear, float and W8A8 (the compressed weight expanded to a dense
  tile in registers, then a dense tensor-core product), the CUDA kernels of
  ``pysparse::sparse24_linear`` and ``pysparse::sparse24_int8_linear``.
"""
