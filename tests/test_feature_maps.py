"""Feature-map access: every stage's shape matches its description, the last map pools to ``forward``."""
import pytest
import torch
from torch import nn

from ssl_lightning.backbones import build_backbone
from ssl_lightning.backbones.feature_maps import feature_maps, forward_features, pool, stage, stages
from ssl_lightning.registry import SSLError

CASES = [("convnet", {"in_channels": 1, "width": 8}, 1, 28),
         ("resnet18", {"in_channels": 3, "cifar_stem": True}, 3, 32),
         ("resnet18", {"in_channels": 3}, 3, 64),
         ("resnet50", {"in_channels": 1}, 1, 64)]


@pytest.mark.parametrize("name,kwargs,channels,size", CASES)
def test_stages_shapes_and_pooled_forward(name, kwargs, channels, size):
    torch.manual_seed(0)
    net = build_backbone(name, **kwargs).eval()
    x = torch.randn(2, channels, size, size)
    maps = feature_maps(net, x)
    described = stages(net)
    assert list(maps) == [s.name for s in described]
    for s in described:
        expected_hw = -(-size // s.stride)  # ceil: ConvNet's 2x2 pools floor odd sizes (28 -> 14 -> 7 -> 3)
        assert maps[s.name].shape[:2] == (2, s.channels), s
        assert abs(maps[s.name].shape[-1] - expected_hw) <= 1, (s, maps[s.name].shape)
    assert described[-1].channels == net.num_features
    torch.testing.assert_close(pool(forward_features(net, x)), net(x), rtol=0, atol=1e-6)
    assert stage(net) == described[-1]


def test_upto_stops_early_and_a_named_stage_is_returned():
    net = build_backbone("convnet", in_channels=1, width=8)
    x = torch.randn(2, 1, 28, 28)
    maps = feature_maps(net, x, upto="block2")
    assert list(maps) == ["block1", "block2"]
    assert forward_features(net, x, stage="block2").shape == (2, 16, 14, 14)
    with pytest.raises(SSLError, match="no stage 'layer9'.*block1"):
        forward_features(net, x, stage="layer9")
    with pytest.raises(SSLError, match="no stage 'layer9'"):
        stage(net, "layer9")


def test_gradients_reach_the_first_layer_and_the_state_dict_is_untouched():
    net = build_backbone("resnet18", in_channels=3, cifar_stem=True)
    keys = list(net.state_dict())
    forward_features(net, torch.randn(2, 3, 16, 16), stage="layer2").sum().backward()
    assert net.conv1.weight.grad is not None and net.conv1.weight.grad.abs().sum() > 0
    assert net.layer4[0].conv1.weight.grad is None  # stopped at layer2: the later stages never ran
    assert list(net.state_dict()) == keys


def test_other_backbones_get_a_clear_error():
    with pytest.raises(SSLError, match="no feature-map access.*convnet"):
        feature_maps(nn.Linear(3, 3), torch.randn(2, 3))
    with pytest.raises(SSLError, match="no feature-map access"):
        stages(nn.Linear(3, 3))
