"""Backbone registry, heads and the multi-crop-aware forward of SSLMethod."""
from __future__ import annotations

import pytest
import torch

from ssl_lightning.backbones import BACKBONES, build_backbone
from ssl_lightning.heads import mlp
from ssl_lightning.methods import SimCLR


@pytest.mark.parametrize("name,kwargs,size,width", [
    ("convnet", {"in_channels": 1}, 28, 256),
    ("convnet", {"width": 8, "norm": "group"}, 32, 64),
    ("resnet18", {"cifar_stem": True}, 32, 512),
    ("resnet18", {"in_channels": 1}, 64, 512),
    ("resnet50", {}, 64, 2048),
])
def test_backbones_give_pooled_features(name, kwargs, size, width):
    model = build_backbone(name, **kwargs).eval()
    assert model.num_features == width
    x = torch.randn(2, kwargs.get("in_channels", 3), size, size)
    assert model(x).shape == (2, width)


def test_cifar_stem_keeps_resolution_and_torchvision_keys():
    plain, cifar = build_backbone("resnet18"), build_backbone("resnet18", cifar_stem=True)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    assert set(plain.state_dict()) == set(cifar.state_dict())  # exports as a plain torchvision ResNet
    assert "fc.weight" not in cifar.state_dict()


def test_vit_from_timm():
    pytest.importorskip("timm")
    model = build_backbone("vit_tiny", img_size=32, patch_size=8).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features) == (2, 192)


def test_registry_names():
    assert {"convnet", "resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small", "vit_base"} <= set(BACKBONES.names())


def test_mlp_layout():
    head = mlp([8, 16, 4])
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head[0].bias is None and head[-1].bias is not None  # BN makes the hidden bias redundant
    last = mlp([8, 16, 4], last_norm=True, last_affine=False)
    assert isinstance(last[-1], torch.nn.BatchNorm1d) and not last[-1].affine and last[-2].bias is None
    assert [type(m).__name__ for m in mlp([8, 4])] == ["Linear"]
    assert [type(m).__name__ for m in mlp([8, 16, 4], norm="none")] == ["Linear", "ReLU", "Linear"]
    scale_only = mlp([8, 16, 4], last_norm=True, last_center=False)[-1]  # SimCLR's official head: center=False
    assert scale_only.weight.requires_grad and not scale_only.bias.requires_grad


def test_mlp_scale_only_norm_keeps_its_shift_at_zero():
    head = mlp([8, 16, 4], last_norm=True, last_center=False)
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.5, weight_decay=0.1)
    before = head[-1].weight.detach().clone()
    for _ in range(3):
        head(torch.randn(32, 8)).pow(3).sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(head[-1].bias, torch.zeros(4)) and not torch.equal(head[-1].weight, before)


@pytest.mark.parametrize("concat", [True, False])
def test_multicrop_forward_groups_views_by_shape(concat, monkeypatch):
    torch.manual_seed(0)
    model = SimCLR(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=3, num_classes=0).eval()
    monkeypatch.setattr(model, "concat_views", concat)
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(3)]
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    feats = model.forward_views(views)
    assert len(feats) == 5 and all(f.shape == (4, 64) for f in feats)
    expected = [(8, 3, 32, 32), (12, 3, 16, 16)] if concat else [v.shape for v in views]
    assert [tuple(c) for c in calls] == [tuple(e) for e in expected]
    with torch.no_grad():
        for f, v in zip(feats, views):  # in eval mode, batching the views changes nothing
            torch.testing.assert_close(f, model.backbone(v), atol=1e-5, rtol=1e-5)
