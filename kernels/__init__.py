"""Triton kernels (GPU), importable as ``pysparse.kernels``.

Kernels land here with the GPU issue; importing this package never requires Triton.
"""
