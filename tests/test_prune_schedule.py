"""Pruning schedules: cubic sparsity, mask enforcement through optimizer steps, gradual
magnitude pruning, the L1 penalty."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pysparse.nn.linear import linear_weight
from pysparse.prune import masks
from pysparse.prune.schedule import GradualPruner, MaskEnforcer, cubic_sparsity, l1_penalty


class Net(nn.Module):
    """An nn.Linear, a transformers Conv1D ([in, out] stored) and an lm_head."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 24)
        self.conv = Conv1D(8, 24)  # 24 -> 8
        self.lm_head = nn.Linear(8, 5)

    def forward(self, x):
        return self.lm_head(torch.relu(self.conv(torch.relu(self.fc(x)))))


def zero_half(model):
    with torch.no_grad():
        for m in (model.fc, model.conv):
            m.weight.mul_((torch.rand_like(m.weight) > 0.5).float())


def train(model, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(torch.randn(4, 16)) * torch.randn(4, 5)).sum()
        loss.backward()
        opt.step()


# --------------------------------------------------------------------------------- cubic


def test_cubic_known_values():
    # s_t = 0.8 + (0 - 0.8) * (1 - (t - 0) / 100)^3
    assert cubic_sparsity(0, 0.8, 0, 100) == 0.0
    assert cubic_sparsity(25, 0.8, 0, 100) == pytest.approx(0.8 - 0.8 * 0.75 ** 3)  # 0.4625
    assert cubic_sparsity(50, 0.8, 0, 100) == pytest.approx(0.7)
    assert cubic_sparsity(100, 0.8, 0, 100) == pytest.approx(0.8)
    # with s_i = 0.2 and t0 = 100: 0.9 + (0.2 - 0.9) * 0.5^3 = 0.8125
    assert cubic_sparsity(150, 0.9, 100, 200, initial_sparsity=0.2) == pytest.approx(0.8125)
    # clamped outside [begin, end]
    assert cubic_sparsity(10, 0.9, 100, 200, initial_sparsity=0.2) == pytest.approx(0.2)
    assert cubic_sparsity(10_000, 0.9, 100, 200) == pytest.approx(0.9)


