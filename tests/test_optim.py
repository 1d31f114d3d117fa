"""Optimizer parameter groups, the optimizer factory, and the warm-up + cosine learning-rate factor."""
from __future__ import annotations

import math

import pytest
import torch
from lightly.utils.lars import LARS
from torch import nn

from ssl_lightning import SSLError
from ssl_lightning.heads import mlp
from ssl_lightning.optim import OPTIMIZERS, build_optimizer, param_groups, warmup_cosine


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3), nn.GroupNorm(2, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        mlp([8, 16, 4]), nn.LayerNorm(4),
    )


def _ids(ps) -> set[int]:
    return {id(p) for p in ps}


def test_param_groups_split_by_ndim_with_identity():
    model = _model()
    frozen = model[0].weight
    model[3].bias.requires_grad_(False)  # a frozen bias is left out entirely
    groups = param_groups(model.parameters(), 1e-4, foo="bar")
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert decay["foo"] == "bar" and no_decay["foo"] == "bar"  # extra options go to every group

    expected_decay = [model[0].weight, model[3].weight, model[7][0].weight, model[7][3].weight]
    expected_no_decay = [model[1].weight, model[1].bias, model[4].weight, model[4].bias,
                         model[7][1].weight, model[7][1].bias, model[7][3].bias, model[8].weight, model[8].bias]
    assert _ids(decay["params"]) == _ids(expected_decay)
    assert _ids(no_decay["params"]) == _ids(expected_no_decay)
    assert len(decay["params"]) == len(expected_decay) and len(no_decay["params"]) == len(expected_no_decay)
    assert frozen in decay["params"]
    assert id(model[3].bias) not in _ids(decay["params"]) | _ids(no_decay["params"])
    # every trainable parameter is in exactly one group
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(_ids(decay["params"]) | _ids(no_decay["params"])) == sorted(_ids(trainable))
    assert not (_ids(decay["params"]) & _ids(no_decay["params"]))
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])


def test_param_groups_drops_empty_groups():
    lin = nn.Linear(3, 2, bias=False)
    groups = param_groups(lin.parameters(), 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1
    groups = param_groups(nn.BatchNorm1d(3).parameters(), 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("lars", LARS), ("adamw", torch.optim.AdamW),
                                      ("SGD", torch.optim.SGD), ("AdamW", torch.optim.AdamW)])
def test_build_optimizer_classes(name, cls):
    model = _model()
    opt = build_optimizer(name, param_groups(model.parameters(), 1e-4), lr=0.05, momentum=0.8, betas=(0.8, 0.9))
    assert type(opt) is cls
    assert len(opt.param_groups) == 2
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert all(g["lr"] == 0.05 for g in opt.param_groups)
    if cls is torch.optim.AdamW:
        assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    else:
        assert opt.param_groups[0]["momentum"] == 0.8


def test_build_optimizer_group_lr_overrides_default():
    model = _model()
    groups = param_groups(model.parameters(), 1e-4)
    groups[1]["lr"] = 0.5
    opt = build_optimizer("sgd", groups, lr=0.05)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.5]


def test_build_optimizer_unknown_name():
    with pytest.raises(SSLError) as err:
        build_optimizer("adam", param_groups(_model().parameters(), 0.0), lr=0.1)
    msg = str(err.value)
    assert "adam" in msg
    for choice in OPTIMIZERS:
        assert choice in msg
    assert set(OPTIMIZERS) == {"sgd", "lars", "adamw"}
    assert isinstance(err.value, ValueError)  # SSLError is a ValueError


def test_lars_zero_weight_decay_group_is_plain_sgd():
    """The no-decay group skips LARS's trust ratio (the reason for the split in SimCLR / BYOL)."""
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    models = [nn.Linear(4, 3) for _ in range(3)]
    for m in models:
        m.load_state_dict(models[0].state_dict())
        m.weight.requires_grad_(False)  # train the bias only
    groups = param_groups(models[0].parameters(), 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    opts = [build_optimizer("lars", groups, lr=0.2, momentum=0.9),
            torch.optim.SGD([models[1].bias], lr=0.2, momentum=0.9),
            build_optimizer("lars", [{"params": [models[2].bias], "weight_decay": 0.1}], lr=0.2, momentum=0.9)]
    for _ in range(3):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(models[0].bias, models[1].bias, atol=1e-7, rtol=1e-6)
    assert not torch.allclose(models[0].bias, models[2].bias)  # a decayed group gets the trust ratio


# ---- warmup_cosine ---------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup,total,final", [(10, 100, 0.0), (5, 50, 0.01), (1, 20, 0.1), (0, 40, 0.0)])
def test_warmup_cosine_values(warmup, total, final):
    for step in range(warmup):
        assert warmup_cosine(step, warmup, total, final) == pytest.approx((step + 1) / warmup)
    if warmup:
        assert warmup_cosine(warmup - 1, warmup, total, final) == pytest.approx(1.0)  # last warm-up step
    assert warmup_cosine(warmup, warmup, total, final) == pytest.approx(1.0)  # start of the cosine
    assert warmup_cosine(total, warmup, total, final) == pytest.approx(final, abs=1e-12)
    assert warmup_cosine(total + 10, warmup, total, final) == pytest.approx(final, abs=1e-12)
    mid = warmup + (total - warmup) / 2
    assert warmup_cosine(mid, warmup, total, final) == pytest.approx(final + (1 - final) / 2)
    for step in range(warmup, total + 1):
        progress = (step - warmup) / (total - warmup)
        ref = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
        assert warmup_cosine(step, warmup, total, final) == pytest.approx(ref, abs=1e-12)
    values = [warmup_cosine(s, warmup, total, final) for s in range(total + 1)]
    peak = max(warmup - 1, 0)
    assert all(b >= a for a, b in zip(values[:peak + 1], values[1:peak + 1]))  # rising warm-up
    assert all(b <= a for a, b in zip(values[peak:], values[peak + 1:]))  # then non-increasing
    assert all(0 < v <= 1 + 1e-12 for v in values) or final == 0.0


def test_warmup_cosine_degenerate_total():
    assert warmup_cosine(3, 10, 5) == pytest.approx(0.4)  # still warming up
    assert warmup_cosine(12, 10, 5) == 1.0  # total <= warmup: constant after warm-up
