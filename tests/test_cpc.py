"""CPC (Oord et al. 2018; Henaff et al. 2020): the patch grid, the row-masked context network, the InfoNCE over the
batch's patches against a plain loop, the method's errors, a Lightning fit and exact resume. The 2-process DDP
check is in tests/test_ddp.py (``cpc``)."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from ssl_lightning import SSLDataModule
from ssl_lightning.backbones import build_backbone
from ssl_lightning.data.views import ViewConfig
from ssl_lightning.losses import cpc_infonce
from ssl_lightning.methods import CPC, METHODS
from ssl_lightning.methods.mutual_information.context_network import ContextNetwork
from ssl_lightning.pretext import augment_patches, grid_layout, patch_grid
from ssl_lightning.registry import SSLError

from resume_utils import check_resume_is_exact, fit  # tests/ is on sys.path

SMALL = dict(backbone="convnet", backbone_kwargs={"width": 4, "norm": "layer"}, in_channels=1, num_classes=0,
             optimizer="adamw", lr=1e-3, warmup_epochs=0, patch=8, stride=4, steps=2, context_blocks=1)  # 16 px: 3 x 3


def _make(**kw) -> CPC:
    L.seed_everything(0)
    return CPC(**(SMALL | kw))


def _images(b: int = 4, size: int = 16, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _loss(model: CPC, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return model.loss(model.forward_views([x]), [x], torch.arange(x.shape[0]))


# ---- the patch grid ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,patch,stride,rows,offset", [(256, 64, 32, 7, 0), (28, 8, 4, 6, 0), (30, 8, 4, 6, 1),
                                                           (16, 8, None, 3, 0), (17, 6, 3, 4, 1)])
def test_patch_ij_is_the_crop_at_its_grid_coordinates(size, patch, stride, rows, offset):
    x = torch.randn(2, 3, size, size + 3)  # non-square: the columns get their own count and offset
    grid = patch_grid(x, patch, stride)
    step = patch // 2 if stride is None else stride
    r, c, top, left = grid_layout(size, size + 3, patch, stride)
    assert (r, top) == (rows, offset) and grid.shape == (2, r, c, 3, patch, patch)
    assert left == (size + 3 - patch - (c - 1) * step) // 2 and left + (c - 1) * step + patch <= size + 3
    for i in range(r):
        for j in range(c):
            y0, x0 = top + i * step, left + j * step
            assert torch.equal(grid[:, i, j], x[:, :, y0:y0 + patch, x0:x0 + patch])


def test_augment_patches_flips_or_keeps_each_patch_and_drops_two_colours():
    p = torch.randn(64, 3, 5, 5)
    out = augment_patches(p, torch.Generator().manual_seed(0), flip=True, colour_drop=True)
    kept = (out.abs().sum(dim=(2, 3)) > 0)
    assert kept.sum(1).eq(1).all()  # exactly one channel per patch survives
    flipped = 0
    for a, b, keep in zip(p, out, kept):
        ch = int(keep.nonzero())
        assert torch.equal(b[ch], a[ch]) or torch.equal(b[ch], a[ch].flip(-1))
        flipped += int(not torch.equal(b[ch], a[ch]))
    assert 10 < flipped < 54  # about half
    grey = torch.randn(16, 1, 5, 5)
    same = augment_patches(grey, torch.Generator().manual_seed(0), flip=False, colour_drop=True)
    assert torch.equal(same, grey)  # colour dropping only on 3-channel input; no flip asked


# ---- the masked context network ------------------------------------------------------------------------------------
def test_context_at_row_i_sees_only_rows_up_to_i():
    torch.manual_seed(0)
    net = ContextNetwork(6, 4, blocks=3)
    z = torch.randn(2, 6, 7, 5)
    c = net(z)
    for i in range(7):
        changed = z.clone()
        changed[:, :, i + 1:] = torch.randn_like(changed[:, :, i + 1:])  # rows below i
        torch.testing.assert_close(net(changed)[:, :, :i + 1], c[:, :, :i + 1], atol=0, rtol=0)
        if i + 1 < 7:
            assert not torch.allclose(net(changed)[:, :, i + 1], c[:, :, i + 1])  # the rows below do change
        row_i = z.clone()
        row_i[:, :, i] += 1.0
        assert not torch.allclose(net(row_i)[:, :, i], c[:, :, i])  # row i itself is seen


# ---- the loss ------------------------------------------------------------------------------------------------------
def plain_cpc(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """mean_k mean_{b, i < R - k, j} -log exp(p.z_{b, i+k, j}) / sum_{all b', i', j'} exp(p.z_{b', i', j'}), by loops."""
    steps, b, rows, cols, _ = predictions.shape
    per_k = []
    for k in range(1, steps + 1):
        terms = []
        for n in range(b):
            for i in range(rows - k):
                for j in range(cols):
                    p = predictions[k - 1, n, i, j]
                    scores = [float(p @ targets[m, u, v]) for m in range(b) for u in range(rows) for v in range(cols)]
                    positive = float(p @ targets[n, i + k, j])
                    terms.append(-(positive - math.log(sum(math.exp(s) for s in scores))))
        per_k.append(sum(terms) / len(terms))
    return sum(per_k) / steps


def test_cpc_infonce_equals_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    predictions = torch.randn(3, 2, 4, 3, 5, generator=g, dtype=torch.float64)
    targets = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    assert abs(float(cpc_infonce(predictions, targets)) - plain_cpc(predictions, targets)) < 1e-10
    per_k = cpc_infonce(predictions, targets, per_offset=True)
    assert per_k.shape == (3,) and abs(float(per_k.mean()) - plain_cpc(predictions, targets)) < 1e-10


def test_cpc_infonce_with_k_equal_score_negatives_is_ln_k_plus_1():
    targets = torch.randn(2, 3, 2, 4)  # 12 candidates: the positive and K = 11 negatives
    predictions = torch.zeros(2, 2, 3, 2, 4)  # every score 0: all equal
    torch.testing.assert_close(cpc_infonce(predictions, targets), torch.tensor(math.log(11 + 1)))
    targets = torch.ones(2, 3, 2, 4)  # equal targets, any prediction: equal scores again
    torch.testing.assert_close(cpc_infonce(torch.randn(2, 2, 3, 2, 4), targets), torch.tensor(math.log(12)))


def test_cpc_infonce_errors():
    with pytest.raises(SSLError, match="at least 4 rows"):
        cpc_infonce(torch.zeros(3, 2, 3, 3, 4), torch.zeros(2, 3, 3, 4))
    with pytest.raises(SSLError, match="same grid"):
        cpc_infonce(torch.zeros(1, 2, 3, 3, 4), torch.zeros(2, 3, 2, 4))


# ---- the method ----------------------------------------------------------------------------------------------------
def test_method_is_registered_and_its_loss_is_cpc_infonce_of_its_pieces():
    assert METHODS.get("cpc") is CPC
    model = _make(flip=False)
    x = _images()
    out = _loss(model, x)
    z = model.encode_patches(x)
    assert z.shape == (4, 3, 3, 32)  # ConvNet width 4: 32-d pooled features per patch
    patch = patch_grid(x, 8, 4)[1, 2, 0]
    torch.testing.assert_close(z[1, 2, 0], model.backbone(patch[None])[0])  # each patch encoded on its own
    c = model.context["down"](z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    predictions = torch.stack([w(c) for w in model.predictors["down"]])
    torch.testing.assert_close(out["loss"], cpc_infonce(predictions, z))
    torch.testing.assert_close(torch.stack([out["loss_k1"], out["loss_k2"]]).mean(), out["loss"])
    out["loss"].backward()
    for module in (model.backbone, model.context, model.predictors):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_layer_norm_backbone_encodes_patches_independently_and_whole_images_too():
    model = _make(flip=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    x = _images()
    z = model.encode_patches(x)
    other = x.clone()
    other[1:] = torch.randn_like(other[1:])  # other images: image 0's patch embeddings must not move
    torch.testing.assert_close(model.encode_patches(other)[0], z[0])
    assert model(_images(size=28)).shape == (4, 32)  # whole images of any size, for kNN and probes
    resnet = build_backbone("resnet18", in_channels=1, cifar_stem=True, norm="layer")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in resnet.modules())


def test_directions_have_their_own_context_and_predictors():
    model = _make(directions=["down", "up", "left", "right"], flip=False)
    assert set(model.context) == set(model.predictors) == {"down", "up", "left", "right"}
    x = _images()
    z = model.encode_patches(x)
    per_direction = []
    for name, oriented in (("down", z), ("up", z.flip(1)), ("right", z.transpose(1, 2)),
                           ("left", z.transpose(1, 2).flip(1))):
        c = model.context[name](oriented.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        per_direction.append(cpc_infonce(torch.stack([w(c) for w in model.predictors[name]]), oriented))
    torch.testing.assert_close(_loss(model, x)["loss"], torch.stack(per_direction).mean())


def test_batch_norm_backbone_keeps_running_statistics_for_whole_images():
    model = _make(backbone_kwargs={"width": 4}, flip=False)
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = _images()
    feats = model.forward_views([x])
    before = [m.running_mean.clone() for m in norms]
    model.loss(feats, [x], torch.arange(4))["loss"].backward()
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))


def test_clear_errors():
    with pytest.raises(SSLError, match="20 px patches do not fit in 16x16 px images"):
        _loss(_make(patch=20), _images(size=16))
    with pytest.raises(SSLError, match="2 prediction steps need a grid of at least 3 rows, got 2"):
        _loss(_make(), _images(size=12))  # 8 px patches, stride 4: a 2 x 2 grid
    with pytest.raises(SSLError, match="cannot encode 4x4 px pieces.*patch_size"):
        _loss(_make(patch=4, stride=2), _images())  # the ConvNet's three poolings need 8 px
    with pytest.raises(SSLError, match="no feature-map access"):
        CPC(backbone="vit_tiny", backbone_kwargs={"img_size": 16, "patch_size": 4}, in_channels=1, num_classes=0)
    with pytest.raises(SSLError, match="directions must be distinct ones of"):
        _make(directions=["diagonal"])
    with pytest.raises(SSLError, match="has no stage 'layer9'"):
        _make(stage="layer9")


def test_stage_option_uses_an_intermediate_map():
    model = _make(stage="block3", flip=False)
    z = model.encode_patches(_images())
    assert z.shape == (4, 3, 3, 16)  # block3 of width 4: 16 channels
    assert model.predictors["down"][0].in_features == 16


# ---- through Lightning ---------------------------------------------------------------------------------------------
def _data(size: int = 16, n: int = 24) -> SSLDataModule:
    return SSLDataModule("synthetic", batch_size=8, num_workers=0, pin_memory=False, image_size=size,
                         views=[ViewConfig(size=size, count=1, scale=(0.5, 1.0))],
                         dataset_options={"size": n, "image_size": size, "channels": 1})


def test_short_fit_through_lightning_logs_each_offset():
    trainer = fit(_make(num_classes=None), _data(), max_epochs=1, log_every_n_steps=1)
    metrics = trainer.callback_metrics
    assert all(math.isfinite(float(metrics[k])) for k in ("train/loss", "train/loss_k1", "train/loss_k2"))


def test_cpc_exact_resume(tmp_path):
    """The per-patch flips come from the per-step generator: epoch 2 of a resumed run is the uninterrupted one's."""
    check_resume_is_exact(lambda: _make(num_classes=10), _data, tmp_path)