def test_cubic_monotone_and_frequency():
    values = [cubic_sparsity(t, 0.75, 10, 90, frequency=20) for t in range(0, 101)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    # updated only at begin + k * frequency: steps 30..49 all hold the step-30 value
    assert len({values[t] for t in range(30, 50)}) == 1
    assert values[29] < values[30] and values[49] < values[50]
    assert values[57] == pytest.approx(cubic_sparsity(50, 0.75, 10, 90))
    assert values[89] == pytest.approx(cubic_sparsity(70, 0.75, 10, 90)) and values[90] == 0.75


@pytest.mark.parametrize("args", [(5, 1.0, 0, 10), (5, 0.5, 10, 10), (5, 0.5, 0, 10, 0.6),
                                  (5, 0.5, 0, 10, 0.0, 0)])
def test_cubic_rejects_bad_schedules(args):
    with pytest.raises(ValueError):
        cubic_sparsity(*args)


# --------------------------------------------------------------------------------- enforcer


@pytest.mark.parametrize("opt_cls", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda p: torch.optim.Adam(p, lr=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
])
def test_masked_weights_stay_zero_through_optimizer_steps(opt_cls):
    model = Net()
    zero_half(model)
    enforcer = MaskEnforcer(model)
    assert enforcer.names == ["fc", "conv"]  # lm_head excluded by default
    zeros = {n: linear_weight(enforcer.module(n)) == 0 for n in enforcer.names}
    before = {n: linear_weight(enforcer.module(n)).clone() for n in enforcer.names}
    opt = opt_cls(model.parameters())
    enforcer.attach(opt)
    train(model, opt, 5)
    for n in enforcer.names:
        w = linear_weight(enforcer.module(n))
        assert torch.equal(w[zeros[n]], torch.zeros_like(w[zeros[n]]))
        assert not torch.equal(w[~zeros[n]], before[n][~zeros[n]])  # the rest trains
        assert torch.equal(enforcer.mask(n), ~zeros[n])
    assert 0.4 < enforcer.sparsity() < 0.6


def test_gradient_hook_and_remove():
    model = Net()
    zero_half(model)
    enforcer = MaskEnforcer(model, include=["fc"])
    assert enforcer.names == ["fc"]
    model(torch.randn(3, 16)).sum().backward()
    assert torch.all(model.fc.weight.grad[model.fc.weight == 0] == 0)
    enforcer.remove()
    model.zero_grad()
    model(torch.randn(3, 16)).sum().backward()
    assert model.fc.weight.grad[model.fc.weight == 0].abs().sum() > 0


def test_given_masks_and_conv1d_orientation():
    model = Net()
    keep = torch.rand(8, 24) > 0.5  # [out, in] for the Conv1D (stored [24, 8])
    with MaskEnforcer(model, masks={"conv": keep}) as enforcer:
        assert enforcer.names == ["conv"]
        enforcer.apply()
        assert torch.equal(linear_weight(model.conv) != 0, keep)
    with pytest.raises(ValueError, match="shape"):
        MaskEnforcer(model, masks={"conv": keep.t()})
    with pytest.raises(ValueError, match="not selected"):
        MaskEnforcer(model, masks={"lm_head": torch.ones(5, 8, dtype=torch.bool)})


def test_mask_callback_reapplies():
    from transformers import TrainerCallback

    from pysparse.prune.schedule import MaskCallback
    model = Net()
    zero_half(model)
    enforcer = MaskEnforcer(model)
    cb = MaskCallback(enforcer)
    assert isinstance(cb, TrainerCallback)
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    cb.on_optimizer_step(None, SimpleNamespace(global_step=1), None)
    assert torch.equal(model.fc.weight != 0, enforcer.mask("fc"))


# --------------------------------------------------------------------------------- gradual


def layer_sparsity(module):
    w = linear_weight(module)
    return int((w == 0).sum()), w.numel()


def test_gradual_pruner_reaches_final_and_masks_persist():
    model = Net()
    pruner = GradualPruner(model, 0.75, begin_step=2, end_step=10, frequency=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    pruner.attach(opt)
    seen = []
    for t in range(12):
        s = pruner.step(t)
        for m in (model.fc, model.conv):
            zeros, n = layer_sparsity(m)
            assert zeros >= round(pruner.scheduled(t) * n)
        seen.append(s)
        train(model, opt, 1)
    assert seen[0] == seen[1] == 0.0 and seen[2] == 0.0  # s(begin) = initial = 0
    assert all(a <= b for a, b in zip(seen, seen[1:]))
    assert seen[-1] == pytest.approx(0.75)
    masks_at_end = {n: pruner.enforcer.mask(n).clone() for n in pruner.enforcer.names}
    train(model, opt, 5)
    for m, name in ((model.fc, "fc"), (model.conv, "conv")):
        zeros, n = layer_sparsity(m)
        assert zeros == round(0.75 * n)
        assert torch.equal(linear_weight(m) != 0, masks_at_end[name])
    assert model.lm_head.weight.ne(0).all()


def test_gradual_pruner_nm_is_dense_until_end():
    model = Net()
    pruner = GradualPruner(model, None, begin_step=0, end_step=4, pattern="2:4")
    assert pruner.final_sparsity == 0.5
    for t in range(4):
        pruner.step()
        assert linear_weight(model.fc).ne(0).all()
    pruner.step()  # step 4 = end_step
    for m in (model.fc, model.conv):
        assert masks.is_nm(linear_weight(m), 2, 4)
        assert layer_sparsity(m)[0] == layer_sparsity(m)[1] // 2


def test_gradual_pruning_callback_steps_with_global_step():
    model = Net()
    pruner = GradualPruner(model, 0.5, begin_step=0, end_step=2)
    cb = pruner.callback()
    cb.on_train_begin(None, SimpleNamespace(global_step=0), None)
    cb.on_step_end(None, SimpleNamespace(global_step=2), None)
    assert pruner.sparsity == 0.5
    assert layer_sparsity(model.fc)[0] == layer_sparsity(model.fc)[1] // 2


def test_gradual_pruner_argument_errors():
    with pytest.raises(ValueError, match="2:4"):
        GradualPruner(Net(), 0.75, 0, 10, pattern="2:4")
    with pytest.raises(ValueError, match="pattern"):
        GradualPruner(Net(), 0.5, 0, 10, pattern="4:2")
    with pytest.raises(ValueError, match="magnitude"):
        GradualPruner(Net(), 0.5, 0, 10, method="wanda")
    with pytest.raises(ValueError, match="begin_step"):
        GradualPruner(Net(), 0.5, 10, 5)


# --------------------------------------------------------------------------------- L1


def test_l1_penalty_value_and_gradient():
    model = Net()
    pen = l1_penalty(model, weight=0.5)
    assert pen.item() == pytest.approx(
        0.5 * float(model.fc.weight.detach().abs().sum() + model.conv.weight.detach().abs().sum()),
        rel=1e-6)
    pen.backward()
    assert torch.equal(model.fc.weight.grad, 0.5 * model.fc.weight.sign())
    assert torch.equal(model.conv.weight.grad, 0.5 * model.conv.weight.sign())
    assert model.lm_head.weight.grad is None
    assert l1_penalty(model, include=["nothing"]).item() == 0.0
