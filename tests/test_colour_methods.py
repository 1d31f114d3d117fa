"""Colorization and SplitBrain: chance-level losses at initialisation (ln Q; ln Q + ln l_bins), the rebalanced
loss = a plain transcription of its formula, rebalancing weights of expectation 1, annealed-mean decoding, the
refusal of gray data, the generated colour dataset, one Lightning step of each with the kNN monitor, the prior
kept by checkpoints (exact resume), and the evaluation path (load_backbone + eval_splits) giving the trained
features."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from ssl_lightning import SSLDataModule
from ssl_lightning.backbones import build_backbone
from ssl_lightning.callbacks import KNNMonitor
from ssl_lightning.data.datasets import load_synthetic_colour
from ssl_lightning.data.views import ViewConfig
from ssl_lightning.evaluation.checkpoint import load_backbone
from ssl_lightning.evaluation.data import EvalData, eval_splits, resolve_data
from ssl_lightning.evaluation.export import export_backbone
from ssl_lightning.evaluation.features import extract_features
from ssl_lightning.losses.pretext.colorization import colorization_loss
from ssl_lightning.methods import METHODS, Colorization, SplitBrain
from ssl_lightning.pretext.color import (ab_gamut_bins, annealed_mean, bin_counts, lab_inputs, quantize_ab, quantize_l,
                                         rebalance_weights, rgb_to_lab)
from ssl_lightning.registry import SSLError

from resume_utils import check_resume_is_exact, perturb_first_parameter  # tests/ is on sys.path

SIZE = 16
COMMON = dict(num_classes=0, optimizer="adamw", lr=1e-3, warmup_epochs=0, hidden=8, mean=(0.5,) * 3, std=(0.25,) * 3)
KW = {"colorization": dict(backbone="convnet", backbone_kwargs={"width": 4}, prior_images=32),
      "split_brain": dict(backbone="convnet", backbone_kwargs={"width": 4})}  # each half


def _make(name: str, **kw):
    L.seed_everything(0)
    return METHODS.get(name)(**(COMMON | KW[name] | kw))


def _data(n: int = 32, batch_size: int = 8) -> SSLDataModule:
    return SSLDataModule("synthetic_colour", batch_size=batch_size, num_workers=0, pin_memory=False, eval_subset=16,
                         val_subset=16, views=[ViewConfig(count=1, scale=(0.6, 1.0), jitter=0.0, grayscale=0.0)],
                         dataset_options={"size": n, "image_size": SIZE})


def _images(b: int = 4, seed: int = 0) -> torch.Tensor:
    """Normalised RGB images (mean 0.5, std 0.25), colourful enough to pass the gray mask."""
    return (torch.rand(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) - 0.5) / 0.25


def _zero(conv: torch.nn.Conv2d) -> None:
    torch.nn.init.zeros_(conv.weight)
    torch.nn.init.zeros_(conv.bias)


def _step_loss(model, views):
    return model.loss(model.forward_views(views), views, torch.arange(views[0].shape[0]))["loss"]


# ---- chance levels --------------------------------------------------------------------------------------------
def test_colorization_chance_loss_is_ln_q():
    model = _make("colorization", lam=1.0)  # lam 1: every weight 1 (no rebalancing)
    _zero(model.head.out)
    model.set_prior(torch.rand(model.bins.shape[0], dtype=torch.float64))
    q = model.bins.shape[0]
    assert q == 309  # the "neighbours" bin set (see ssl_lightning.pretext.color)
    assert _step_loss(model, [_images()]).item() == pytest.approx(math.log(q), abs=1e-5)


def test_colorization_uniform_prediction_with_rebalancing_is_ln_q_times_the_mean_weight():
    model = _make("colorization")
    _zero(model.head.out)
    prior = torch.rand(model.bins.shape[0], dtype=torch.float64)
    model.set_prior(prior)
    x = _images()
    _, ab = lab_inputs(model.rgb(x))
    ab = ab[..., ::4, ::4]
    w = rebalance_weights(prior)[quantize_ab(ab, model.bins)]  # the 5-NN soft target's argmax is the nearest bin
    expected = math.log(model.bins.shape[0]) * w.mean().item()
    assert _step_loss(model, [x]).item() == pytest.approx(expected, rel=1e-5)


def test_split_brain_chance_loss_is_ln_q_plus_ln_l_bins():
    model = _make("split_brain", l_bins=50)
    _zero(model.ab_head.out)
    _zero(model.l_head.out)
    out = model.loss(model.forward_views([_images()]), [], torch.arange(4))
    assert out["loss_l_to_ab"].item() == pytest.approx(math.log(309), abs=1e-5)
    assert out["loss_ab_to_l"].item() == pytest.approx(math.log(50), abs=1e-5)


# ---- the loss = its formula, written out ---------------------------------------------------------------------
def test_colorization_loss_equals_a_plain_transcription():
    g = torch.Generator().manual_seed(1)
    bins = ab_gamut_bins(cover="neighbours").double()
    q = bins.shape[0]
    ab = (torch.rand(3, 2, 3, 2, generator=g, dtype=torch.float64) - 0.5) * 160
    ab[1] = ab[1].clamp(-4, 4)  # a gray image: no loss
    logits = torch.randn(3, q, 3, 2, generator=g, dtype=torch.float64)
    prior = torch.rand(q, generator=g, dtype=torch.float64)
    lam, nn_, sigma = 0.5, 5, 5.0
    p = [float(v) / float(prior.sum()) for v in prior]
    w = [1.0 / ((1 - lam) * pq + lam / q) for pq in p]
    norm = sum(pq * wq for pq, wq in zip(p, w))
    w = [wq / norm for wq in w]
    total, count = 0.0, 0
    for b in range(3):
        if all(abs(float(v)) <= 5 for v in ab[b].reshape(-1)):
            continue
        for i in range(3):
            for j in range(2):
                point = ab[b, :, i, j]
                dists = sorted((float(((point - bins[k]) ** 2).sum()), k) for k in range(q))[:nn_]
                g_w = [math.exp(-d / (2 * sigma ** 2)) for d, _ in dists]
                z = {k: gw / sum(g_w) for (_, k), gw in zip(dists, g_w)}
                row = logits[b, :, i, j]
                log_norm = math.log(sum(math.exp(float(v)) for v in row))
                ce = -sum(zk * (float(row[k]) - log_norm) for k, zk in z.items())
                total += w[max(z, key=z.get)] * ce
                count += 1
    got = colorization_loss(logits, ab, bins, prior, lam, nn_, sigma)
    assert got.item() == pytest.approx(total / count, rel=1e-9)


def test_split_brain_loss_is_the_two_cross_entropies_on_quantised_targets():
    model = _make("split_brain")
    x = _images(2)
    out = model.loss(model.forward_views([x]), [x], torch.arange(2))
    ab_logits, l_logits, lab = model.logits(model.encode(model.rgb(x)))
    assert lab.shape[-2:] == (SIZE // 4, SIZE // 4)
    total = 0.0
    for logits, target in ((ab_logits, quantize_ab(lab[:, 1:], model.bins)), (l_logits, quantize_l(lab[:, 0], 100))):
        rows, labels = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]).double(), target.reshape(-1)
        total += sum(-(r[t] - torch.logsumexp(r, 0)).item() for r, t in zip(rows, labels)) / len(labels)
    assert out["loss"].item() == pytest.approx(total, rel=1e-5)


def test_quantize_l_bins():
    lightness = torch.tensor([0.0, 0.99, 1.0, 49.5, 99.99, 100.0])
    assert quantize_l(lightness, 100).tolist() == [0, 0, 1, 49, 99, 99]
    assert quantize_l(lightness, 50).tolist() == [0, 0, 0, 24, 49, 49]


# ---- rebalancing, decoding ---------------------------------------------------------------------------------------
def test_rebalancing_weights_have_expectation_one_under_the_empirical_prior():
    bins = ab_gamut_bins()
    _, ab = lab_inputs(torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(2)))
    counts = bin_counts(ab, bins)
    for lam in (0.1, 0.5, 1.0):  # (lam 0 gives empty bins infinite weight)
        w = rebalance_weights(counts, lam)
        assert float((counts / counts.sum() * w).sum()) == pytest.approx(1.0, abs=1e-6)
        assert w[quantize_ab(ab, bins)].mean().item() == pytest.approx(1.0, abs=1e-5)  # over the pixels themselves


def test_annealed_mean_decoding():
    bins = ab_gamut_bins()
    bins = bins.double()
    logits = torch.randn(2, bins.shape[0], 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    probs = logits.softmax(1)
    mean = torch.einsum("bqhw,qc->bchw", probs, bins)
    torch.testing.assert_close(annealed_mean(probs, bins, 1.0), mean)  # T = 1: the mean
    mode = bins[probs.argmax(1)].permute(0, 3, 1, 2)
    torch.testing.assert_close(annealed_mean(probs, bins, 1e-4), mode, atol=1e-6, rtol=0)  # T -> 0: the mode
    with pytest.raises(SSLError, match="temperature"):
        annealed_mean(probs, bins, 0.0)


def test_colorize_gives_rgb_images_with_the_input_lightness():
    model = _make("colorization").eval()
    x = _images(2)
    out = model.colorize(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    l_in, l_out = rgb_to_lab(model.rgb(x))[:, 0], rgb_to_lab(out)[:, 0]
    assert (l_in - l_out).abs().mean() < 3  # same L up to gamut clipping


# ---- gray data is refused ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["colorization", "split_brain"])
def test_gray_data_is_refused(name):
    with pytest.raises(SSLError, match="colour dataset"):
        _make(name, in_channels=1)
    model = _make(name)
    with pytest.raises(SSLError, match="colour dataset"):
        model(torch.zeros(2, 1, SIZE, SIZE))


def test_split_brain_halves_are_plain_backbones():
    with pytest.raises(SSLError, match="each half must be a plain backbone"):
        SplitBrain(backbone="split_brain", **COMMON)
    with pytest.raises(SSLError, match="colour dataset"):
        build_backbone("split_brain", in_channels=1)


def test_normalisation_must_be_known():
    model = Colorization(backbone="convnet", backbone_kwargs={"width": 4}, **(COMMON | {"mean": None, "std": None}))
    with pytest.raises(SSLError, match="mean and std"):
        model(_images())


# ---- the representation ----------------------------------------------------------------------------------------
def test_features_are_what_the_encoders_see():
    x = _images(3)
    col = _make("colorization").eval()
    lightness, _ = lab_inputs(col.rgb(x))
    assert col.backbone.features[0].in_channels == 1
    torch.testing.assert_close(col(x), col.backbone(lightness))
    sb = _make("split_brain").eval()
    lab = rgb_to_lab(sb.rgb(x))
    expected = torch.cat([sb.backbone.l_net((lab[:, :1] - 50) / 100), sb.backbone.ab_net(lab[:, 1:] / 110)], 1)
    torch.testing.assert_close(sb(x), expected)
    assert sb(x).shape[1] == sb.backbone.num_features == 2 * 32  # two width-4 ConvNets: 32 features each
    assert col.head_stages == ["block3", "block4"]  # the stride-4 stage and the last, upsampled to the 1/4 grid


def test_synthetic_colour_hues_of_a_shape_are_isoluminant():
    ds = load_synthetic_colour("", "train", size=200, image_size=SIZE, noise=0.0)
    lab = rgb_to_lab(ds.images.float() / 255)
    fg = (lab[:, 0] - 65).abs() < 1.5  # the shapes' pixels (backgrounds are far darker or lighter)
    for shape in range(5):
        a, b = (ds.targets == 2 * shape), (ds.targets == 2 * shape + 1)
        ab_a = lab[a].permute(1, 0, 2, 3)[1:, fg[a]].mean(1)
        ab_b = lab[b].permute(1, 0, 2, 3)[1:, fg[b]].mean(1)
        assert (ab_a - ab_b).norm() > 60  # opposite hues (chroma 35 each)
        assert abs(lab[a][:, 0][fg[a]].mean() - lab[b][:, 0][fg[b]].mean()) < 0.3  # the same lightness (up to 8-bit rounding)


def test_synthetic_colour_hue_lightness_step_makes_the_second_hue_lighter():
    """The diagnostic option (split-brain's ab -> L task then needs the hue): the second hue of each shape is
    ``step`` lighter, its chroma and hue unchanged; the default images are the isoluminant ones, bit for bit."""
    kw = dict(size=200, image_size=SIZE, noise=0.0)
    plain, stepped = load_synthetic_colour("", "train", **kw), load_synthetic_colour("", "train", hue_lightness_step=10.0, **kw)
    assert torch.equal(plain.images, load_synthetic_colour("", "train", hue_lightness_step=0.0, **kw).images)
    assert torch.equal(plain.targets, stepped.targets)
    lab_p, lab_s = rgb_to_lab(plain.images.float() / 255), rgb_to_lab(stepped.images.float() / 255)
    fg = (lab_p[:, 0] - 65).abs() < 1.5  # the shapes' pixels in the isoluminant images (same masks in both)
    for label in range(10):
        sel = plain.targets == label
        l_fg = lab_s[sel][:, 0][fg[sel]].mean()
        assert abs(l_fg - (65 + 10 * (label % 2))) < 0.5
        ab_p, ab_s = (lab[sel].permute(1, 0, 2, 3)[1:, fg[sel]].mean(1) for lab in (lab_p, lab_s))
        assert (ab_p - ab_s).norm() < 1.0  # the same hue and chroma (in gamut: no clipping)


def test_synthetic_colour_coloured_backgrounds_and_hue_jitter():
    """``background_chroma``: each background takes a random hue at that chroma (so an image's colours no longer
    name its class alone); ``hue_jitter``: the shapes' hues vary by up to that many degrees. The labels and the
    shapes' pixels are those of the default images, whose backgrounds are gray."""
    kw = dict(size=200, image_size=SIZE, noise=0.0)
    plain = load_synthetic_colour("", "train", **kw)
    scene = load_synthetic_colour("", "train", background_chroma=35.0, hue_jitter=15.0, **kw)
    assert torch.equal(plain.targets, scene.targets)
    lab_p, lab_s = rgb_to_lab(plain.images.float() / 255), rgb_to_lab(scene.images.float() / 255)
    fg = (lab_p[:, 0] - 65).abs() < 1.5
    bg_ab = torch.stack([lab_s[i, 1:, ~fg[i]].mean(1) for i in range(len(lab_s))])  # (N, 2)
    dark = torch.stack([lab_p[i, 0, ~fg[i]].mean() for i in range(len(lab_p))]) < 50
    chroma = bg_ab[dark].norm(dim=1)  # dark backgrounds (L 15-40) hold chroma 35 in gamut for most hues
    assert chroma.median() > 25
    assert all(lab_p[i, 1:, ~fg[i]].abs().max() < 2.0 for i in range(len(lab_p)))  # the default: gray
    hue = torch.rad2deg(torch.atan2(bg_ab[:, 1], bg_ab[:, 0])) % 360
    assert hue.std() > 80  # spread over the circle, not one hue per class
    for label in range(10):
        sel = scene.targets == label
        ab = lab_s[sel].permute(1, 0, 2, 3)[1:, fg[sel]]
        expected = 36.0 * (label // 2) + 180.0 * (label % 2)
        angle = (torch.rad2deg(torch.atan2(ab[1], ab[0])) - expected + 180) % 360 - 180
        assert angle.abs().max() < 15.0 + 2.0  # within the jitter (up to 8-bit rounding)
        assert angle.std() > 3.0  # and jittered


# ---- Lightning: one step (with the kNN monitor), the prior in checkpoints, evaluation ------------------------------
@pytest.mark.parametrize("name", ["colorization", "split_brain"])
def test_one_lightning_step_and_evaluation_path(name, tmp_path):
    model = _make(name, mean=None, std=None, num_classes=10)
    knn = KNNMonitor(k=5)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[knn], num_sanity_val_steps=0)
    dm = _data()
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and "val/knn_top1" in trainer.callback_metrics
    torch.testing.assert_close(model.normalisation.mean, torch.tensor(dm.mean))  # read from the datamodule
    if name == "colorization":
        assert model.prior_counts.sum() == 32 * SIZE * SIZE  # estimated from the 32 training images
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    # offline evaluation: the backbone alone, the images converted to what it was trained on
    backbone, info = load_backbone(tmp_path / "run.ckpt")
    assert info["input"] == model.input_space and info["in_channels"] == (1 if name == "colorization" else 3)
    assert info["backbone"] == ("convnet" if name == "colorization" else "split_brain")
    settings = resolve_data(EvalData(dataset="synthetic_colour", dataset_options={"size": 32, "image_size": SIZE},
                                     num_workers=0, eval_batch_size=16, val_subset=16), info)  # the same 16 (seed 0)
    splits = eval_splits(settings, info["in_channels"])
    feats, _ = extract_features(backbone, splits.loader(splits.val_set(), train=False))
    model.eval()
    images = torch.stack([dm.val_set[i][0] for i in range(len(splits.val_set()))])  # the module's normalised view
    torch.testing.assert_close(feats, model(images), atol=1e-4, rtol=1e-4)
    export_backbone(backbone, info, tmp_path / "export" / "backbone.pt")  # an export keeps the input space too
    exported, meta = load_backbone(tmp_path / "export" / "backbone.pt")
    assert meta["input"] == model.input_space and meta["in_channels"] == info["in_channels"]
    torch.testing.assert_close(extract_features(exported, splits.loader(splits.val_set(), train=False))[0], feats)


def _perturb_weights_and_prior(model: Colorization) -> None:
    perturb_first_parameter(model)
    model.prior_counts.fill_(1.0)  # the resumed run must use the checkpoint's prior, not re-estimate or keep this


def test_colorization_prior_is_kept_by_checkpoints_exact_resume(tmp_path):
    runs = check_resume_is_exact(lambda: _make("colorization", mean=None, std=None), lambda: _data(16), tmp_path,
                                 perturb=_perturb_weights_and_prior)
    assert runs.checkpoint["ssl_lightning"]["backbone_input"] == {"input": "lightness", "in_channels": 1}
    assert "prior_counts" in runs.checkpoint["state_dict"]
    torch.testing.assert_close(runs.resumed.prior_counts, runs.first.prior_counts)
    assert runs.resumed.prior_counts.sum() == 16 * SIZE * SIZE


def test_targets_are_exact_under_mixed_precision():
    """Under bf16 autocast the methods compute Lab, bin distances and losses in float32: the same targets and (with a
    zeroed head, where the logits are exact) the same loss as without autocast."""
    from ssl_lightning.methods.pretext.colour import full_precision

    bins = ab_gamut_bins()
    _, ab = lab_inputs(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(5)))
    exact = quantize_ab(ab, bins)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with full_precision(ab):
            assert torch.equal(quantize_ab(ab, bins), exact)
        model = _make("split_brain")
        _zero(model.ab_head.out)
        _zero(model.l_head.out)
        out = model.loss(model.forward_views([_images()]), [], torch.arange(4))
    assert out["loss"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx(math.log(309) + math.log(100), abs=1e-5)
