"""Batched on-device augmentation (ssl_lightning/data/batch_views.py) against the per-image torchvision
pipeline of views.py: the same parameter distributions (KS tests, binomial tolerances), the same outputs
for fixed parameters (torchvision.transforms.v2.functional), and the data module's ``augment="device"``."""
from __future__ import annotations

import itertools
import math
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from scipy.stats import chi2_contingency, ks_2samp
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, str(Path(__file__).parent))
import standins  # noqa: E402

from ssl_lightning import SSLDataModule, ViewConfig  # noqa: E402
from ssl_lightning.data import batch_views as bv  # noqa: E402
from ssl_lightning.data.batch_views import BatchMultiView  # noqa: E402
from ssl_lightning.data.datamodule import collate_raw  # noqa: E402
from ssl_lightning.data.views import _blur_kernel, build_view, view_preset  # noqa: E402
from ssl_lightning.registry import SSLError  # noqa: E402

P_MIN = 1e-3  # KS / chi-square p-value floor; every draw is seeded, so the tests are deterministic
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
# every op on and every jitter kind in play; saturation 1.2 exercises the clipped lower bound max(0, 1 - s)
FULL = ViewConfig(size=24, hflip=0.5, jitter=0.8, brightness=0.4, contrast=0.6, saturation=1.2, hue=0.1,
                  grayscale=0.2, blur=0.5, solarize=0.3)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def crop_tol(height: int, width: int) -> float:
    """grid_sample and F.interpolate compute the same bilinear weights; they differ only by float32 rounding of
    the source coordinate (normalised to [-1, 1] and back), a few ulps of the largest coordinate, i.e.
    ~max(H, W) 2^-24 each; times a pixel range of 1 this bounds the value difference. 8 ulps of headroom."""
    return 8 * max(height, width) * 2.0**-24 + 1e-6


# ---- parameter distributions vs the per-image pipeline ----------------------------------------------------
@pytest.mark.parametrize("height,width,scale", [(32, 32, (0.08, 1.0)), (32, 32, (0.05, 0.14)), (20, 90, (0.08, 1.0))])
def test_crop_distribution_matches_random_resized_crop(height, width, scale):
    """Crop area fraction, log aspect ratio and position: ours vs torchvision's RandomResizedCrop.make_params
    (the 20 x 90 image has an aspect ratio outside [3/4, 4/3]: many samples take the centre-crop fallback)."""
    n_ours, n_tv = 20000, 6000
    top, left, h, w = bv.sample_crops(n_ours, height, width, scale, gen(0))
    rrc = v2.RandomResizedCrop(16, scale=scale, antialias=True)  # what build_view uses
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    torch.manual_seed(1)
    tv = torch.tensor([[p["top"], p["left"], p["height"], p["width"]] for p in
                       (rrc.make_params([image]) for _ in range(n_tv))], dtype=torch.float64)

    def stats(t, l, hh, ww):
        t, l, hh, ww = (x.double() for x in (t, l, hh, ww))
        return {"area": hh * ww / (height * width), "log_ratio": torch.log(ww / hh),
                "top": (t + 0.5) / (height - hh + 1), "left": (l + 0.5) / (width - ww + 1)}

    ours, theirs = stats(top, left, h, w), stats(*tv.unbind(1))
    assert ((h >= 1) & (h <= height) & (w >= 1) & (w <= width)).all()
    assert ((top >= 0) & (top + h <= height) & (left >= 0) & (left + w <= width)).all()
    for key in ours:
        p = ks_2samp(ours[key].numpy(), theirs[key].numpy()).pvalue
        assert p > P_MIN, (key, p)


def _pipeline_parts(cfg: ViewConfig) -> dict:
    """The random transforms of build_view's per-image pipeline for ``cfg``."""
    parts = {}
    for t in build_view(cfg, MEAN, STD).transforms:
        if isinstance(t, v2.RandomHorizontalFlip):
            parts["flip"] = t
        elif isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.ColorJitter):
            parts["jitter"], parts["cj"] = t, t.transforms[0]
        elif isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur):
            parts["blur"], parts["gb"] = t, t.transforms[0]
        elif isinstance(t, v2.RandomGrayscale):
            parts["gray"] = t
        elif isinstance(t, v2.RandomSolarize):
            parts["solarize"] = t
    return parts


