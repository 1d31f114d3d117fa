"""The online linear probe: ignores unlabelled rows and never changes the pretraining gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.methods import SimCLR
from ssl_lightning.modules.probe import OnlineLinearProbe


def test_probe_ignores_unlabelled_rows():
    torch.manual_seed(0)
    probe = OnlineLinearProbe(6, 4)
    feats = torch.randn(10, 6)
    labels = torch.tensor([0, -1, 3, 2, -1, -1, 1, 0, -1, 2])
    loss = probe.training_loss(feats, labels)
    keep = labels >= 0
    expected = F.cross_entropy(probe.linear(feats[keep]), labels[keep])
    torch.testing.assert_close(loss, expected)
    # the unlabelled rows have no influence at all: changing their features changes nothing
    feats2 = feats.clone()
    feats2[~keep] = torch.randn(int((~keep).sum()), 6) * 100
    torch.testing.assert_close(probe.training_loss(feats2, labels), expected)
    # accuracy counts labelled rows only
    probe.train_top1.reset()
    probe.training_loss(feats, labels)
    acc = (probe.linear(feats[keep]).argmax(1) == labels[keep]).float().mean()
    torch.testing.assert_close(probe.train_top1.compute(), acc)


def test_probe_all_unlabelled_batch_gives_zero_loss():
    torch.manual_seed(0)
    probe = OnlineLinearProbe(6, 4)
    feats = torch.randn(5, 6, requires_grad=True)
    loss = probe.training_loss(feats, torch.full((5,), -1))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()  # differentiable (Lightning needs a graph), zero gradient, no NaN
    assert feats.grad is None  # features are detached
    for p in probe.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


def test_probe_detaches_features():
    torch.manual_seed(0)
    probe = OnlineLinearProbe(6, 3)
    feats = torch.randn(4, 6, requires_grad=True)
    probe.training_loss(feats * 2, torch.tensor([0, 1, 2, 0])).backward()
    assert feats.grad is None
    assert probe.linear.weight.grad is not None and probe.linear.weight.grad.abs().sum() > 0


def _simclr(num_classes: int) -> SimCLR:
    torch.manual_seed(0)
    model = SimCLR(backbone="convnet", in_channels=1, num_classes=num_classes, proj_hidden=64, proj_out=32)
    model.log = lambda *a, **k: None  # no trainer attached
    return model


@pytest.mark.parametrize("labels", [[0, 3, -1, 9, 2, 2, -1, 5], [-1] * 8])
def test_probe_does_not_change_backbone_or_projector_gradients(labels):
    with_probe, without = _simclr(10), _simclr(0)
    assert with_probe.probe is not None and without.probe is None
    missing, unexpected = with_probe.load_state_dict(without.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("probe.") for k in missing)
    probe_state = with_probe.state_dict()
    for n, a in without.state_dict().items():
        assert torch.equal(a, probe_state[n]), n

    g = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 1, 28, 28, generator=g), torch.randn(8, 1, 28, 28, generator=g)]
    labels = torch.tensor(labels)
    index = torch.arange(8)
    losses = {}
    for name, model in (("probe", with_probe), ("plain", without)):
        model.train()
        model.zero_grad()
        loss = model.training_step(([v.clone() for v in views], labels, index), 0)
        loss.backward()
        losses[name] = loss

    ssl_names = [n for n, _ in without.named_parameters()]
    assert any(n.startswith("backbone.") for n in ssl_names) and any(n.startswith("projector.") for n in ssl_names)
    probe_params = dict(with_probe.named_parameters())
    for name, p in without.named_parameters():
        q = probe_params[name]
        if not p.requires_grad:  # e.g. the frozen shift of SimCLR's last BatchNorm
            assert p.grad is None and q.grad is None, name
            continue
        assert p.grad is not None and q.grad is not None, name
        assert torch.equal(p.grad, q.grad), name  # bit-identical
    # the BatchNorm statistics moved identically too
    plain_buffers = dict(without.named_buffers())
    for name, buf in with_probe.named_buffers():
        if not name.startswith("probe."):
            assert torch.equal(buf, plain_buffers[name]), name

    # the probe itself trains (when there are labels), and its loss is added to the returned loss
    w_grad = with_probe.probe.linear.weight.grad
    assert w_grad is not None
    if (labels >= 0).any():
        assert w_grad.abs().sum() > 0 and losses["probe"].item() > losses["plain"].item()
    else:
        assert torch.equal(w_grad, torch.zeros_like(w_grad))
        assert torch.equal(losses["probe"].detach(), losses["plain"].detach())
