"""Triton kernels (GPU), importable as ``pysparse.kernels``.

Importing this package never requires Triton; its modules do:

* ``attention``: flash-attention forward, the CUDA kernel of ``pysparse::attention``
  (registered by ``pysparse/ops/backends/triton.py``).
"""