def test_jitter_blur_and_probabilities_match_build_view():
    """Apply-probabilities (binomial, 5 sigma), jitter factors and blur sigma (KS against the pipeline's own
    ColorJitter / GaussianBlur make_params), jitter op order (chi-square against ColorJitter's fn_idx)."""
    n, n_tv = 20000, 4000
    parts = _pipeline_parts(FULL)
    p = bv.sample_view_params(FULL, n, 32, 32, gen(2))
    masks = {"flip": p.flip, "jitter": p.jitter, "gray": p.gray, "blur": p.blur, "solarize": p.solarize}
    for key, mask in masks.items():
        prob = parts[key].p
        rate = mask.double().mean().item()
        assert abs(rate - prob) < 5 * math.sqrt(prob * (1 - prob) / n), (key, rate, prob)

    torch.manual_seed(3)
    tv = [parts["cj"].make_params([]) for _ in range(n_tv)]
    for k, name in enumerate(["brightness", "contrast", "saturation", "hue"]):
        low, high = getattr(parts["cj"], name)  # the pipeline's factor range
        assert bv.jitter_ranges(FULL)[k] == pytest.approx((low, high))
        ours = p.factors[:, k]
        assert low <= ours.min() and ours.max() <= high
        theirs = torch.tensor([d[f"{name}_factor"] for d in tv])
        assert ks_2samp(ours.numpy(), theirs.numpy()).pvalue > P_MIN, name

    perms = list(itertools.permutations(range(4)))
    count = lambda orders: [sum(tuple(o) == q for o in orders) for q in perms]  # noqa: E731
    ours_perm = count(p.order[:n_tv].tolist())
    theirs_perm = count([d["fn_idx"].tolist() for d in tv])
    assert min(ours_perm) > 0
    assert chi2_contingency([ours_perm, theirs_perm]).pvalue > P_MIN

    sigmas = torch.tensor([parts["gb"].make_params([])["sigma"][0] for _ in range(n_tv)])
    assert ks_2samp(p.sigma.numpy(), sigmas.numpy()).pvalue > P_MIN
    assert tuple(parts["gb"].kernel_size) == (_blur_kernel(FULL.size),) * 2


