"""Weight formats: int8 (symmetric, per channel / per token) and canonical 2:4 (values + meta)."""
from . import int8, sparse24

__all__ = ["int8", "sparse24"]
