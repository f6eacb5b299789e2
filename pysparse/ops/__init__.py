"""pysparse ops: schemas (library), references (the definition), per-device backends.

Importing this package defines the ops under ``torch.ops.pysparse`` and registers the backends.
"""
import torch

from . import library, reference
from .backends import register_all as _register_all

_register_all()

quantize_per_token = torch.ops.pysparse.quantize_per_token
int8_linear = torch.ops.pysparse.int8_linear
int8_linear_packed = torch.ops.pysparse.int8_linear_packed
sparse24_linear = torch.ops.pysparse.sparse24_linear
sparse24_int8_linear = torch.ops.pysparse.sparse24_int8_linear
attention = torch.ops.pysparse.attention

__all__ = ["library", "reference", "quantize_per_token", "int8_linear", "int8_linear_packed",
           "sparse24_linear", "sparse24_int8_linear", "attention"]