def test_disabled_jitter_ops_and_per_view_independence():
    cfg = ViewConfig(size=16, count=2, brightness=0.0, contrast=0.3, saturation=0.0, hue=0.0)
    assert bv.jitter_ranges(cfg) == [None, (0.7, 1.3), None, None]
    assert _pipeline_parts(cfg)["cj"].brightness is None  # ColorJitter skips the op too
    batch = 4000
    (p,) = BatchMultiView([cfg], (0.5,), (0.5,)).sample(batch, 32, 32, gen(4))
    assert p.top.shape == (2 * batch,)
    assert (p.factors[:, [0, 2]] == 1).all() and (p.factors[:, 3] == 0).all()
    first, second = p.slice(0, batch), p.slice(batch, 2 * batch)  # the two views of each sample
    area = lambda q: (q.height * q.width).double()  # noqa: E731
    corr = torch.corrcoef(torch.stack([area(first), area(second)]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(batch)
    assert (first.flip != second.flip).any() and not torch.equal(first.factors, second.factors)


def test_bad_strengths_raise():
    with pytest.raises(SSLError, match="hue"):
        BatchMultiView([ViewConfig(size=8, hue=0.7)], (0.5,), (0.5,))
    with pytest.raises(SSLError, match="size"):
        BatchMultiView([ViewConfig()], (0.5,), (0.5,))
    with pytest.raises(SSLError, match="channels"):
        BatchMultiView([ViewConfig(size=8)], MEAN, STD)(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


# ---- fixed parameters: each op vs torchvision.transforms.v2.functional --------------------------------------
@pytest.mark.parametrize("height,width", [(32, 32), (28, 28), (40, 56), (96, 96)])
def test_resized_crop_matches_torchvision(height, width):
    n = 24
    x = torch.rand(n, 3, height, width, generator=gen(5))
    for size, scale in [(32, (0.08, 1.0)), (13, (0.05, 0.14)), (height, (0.5, 1.0))]:
        top, left, h, w = bv.sample_crops(n, height, width, scale, gen(size))
        out = bv.resized_crop(x, top, left, h, w, size)
        ref = torch.stack([TF.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [size, size],
                                           antialias=False) for i in range(n)])
        assert out.shape == (n, 3, size, size)
        assert (out - ref).abs().max() <= crop_tol(height, width), (size, (out - ref).abs().max())


@pytest.mark.parametrize("channels", [3, 1])
def test_colour_ops_match_torchvision(channels):
    """Brightness, contrast, saturation, hue (identity on one channel, as in torchvision), grayscale, blur,
    solarise, flip -- per-sample factors vs the functional op sample by sample; float32 rounding only."""
    n = 12
    x = torch.rand(n, channels, 20, 17, generator=gen(6))
    x[0] = 0.5  # a flat (grey) image: hue and saturation undefined in HSV
    g = gen(7)
    factor = 2 * torch.rand(n, generator=g)
    hue = torch.rand(n, generator=g) - 0.5
    sigma = 0.1 + 1.9 * torch.rand(n, generator=g)
    mask = torch.rand(n, generator=g) < 0.5
    cases = [
        (bv.adjust_brightness(x, factor), [TF.adjust_brightness(x[i], float(factor[i])) for i in range(n)]),
        (bv.adjust_contrast(x, factor), [TF.adjust_contrast(x[i], float(factor[i])) for i in range(n)]),
        (bv.adjust_saturation(x, factor), [TF.adjust_saturation(x[i], float(factor[i])) for i in range(n)]),
        (bv.adjust_hue(x, hue), [TF.adjust_hue(x[i], float(hue[i])) for i in range(n)]),
        (bv.rgb_to_grayscale(x), [TF.rgb_to_grayscale(x[i], num_output_channels=channels) for i in range(n)]),
        (bv.gaussian_blur(x, sigma, 5), [TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2) for i in range(n)]),
        (bv.solarize(x), [TF.solarize(x[i], 0.5) for i in range(n)]),
        (bv.hflip(x, mask), [TF.horizontal_flip(x[i]) if mask[i] else x[i] for i in range(n)]),
    ]
    for k, (ours, ref) in enumerate(cases):
        assert ours.shape == x.shape
        assert (ours - torch.stack(ref)).abs().max() < 1e-5, k
    if channels == 1:
        assert torch.equal(bv.adjust_hue(x, hue), x) and torch.equal(bv.adjust_saturation(x, factor), x)
    else:
        assert (bv.adjust_hue(x, hue) - x).abs().max() > 0.1  # the check above is not vacuous


def _reference_view(image: torch.Tensor, cfg: ViewConfig, p: bv.ViewParams, i: int) -> torch.Tensor:
    """View ``i`` by build_view's own random transforms, called with our parameters (crop: antialias=False)."""
    parts = _pipeline_parts(cfg)
    y = TF.resized_crop(image, int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i]),
                        [cfg.size, cfg.size], antialias=False)
    if p.flip[i]:
        y = TF.horizontal_flip(y)
    if "cj" in parts and p.jitter[i]:
        cj = parts["cj"]
        names = ["brightness", "contrast", "saturation", "hue"]
        params = {f"{name}_factor": None if getattr(cj, name) is None else float(p.factors[i, k])
                  for k, name in enumerate(names)}
        y = cj.transform(y, {"fn_idx": p.order[i], **params})
    if "gray" in parts and p.gray[i]:
        y = TF.rgb_to_grayscale(y, num_output_channels=y.shape[0])
    if "gb" in parts and p.blur[i]:
        y = parts["gb"].transform(y, {"sigma": [float(p.sigma[i])] * 2})
    if "solarize" in parts and p.solarize[i]:
        y = TF.solarize(y, 0.5)
    return y


