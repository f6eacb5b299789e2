"""pysparse modules: packed replacements for linear layers."""
from .linear import SCHEMES, Int8Linear, Sparse24Int8Linear, Sparse24Linear, linear_weight

__all__ = ["SCHEMES", "Int8Linear", "Sparse24Int8Linear", "Sparse24Linear", "linear_weight"]
