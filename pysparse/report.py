"""Model summaries and fidelity metrics (embeddings: mean cosine, nearest-neighbour recall@k)."""
from dataclasses import dataclass

import torch
from torch import nn

from .nn.linear import _PackedLinear, linear_weight
from .replace import is_linear


@dataclass
class LayerSummary:
    name: str
    scheme: str
    shape: tuple
    weight_bytes: int
    sparsity: float
    macs_per_token: int


def _dense_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


def summary(model: nn.Module) -> list:
    """Per linear layer: scheme ("fp32", "bf16", "w8a8", "2:4", ...), [out, in] shape, bytes of
    weights (+ scales, metadata, bias), fraction of zero weights, multiply-adds per token."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, _PackedLinear):
            w = m.dequantized_weight()
            rows.append(LayerSummary(name, m.scheme, (m.out_features, m.in_features),
                                     m.weight_bytes(), float((w == 0).float().mean()),
                                     m.out_features * m.in_features))
        elif is_linear(m):
            w = linear_weight(m)
            rows.append(LayerSummary(name, str(w.dtype).replace("torch.", "").replace(
                "float32", "fp32").replace("bfloat16", "bf16"), tuple(w.shape), _dense_bytes(m),
                float((w == 0).float().mean()), w.numel()))
    return rows


def linear_weight_bytes(model: nn.Module) -> int:
    return sum(r.weight_bytes for r in summary(model))


def cosine_fidelity(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean cosine similarity between rows of two [n, d] embedding matrices."""
    return float(torch.nn.functional.cosine_similarity(ref.float(), out.float(), dim=-1).mean())


def recall_at_k(ref: torch.Tensor, out: torch.Tensor, k: int = 10) -> float:
    """Nearest-neighbour agreement: for each row, the fraction of its k nearest neighbours
    (cosine, itself excluded) under ``ref`` that are also among its k nearest under ``out``."""
    n = ref.shape[0]
    if n <= k:
        raise ValueError(f"pysparse.recall_at_k: need more than k={k} embeddings, got {n}")

    def knn(e):
        e = torch.nn.functional.normalize(e.float(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(float("-inf"))
        return sim.topk(k, dim=-1).indices

    a, b = knn(ref), knn(out)
    hits = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().sum(-1)
    return float((hits / k).mean())