@pytest.mark.parametrize("channels", [3, 1])
def test_batch_multi_view_matches_pipeline_for_fixed_params(channels):
    """Whole views (crop, flip, jitter in each sample's order, grayscale, blur, solarise, normalise) against
    the per-image pipeline's transforms run with the same parameters, for a global and a local view kind.
    Tolerance: float32 rounding only -- the crop's (< 2e-6 at 30 px, see crop_tol) and ~1e-7 per colour op,
    amplified by jitter factors (<= 2.2) and 1 / std (<= 5); 2e-5 measured, 1e-4 asserted. A wrong op order,
    factor or mask gives errors of order 0.1."""
    b, size = 16, 30
    mean, std = MEAN[:channels], STD[:channels]
    views = [FULL, replace(FULL, size=11, count=2, scale=(0.05, 0.3), blur=1.0, hflip=1.0)]
    images = torch.randint(0, 256, (b, channels, size, size), generator=gen(8), dtype=torch.uint8)
    bmv = BatchMultiView(views, mean, std)
    out = bmv(images, gen(9))
    params = bmv.sample(b, size, size, gen(9))  # __call__ draws exactly these
    assert [tuple(v.shape) for v in out] == [(b, channels, 24, 24)] + [(b, channels, 11, 11)] * 2
    x = images.float() / 255
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    for (cfg, p), first in [((views[0], params[0]), 0), ((views[1], params[1]), 1)]:
        for j in range(first, first + cfg.count):  # output view index; its parameters are rows (j-first)*b + i
            for i in range(b):
                ref = (_reference_view(x[i], cfg, p, (j - first) * b + i) - m) / s
                err = (out[j][i] - ref).abs().max().item()
                assert err < 1e-4, (j, i, err)
    assert not torch.equal(out[1], out[2])  # the two local views differ


def test_identity_config_is_the_normalised_image():
    """Full-image crop (scale 1: only the aspect ratio 1 fits, else the centre fallback = whole square image),
    no flip or colour ops: the view is exactly the normalised image -- on the uint8 path too."""
    cfg = ViewConfig(size=20, scale=(1.0, 1.0), hflip=0.0, jitter=0.0, grayscale=0.0)
    images = torch.randint(0, 256, (8, 3, 20, 20), generator=gen(10), dtype=torch.uint8)
    (view,) = BatchMultiView([cfg], MEAN, STD)(images, gen(11))
    expected = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert (view - expected).abs().max() < 1e-5


def test_multicrop_preset_shapes_and_randomness():
    views = view_preset("multicrop", 32, num_local=3)
    bmv = BatchMultiView(views, MEAN, STD)
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=gen(12), dtype=torch.uint8)
    out = bmv(images, gen(13))
    assert [v.shape[-1] for v in out] == [32, 32, 14, 14, 14] and all(v.dtype == torch.float32 for v in out)
    again = bmv(images, gen(13))
    assert all(torch.equal(a, c) for a, c in zip(out, again))  # same generator seed, same views
    other = bmv(images, gen(14))
    assert not any(torch.equal(a, c) for a, c in zip(out, other))
    assert not torch.equal(out[0][0], out[0][1])  # samples get their own parameters
    no_locals = BatchMultiView(view_preset("multicrop", 32, num_local=0), MEAN, STD)(images, gen(13))
    assert [v.shape[-1] for v in no_locals] == [32, 32]  # a config with count 0 gives no views


# ---- the data module's switch --------------------------------------------------------------------------
def _dm(**kwargs) -> SSLDataModule:
    options = kwargs.pop("dataset_options", {"size": 24})
    return SSLDataModule(**{"dataset": "synthetic", "batch_size": 4, "num_workers": 0, "pin_memory": False,
                            "dataset_options": options, **kwargs})


