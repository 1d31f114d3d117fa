"""Decoders, autoencoder / denoising autoencoder / context encoder: decoder shapes and gradients for the ConvNet and
ResNet-18, each loss = a plain transcription, masking noise zeroes the stated fraction, the context encoder's masks
cover the stated area and its loss sees the predicted region only (10x on the overlap), Lightning fits, the
adversarial context encoder's exact resume (both optimizers), clear errors for bad options."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from ssl_lightning import SSLDataModule
from ssl_lightning.backbones import build_backbone
from ssl_lightning.backbones.feature_maps import forward_features, pool
from ssl_lightning.data.views import ViewConfig
from ssl_lightning.decoders import DECODERS, DCGANDiscriminator, build_decoder
from ssl_lightning.losses.autoencoding import (context_encoder_loss, denoising_weights, discriminator_loss,
                                               generator_adversarial_loss, overlap_weights, reconstruction_loss,
                                               region_weights)
from ssl_lightning.methods import METHODS, AutoEncoder, ContextEncoder, DenoisingAutoEncoder
from ssl_lightning.registry import SSLError

from resume_utils import check_resume_is_exact, fit  # tests/ is on sys.path

SMALL = dict(backbone="convnet", backbone_kwargs={"width": 4}, in_channels=1, num_classes=0, optimizer="adamw",
             lr=1e-3, warmup_epochs=0, image_size=16)


def _make(name: str, **kw):
    L.seed_everything(0)
    return METHODS.get(name)(**(SMALL | kw))


def _images(size: int = 16, b: int = 4, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _loss(model, x):
    views = [x]
    return model.loss(model.forward_views(views), views, torch.arange(x.shape[0]))


def _data(size: int = 16, n: int = 16, channels: int = 1) -> SSLDataModule:
    return SSLDataModule("synthetic", batch_size=8, num_workers=0, pin_memory=False, image_size=size,
                         views=[ViewConfig(size=size, count=1, scale=(0.5, 1.0))],
                         dataset_options={"size": n, "image_size": size, "channels": channels})


# ---- decoders -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone,kw,channels,size", [
    ("convnet", {"width": 4}, 1, 28), ("convnet", {"width": 4}, 3, 32),
    ("resnet18", {"cifar_stem": True}, 3, 32), ("resnet18", {}, 3, 64)])
@pytest.mark.parametrize("from_pooled", [False, True])
def test_decoder_maps_features_back_to_images_and_passes_gradients(backbone, kw, channels, size, from_pooled):
    torch.manual_seed(0)
    net = build_backbone(backbone, in_channels=channels, **kw)
    decoder = build_decoder(net, channels, size, from_pooled=from_pooled)
    x = _images(size, 2, channels)
    fmap = forward_features(net, x)
    out = decoder(pool(fmap) if from_pooled else fmap)
    assert out.shape == x.shape
    F.mse_loss(out, x).backward()
    for module in (net, decoder):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_convnet_decoder_mirrors_the_blocks_and_resnet_decoder_follows_the_stages():
    conv = build_decoder(build_backbone("convnet", in_channels=1, width=4), 1, 28)
    assert [(b[0].in_channels, b[0].out_channels) for b in conv.blocks] == [(32, 16), (16, 8), (8, 4)]
    assert conv.strides == [4, 2, 1] and (conv.head.in_channels, conv.head.out_channels) == (4, 1)
    res = build_decoder(build_backbone("resnet18"), 3, 64)
    assert [b[0].out_channels for b in res.blocks] == [256, 128, 64, 32, 16] and res.strides == [16, 8, 4, 2, 1]
    from_layer3 = build_decoder(build_backbone("resnet18", cifar_stem=True), 3, 32, stage="layer3")
    assert from_layer3.blocks[0][0].in_channels == 256 and from_layer3.strides == [2, 1]


def test_decoder_for_dense_prediction_at_a_quarter_resolution():
    net = build_backbone("resnet18")
    decoder = build_decoder(net, 313, 64, out_stride=4)  # colorization: 313 ab bins at 1/4 resolution
    assert decoder(forward_features(net, _images(64, 2, 3))).shape == (2, 313, 16, 16)


def test_decoders_are_registered_and_refuse_other_backbones():
    assert {"convnet", "resnet"} <= set(DECODERS.names())
    with pytest.raises(SSLError, match="no decoder matches a Linear backbone.*'convnet' or a 'resnet"):
        build_decoder(torch.nn.Linear(2, 2), 3, 32)
    with pytest.raises(SSLError, match="takes feature maps"):
        build_decoder(build_backbone("convnet", width=4), 3, 16)(torch.randn(2, 32))


def test_dcgan_discriminator_gives_one_logit_per_image():
    d = DCGANDiscriminator(3, 64, width=8)
    assert d(_images(64, 5, 3)).shape == (5,)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules()) == 3  # none after the first conv
    with pytest.raises(SSLError, match="too small"):
        DCGANDiscriminator(1, 3)


# ---- losses = plain transcriptions -----------------------------------------------------------------------------
def test_reconstruction_losses_are_their_formulas():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 2, 4, 4, generator=g), torch.rand(3, 2, 4, 4, generator=g)
    weight = torch.rand(3, 2, 4, 4, generator=g)
    mse = bce = wmse = 0.0
    for p, t, w in zip(pred.flatten().tolist(), target.flatten().tolist(), weight.flatten().tolist()):
        mse += (p - t) ** 2
        wmse += w * (p - t) ** 2
        s = 1 / (1 + math.exp(-p))
        bce += -(t * math.log(s) + (1 - t) * math.log(1 - s))
    n = pred.numel()
    assert float(reconstruction_loss(pred, target)) == pytest.approx(mse / n, rel=1e-5)
    assert float(reconstruction_loss(pred, target, "mse", weight)) == pytest.approx(wmse / n, rel=1e-5)
    assert float(reconstruction_loss(pred, target, "bce")) == pytest.approx(bce / n, rel=1e-5)
    corrupted = torch.rand(3, 2, 4, 4, generator=g) < 0.3
    w = denoising_weights(corrupted, alpha=2.0, beta=0.5)
    assert torch.equal(w, torch.where(corrupted, torch.tensor(2.0), torch.tensor(0.5)))
    with pytest.raises(SSLError, match="unknown reconstruction loss 'l1'"):
        reconstruction_loss(pred, target, "l1")


def test_context_encoder_losses_are_their_formulas():
    w = overlap_weights(6, 1)
    expected = torch.tensor([[10.0] * 6] + [[10.0, 1, 1, 1, 1, 10]] * 4 + [[10.0] * 6])
    assert torch.equal(w, expected)
    mask = torch.tensor([[True, False], [False, False]])
    assert torch.equal(region_weights(mask), torch.tensor([[1.0, 10.0], [10.0, 10.0]]))
    real, fake = torch.randn(5), torch.randn(5)
    sig = torch.sigmoid
    plain_d = -(torch.log(sig(real)).mean() + torch.log(1 - sig(fake)).mean())
    assert float(discriminator_loss(real, fake)) == pytest.approx(float(plain_d), rel=1e-5)
    assert float(generator_adversarial_loss(fake)) == pytest.approx(float(-torch.log(sig(fake)).mean()), rel=1e-5)
    rec, adv = torch.tensor(2.0), torch.tensor(0.7)
    assert float(context_encoder_loss(rec, adv, 0.001)) == pytest.approx(0.999 * 2.0 + 0.001 * 0.7)
    assert float(context_encoder_loss(rec, None, 0.001)) == 2.0
    with pytest.raises(SSLError, match="must leave a hole"):
        overlap_weights(4, 2)


# ---- methods: each loss = the recomputation from its parts -------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"bottleneck": "map"}, {"loss": "bce"}])
def test_autoencoder_loss_is_the_reconstruction_of_the_view(kw):
    model = _make("autoencoder", **kw)
    model.normalisation.mean.fill_(0.3), model.normalisation.std.fill_(0.5)
    x = _images()
    out = _loss(model, x)
    model.eval()  # the same normalisation in both passes: compare the formulas, not the batch statistics
    out, fmap = _loss(model, x), forward_features(model.backbone, x)
    pred = model.decoder(fmap if kw.get("bottleneck") == "map" else pool(fmap))
    if kw.get("loss") == "bce":
        target = (x * 0.5 + 0.3).clamp(0, 1)
        plain = (-(target * torch.log(torch.sigmoid(pred)) + (1 - target) * torch.log(1 - torch.sigmoid(pred)))).mean()
    else:
        plain = (pred - x).square().mean()
    torch.testing.assert_close(out["loss"], plain, rtol=1e-5, atol=1e-6)


def test_masking_noise_zeroes_the_stated_fraction_and_the_loss_is_emphasised():
    model = _make("denoising_autoencoder", noise=0.3, alpha=3.0, beta=0.5)
    model.normalisation.mean.fill_(0.25), model.normalisation.std.fill_(0.5)
    x = _images(b=3) + 5  # no component at the black value by chance
    noisy, corrupted = model.corrupt(x)
    black = (0 - 0.25) / 0.5
    assert corrupted.flatten(1).sum(1).tolist() == [round(0.3 * 256)] * 3  # 77 of 16 x 16 per image
    assert torch.all(noisy[corrupted] == black) and torch.equal(noisy[~corrupted], x[~corrupted])
    _, again = model.corrupt(x)
    assert not torch.equal(again, corrupted)  # drawn anew every time
    model.eval()
    torch.manual_seed(7)
    out = _loss(model, x)
    torch.manual_seed(7)
    noisy, corrupted = model.corrupt(x)
    pred = model.decoder(pool(forward_features(model.backbone, noisy)))
    weight = torch.where(corrupted, 3.0, 0.5)
    torch.testing.assert_close(out["loss"], (weight * (pred - x).square()).mean(), rtol=1e-5, atol=1e-6)


def test_encoding_corrupted_inputs_leaves_running_statistics_to_the_clean_images():
    model = _make("denoising_autoencoder")
    bn = model.backbone.features[1]
    before = bn.running_mean.clone()
    model.encode(_images())
    assert torch.equal(bn.running_mean, before)


def _capture_decoder_output(model):
    seen = {}

    def hook(module, args, output):
        output.retain_grad()
        seen["pred"] = output
    model.decoder.register_forward_hook(hook)
    return seen


def test_central_mask_covers_the_stated_area_and_the_loss_sees_the_hole_only():
    model = _make("context_encoder", hole=8, overlap=1)  # 16 px: predicted square 4..11, masked 5..10
    x = _images() + 5
    inp, weight, region = model.masked_input(x)
    filled = inp == 0  # the dataset mean, in the normalised views
    assert filled.sum() == 4 * 6 * 6 and torch.all(filled[:, :, 5:11, 5:11])
    assert torch.equal(inp[~filled], x[~filled]) and region == slice(4, 12)
    seen = _capture_decoder_output(model)
    out = _loss(model, x)
    out["loss"].backward()
    grad = seen["pred"].grad
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[4:12, 4:12] = False
    assert torch.all(grad[..., outside] == 0)  # nothing outside the predicted square
    err = seen["pred"].detach() - x
    ratio = grad[..., 4:12, 4:12] / (2 * err[..., 4:12, 4:12] / (4 * 8 * 8))
    torch.testing.assert_close(ratio[0, 0], overlap_weights(8, 1), rtol=1e-4, atol=1e-4)  # 10x on the border
    plain = (overlap_weights(8, 1) * err[..., 4:12, 4:12].square()).mean()
    torch.testing.assert_close(out["loss"], plain, rtol=1e-5, atol=1e-6)


def test_random_region_mask_covers_20_to_30_percent_and_weights_the_context_10x():
    model = _make("context_encoder", mask="random")
    x = _images() + 5
    torch.manual_seed(3)  # outside a trainer the mask's generator is seeded from the global RNG
    inp, weight, region = model.masked_input(x)
    filled = inp[0, 0] == 0
    assert region is None and 0.2 < float(filled.float().mean()) < 0.3
    assert torch.all(inp[:, :, filled] == 0)  # one mask for the whole batch
    assert torch.equal(weight, torch.where(filled, 1.0, 10.0))
    seen = _capture_decoder_output(model)
    torch.manual_seed(3)
    out = _loss(model, x)
    err = seen["pred"].detach() - x
    model_weight = torch.where(filled, 1.0, 10.0)
    torch.testing.assert_close(out["loss"].detach(), (model_weight * err.square()).mean(), rtol=1e-5, atol=1e-6)


# ---- through Lightning -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", [("autoencoder", {}), ("denoising_autoencoder", {"loss": "bce"}),
                                     ("context_encoder", {"overlap": 1}),
                                     ("context_encoder", {"mask": "random", "bottleneck": "map"}),
                                     ("context_encoder", {"overlap": 1, "lambda_adv": 0.001, "disc_width": 8})])
def test_short_fit_runs_through_lightning(name, kw):
    model, data = _make(name, num_classes=None, **kw), _data()
    trainer = fit(model, data, max_epochs=1, log_every_n_steps=1)
    assert trainer.global_step == 2  # also with the discriminator's optimizer: one step per batch
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and \
        model.normalisation.std.tolist() == pytest.approx(list(data.std))  # the data's, read in setup
    if kw.get("lambda_adv"):
        assert {"train/adv", "train/disc", "train/rec"} <= set(metrics)
        assert len(trainer.optimizers) == 2
        assert {id(p) for p in model.discriminator.parameters()}.isdisjoint(
            id(p) for g in trainer.optimizers[0].param_groups for p in g["params"])
        assert trainer.optimizers[1].param_groups[0]["lr"] == pytest.approx(
            0.1 * trainer.optimizers[0].param_groups[0]["initial_lr"])  # the scaled lr, before the schedule


def test_adversarial_context_encoder_resumes_exactly(tmp_path):
    """Both optimizers' states (the generator's via resume_utils, the discriminator's here), the discriminator, the
    random masks of epoch 2 (per-step generator)."""
    make = lambda: _make("context_encoder", mask="random", lambda_adv=0.001, disc_width=8, num_classes=10)  # noqa: E731
    runs = check_resume_is_exact(make, _data, tmp_path)
    a, b = runs.t_straight.optimizers[1].state_dict(), runs.t_resumed.optimizers[1].state_dict()
    assert len(a["state"]) == len(b["state"]) > 0 and a["param_groups"] == b["param_groups"]
    for i, state in a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, b["state"][i][name], rtol=0, atol=0, msg=f"D optimizer {i} {name}")
    assert len(runs.checkpoint["optimizer_states"]) == 2


# ---- bad options -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw,match", [
    ("autoencoder", {"loss": "l1"}, "unknown loss 'l1'"),
    ("autoencoder", {"bottleneck": "vector"}, "unknown bottleneck 'vector'"),
    ("denoising_autoencoder", {"noise": 0.0}, "noise=0.0 must be in \\(0, 1\\)"),
    ("denoising_autoencoder", {"alpha": 0.0, "beta": 0.0}, "not both 0"),
    ("context_encoder", {"mask": "block"}, "unknown mask 'block'"),
    ("context_encoder", {"lambda_adv": 1.0}, "lambda_adv=1.0 must be in \\[0, 1\\)"),
    ("context_encoder", {"hole": 20}, "hole=20 must be in 1..size=16"),
    ("context_encoder", {"hole": 8, "overlap": 4}, "must leave a hole"),
    ("autoencoder", {"backbone": "convnet", "stage": "layer9"}, "has no stage 'layer9'"),
])
def test_bad_options_get_a_clear_error(name, kw, match):
    with pytest.raises(SSLError, match=match):
        _make(name, **kw)


def test_views_of_another_size_get_a_clear_error():
    model = _make("autoencoder")
    with pytest.raises(SSLError, match="built for 16 px views.*set model.image_size"):
        _loss(model, _images(24))
