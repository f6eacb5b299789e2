import pytest
import torch
from torch import nn

import pysparse
from pysparse.formats import sparse24


def _mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 6), nn.Linear(6, 3))


def test_prune_24_magnitude():
    model = _mlp()
    dense = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    report = pysparse.prune(model, pattern="2:4")
    assert [r.status for r in report.layers] == ["pruned", "pruned", "skipped"]
    assert "multiple of 4" in report.layers[2].detail
    for m, w in zip([model[0], model[2]], dense):
        assert sparse24.is_24(m.weight)
        assert torch.equal(m.weight != 0, sparse24.mask_24(w))
        kept = m.weight != 0
        assert torch.equal(m.weight[kept], w[kept])  # kept weights untouched
    assert torch.equal(model[3].weight, dense[2])


@pytest.mark.parametrize("s", [0.0, 0.3, 0.9])
def test_prune_unstructured(s):
    model = _mlp()
    pysparse.prune(model, sparsity=s)
    for m in model:
        if isinstance(m, nn.Linear):
            zeros = float((m.weight == 0).float().mean())
            assert abs(zeros - s) <= 1.0 / m.weight.numel() + 1e-6


def test_prune_bad_sparsity():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pysparse.prune(_mlp(), sparsity=1.0)
    with pytest.raises(ValueError, match="pattern"):
        pysparse.prune(_mlp(), pattern="8:4")