@pytest.mark.parametrize("preset,channels", [("simclr", 3), ("multicrop", 1)])
def test_device_mode_batches(preset, channels):
    dm = _dm(views=preset, augment="device", num_local_crops=2,
             dataset_options={"size": 24, "channels": channels, "image_size": 16})
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    images, labels, indices, seed = raw
    assert images.dtype == torch.uint8 and images.shape == (4, channels, 16, 16) and isinstance(seed, int)
    assert all(torch.equal(images[k], dm.pretrain_set.base[int(i)][0]) for k, i in enumerate(indices))  # un-augmented
    views, labels2, indices2 = dm.on_after_batch_transfer(raw, 0)
    assert torch.equal(labels, labels2) and torch.equal(indices, indices2)
    sizes = [16, 16] + ([8, 8] if preset == "multicrop" else [])
    assert [tuple(v.shape) for v in views] == [(4, channels, s, s) for s in sizes]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views) and views[0].min() < 0
    again, _, _ = dm.on_after_batch_transfer(raw, 0)
    assert all(torch.equal(a, c) for a, c in zip(views, again))  # seeded by the batch: reproducible
    dm.trainer = SimpleNamespace(training=False)  # validation: batches pass untouched
    assert dm.on_after_batch_transfer(raw, 0) is raw


def test_batch_seed_follows_data_seed_epoch_and_indices():
    dm = _dm(augment="device", seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = next(iter(loader))
    assert next(iter(loader))[3] == first[3]  # same epoch, same order, same seed
    loader.sampler.set_epoch(1)
    assert next(iter(loader))[3] != first[3]
    items = [dm.pretrain_set[(i, 100 + i)] for i in range(4)]
    assert collate_raw(items)[3] == collate_raw(list(items))[3]  # a function of the samples' seeds only
    assert collate_raw(items)[3] != collate_raw([dm.pretrain_set[(i, 200 + i)] for i in range(4)])[3]
    assert collate_raw([dm.pretrain_set[i] for i in range(4)])[3] is None  # unseeded: torch's global RNG
    with pytest.raises(SSLError, match="augment"):
        _dm(augment="gpu")


def test_identity_views_same_in_workers_and_device_mode():
    cfg = ViewConfig(count=2, scale=(1.0, 1.0), hflip=0.0, jitter=0.0, grayscale=0.0)
    batches = {}
    for mode in ("workers", "device"):
        dm = _dm(views=[cfg], augment=mode)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        batches[mode] = dm.on_after_batch_transfer(batch, 0)
    (v_w, l_w, i_w), (v_d, l_d, i_d) = batches["workers"], batches["device"]
    assert torch.equal(i_w, i_d) and torch.equal(l_w, l_d)
    assert all((a - c).abs().max() < 1e-5 for a, c in zip(v_w, v_d))


def test_variable_size_folder_loads_at_load_size(tmp_path):
    root = standins.write_flat_folder(tmp_path / "flat", n=8)  # images of 40 x 52 and 48 x 40
    dm = SSLDataModule(dataset="image_folder", root=str(root), image_size=24, batch_size=4, num_workers=0,
                       pin_memory=False, augment="device")
    assert dm.load_size == 27  # round(24 / 0.875)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (4, 3, 27, 27) and batch[0].dtype == torch.uint8
    views, labels, _ = dm.on_after_batch_transfer(batch, 0)
    assert [tuple(v.shape) for v in views] == [(4, 3, 24, 24)] * 2 and (labels == -1).all()


def test_fit_with_device_augmentation():
    """Lightning calls the hook: the method trains on float views, and validation batches stay un-augmented."""
    from ssl_lightning.methods.joint_embedding.simclr import SimCLR

    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([tuple(v.shape) for v in batch[0]])

    L.seed_everything(0)
    model = SimCLR(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=10, proj_hidden=16,
                   proj_out=8, optimizer="sgd", lr=0.1)
    dm = _dm(augment="device", batch_size=8, image_size=16,
             dataset_options={"size": 16, "image_size": 16, "channels": 1})
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        num_sanity_val_steps=0, callbacks=[Spy()])
    trainer.fit(model, dm)
    assert seen == [[(8, 1, 16, 16)] * 2] * 2
    assert "val/probe_top1" in trainer.callback_metrics  # the validation batch reached validation_step as is
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
