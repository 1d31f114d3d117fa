"""Rotation, Jigsaw, ContextPrediction and Siamese: chance-level losses at initialisation (ln 4, ln P, ln 8), each
loss = a plain recomputation from the builders' outputs and the head, the Jigsaw permutation set kept by checkpoints
(exact resume), Siamese with each metric loss = the loss function on the stated pairs, label mode's refusal of
unlabelled data, and short Lightning fits."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from ssl_lightning import SSLDataModule
from ssl_lightning.data.views import ViewConfig
from ssl_lightning.losses.metric import contrastive_margin, infonce, nce, soft_nearest_neighbour
from ssl_lightning.methods import METHODS, ContextPrediction, Jigsaw, Rotation, Siamese
from ssl_lightning.pretext import jigsaw_tiles, maximal_hamming_permutations, patch_pairs, rotate_batch
from ssl_lightning.registry import SSLError

from resume_utils import check_resume_is_exact, fit, perturb_first_parameter  # tests/ is on sys.path
from standins import write_image

SMALL = dict(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=0, optimizer="adamw",
             lr=1e-3, warmup_epochs=0)
JIGSAW = dict(grid=2, num_perms=24, tile=7, tile_size=8, fc6=16, map_side=2, hidden=32)  # 16 px: 8 px cells, 7 px -> 8
CONTEXT = dict(patch=8, gap=2, jitter=1, min_size=4, fc6=16, map_side=2, hidden=32)  # needs 2 * 8 + 2 + 2 = 20 px
NO_FC6 = dict(fc6=0, map_side=0)  # the pieces' pooled backbone features concatenated directly
SIZE = {"rotation": 16, "jigsaw": 16, "context_prediction": 24}


def _views(size: int = 16, b: int = 8, channels: int = 1, n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, channels, size, size, generator=g) for _ in range(n)]


def _make(name: str, **kw):
    L.seed_everything(0)
    extra = {"jigsaw": JIGSAW, "context_prediction": CONTEXT}.get(name, {})
    return METHODS.get(name)(**(SMALL | extra | kw))


def _zero_last_linear(head: torch.nn.Sequential) -> None:
    last = [m for m in head if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.zeros_(last.weight)
    if last.bias is not None:
        torch.nn.init.zeros_(last.bias)


def _loss(model, views):
    return model.loss(model.forward_views(views), views, torch.arange(views[0].shape[0]))


def plain_ce(logits: torch.Tensor, target: torch.Tensor) -> float:
    """-1/N sum_n log softmax(logits_n)[target_n], written out."""
    total = 0.0
    for row, t in zip(logits.double(), target.tolist()):
        total += -(row[t] - torch.log(torch.exp(row).sum())).item()
    return total / len(target)


# ---- chance level and plain recomputation ----------------------------------------------------------------
@pytest.mark.parametrize("name,classes", [("rotation", 4), ("jigsaw", 24), ("context_prediction", 8)])
def test_loss_is_chance_with_a_zeroed_head(name, classes):
    model = _make(name)
    _zero_last_linear(model.head)
    out = _loss(model, _views(SIZE[name]))
    assert float(out["loss"]) == pytest.approx(math.log(classes), abs=1e-6)  # ln 4 = 1.386, ln 24, ln 8 = 2.079


def test_jigsaw_chance_is_ln_p_for_a_3x3_set_of_100():
    model = _make("jigsaw", grid=3, num_perms=100, tile=None, tile_size=8)  # 24 px: 8 px cells, 6 px tiles -> 8
    assert model.permutations.shape == (100, 9)
    _zero_last_linear(model.head)
    assert float(_loss(model, _views(24))["loss"]) == pytest.approx(math.log(100), abs=1e-6)


def test_rotation_loss_is_ce_over_the_rotated_batch():
    model = _make("rotation", hidden=16)
    views = _views(16)
    out = _loss(model, views)
    x4, target = rotate_batch(views[0])
    assert x4.shape[0] == 32 and target.tolist() == [0, 1, 2, 3] * 8
    logits = model.head(model.backbone(x4))
    assert float(out["loss"]) == pytest.approx(plain_ce(logits, target), abs=1e-5)
    assert float(out["accuracy"]) == pytest.approx((logits.argmax(1) == target).float().mean().item())


def _tower(model, pieces: torch.Tensor) -> torch.Tensor:
    """The per-piece tower written out: the ConvNet's last map (its ``features``), a 2 x 2 map here (16 px pieces),
    flattened channel-major, then fc6 = Linear -> BatchNorm -> ReLU; with ``NO_FC6`` the pooled backbone features."""
    if model.hparams.fc6 == 0:
        return model.backbone(pieces)
    fmap = model.backbone.features(pieces)
    assert fmap.shape[-2:] == (2, 2)  # map_side 2: the adaptive pooling is the identity
    linear, norm = model.tower.fc6[0], model.tower.fc6[1]
    h = fmap.flatten(1) @ linear.weight.T + linear.bias
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + norm.eps) * norm.weight + norm.bias
    return h.clamp(min=0)


@pytest.mark.parametrize("kw", [{}, NO_FC6])
def test_jigsaw_loss_is_ce_over_the_permutation_index(kw):
    model = _make("jigsaw", tile_size=16, **kw)
    views = _views(16)
    torch.manual_seed(5)
    out = _loss(model, views)
    torch.manual_seed(5)  # the method's generator outside a trainer: drawn from the global RNG, as the builder's
    tiles, target = jigsaw_tiles(views[0], model.permutations, grid=2, tile=7)
    assert tiles.shape == (8, 4, 1, 7, 7)
    up = F.interpolate(tiles.flatten(0, 1), size=16, mode="bilinear", align_corners=False)
    feats = _tower(model, up)  # (32, W): the tiles of image b are rows 4b..4b+3, in position order
    assert feats.shape[1] == (16 if kw == {} else model.backbone.num_features)
    concat = torch.stack([torch.cat([feats[4 * b + i] for i in range(4)]) for b in range(8)])
    assert float(out["loss"]) == pytest.approx(plain_ce(model.head(concat), target), abs=1e-5)


@pytest.mark.parametrize("kw", [{}, NO_FC6])
def test_context_prediction_loss_is_ce_over_the_position_on_grey_images(kw):
    model = _make("context_prediction", patch_size=16, **kw)  # patches upsampled before the encoder
    views = _views(24)  # 1 channel: no chromatic-aberration step (it applies to colour input only)
    torch.manual_seed(3)
    out = _loss(model, views)
    torch.manual_seed(3)
    first, second, target = patch_pairs(views[0], 8, 2, 1, min_size=4)
    assert first.shape == (8, 1, 8, 8)
    f = _tower(model, F.interpolate(torch.cat([first, second]), size=16, mode="bilinear", align_corners=False))
    logits = model.head(torch.cat([f[:8], f[8:]], dim=1))
    assert float(out["loss"]) == pytest.approx(plain_ce(logits, target), abs=1e-5)
    if kw:  # as cropped (8 px) without the tower
        model = _make("context_prediction", **kw)
        torch.manual_seed(3)
        out = _loss(model, views)
        f = model.backbone(torch.cat([first, second]))
        assert float(out["loss"]) == pytest.approx(plain_ce(model.head(torch.cat([f[:8], f[8:]], dim=1)), target),
                                                   abs=1e-5)


def test_too_small_pieces_get_a_clear_error():
    model = _make("jigsaw", tile=5, tile_size=None)  # 5 px tiles: the ConvNet's three poolings need 8
    with pytest.raises(SSLError, match="cannot encode 5x5 px pieces.*tile_size"):
        _loss(model, _views(16))
    with pytest.raises(SSLError, match="cannot choose 30 of 24"):
        _make("jigsaw", num_perms=30)
    with pytest.raises(SSLError, match="map_side=2 flattens the feature map for fc6, but fc6=0"):
        _make("context_prediction", fc6=0)
    with pytest.raises(SSLError, match="must be >= 0"):
        _make("jigsaw", fc6=-1)
    with pytest.raises(SSLError, match="nesterov needs optimizer: sgd"):
        _make("rotation", nesterov=True)  # SMALL uses adamw


@pytest.mark.parametrize("name", ["jigsaw", "context_prediction"])
def test_pieces_pass_leaves_running_statistics_to_whole_images(name):
    """Tiles / patches normalise with their own batch statistics; the running statistics (what kNN and frozen
    evaluations use) come from the base pass over whole images only."""
    model = _make(name)
    views = _views(SIZE[name])
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    snapshot = lambda: [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in norms]  # noqa: E731
    start = snapshot()
    feats = model.forward_views(views)  # the base pass: updates them
    after_images = snapshot()
    assert not torch.equal(start[0][0], after_images[0][0]) and after_images[0][2] == 1
    out = model.loss(feats, views, torch.arange(8))
    for (mean, var, count), (mean2, var2, count2) in zip(after_images, snapshot()):
        assert torch.equal(mean, mean2) and torch.equal(var, var2) and count == count2
    out["loss"].backward()
    assert model.backbone.features[0].weight.grad.abs().sum() > 0  # the task still trains the encoder
    model.eval()  # in eval mode the pieces use the running statistics, as any input
    model.loss(model.forward_views(views), views, torch.arange(8))


# ---- Jigsaw's permutation set: a buffer, kept by checkpoints ------------------------------------------------------
def test_jigsaw_permutations_are_a_buffer_that_checkpoints_keep(tmp_path):
    model = _make("jigsaw", grid=3, num_perms=10, tile=None, tile_size=8, perm_seed=1)
    assert torch.equal(model.permutations, maximal_hamming_permutations(9, 10, seed=1))
    assert "permutations" in model.state_dict()
    other = _make("jigsaw", grid=3, num_perms=10, tile=None, tile_size=8, perm_seed=2)
    assert not torch.equal(other.permutations, model.permutations)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "j.ckpt")
    loaded = Jigsaw.load_from_checkpoint(tmp_path / "j.ckpt")
    assert torch.equal(loaded.permutations, model.permutations)
    other.load_state_dict(torch.load(tmp_path / "j.ckpt", weights_only=True)["state_dict"])
    assert torch.equal(other.permutations, model.permutations)  # the saved set wins over the fresh seed's


def _data(size: int = 16, views: int = 1, channels: int = 1, n: int = 24) -> SSLDataModule:
    return SSLDataModule("synthetic", batch_size=8, num_workers=0, pin_memory=False, image_size=size,
                         views=[ViewConfig(size=size, count=views, scale=(0.5, 1.0))],
                         dataset_options={"size": n, "image_size": size, "channels": channels})


def _perturb_weights_and_permutations(model: Jigsaw) -> None:
    perturb_first_parameter(model)
    model.permutations.copy_(model.permutations.flip(0))  # the resumed run must use the checkpoint's set


def test_jigsaw_exact_resume(tmp_path):
    """Also the builders' per-step generator: the tiles and permutation labels of epoch 2 are the same."""
    runs = check_resume_is_exact(lambda: _make("jigsaw", num_classes=10), _data, tmp_path,
                                 perturb=_perturb_weights_and_permutations)
    assert torch.equal(runs.resumed.permutations, maximal_hamming_permutations(4, 24, 0))


# ---- Siamese: each loss = the function on the stated pairs --------------------------------------------------
def _embeddings(n: int = 6, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["instances", "labels"])
def test_siamese_margin_loss_is_all_cross_view_pairs(mode):
    model = _make("siamese", loss="contrastive_margin", margin=0.8, pairs=mode)
    z1, z2 = _embeddings()
    labels = torch.tensor([0, 1, 0, 2, 1, 0]) if mode == "labels" else None
    u1, u2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    total, pairs = 0.0, 0
    for i in range(6):
        for j in range(6):
            similar = (i == j) if labels is None else bool(labels[i] == labels[j])
            total += contrastive_margin.contrastive_margin_loss(u1[i:i + 1], u2[j:j + 1], torch.tensor([similar]), 0.8)
            pairs += 1
    assert float(model.pair_loss(z1, z2, labels)) == pytest.approx(float(total / pairs), abs=1e-10)


def test_siamese_info_nce_instances_is_symmetric_in_batch_info_nce():
    model = _make("siamese", loss="info_nce", temperature=0.2)
    z1, z2 = _embeddings()
    want = 0.5 * (infonce.info_nce(z1, z2, None, 0.2) + infonce.info_nce(z2, z1, None, 0.2))
    assert float(model.pair_loss(z1, z2)) == pytest.approx(float(want), abs=1e-10)


def test_siamese_info_nce_labels_is_one_info_nce_term_per_positive_pair():
    model = _make("siamese", loss="info_nce", temperature=0.2, pairs="labels")
    z1, z2 = _embeddings()
    labels = torch.tensor([0, 1, 0, 2, 1, 0])

    def direction(a, b):
        terms = []
        for i in range(6):
            for p in range(6):
                if labels[i] == labels[p]:  # negatives: every other candidate (other positives included)
                    others = torch.cat([b[:p], b[p + 1:]])[None]  # (1, N - 1, d)
                    terms.append(infonce.info_nce(a[i:i + 1], b[p:p + 1], others, 0.2))
        return sum(terms) / len(terms)

    want = 0.5 * (direction(z1, z2) + direction(z2, z1))
    assert float(model.pair_loss(z1, z2, labels)) == pytest.approx(float(want), abs=1e-10)


@pytest.mark.parametrize("mode", ["instances", "labels"])
def test_siamese_nce_is_uniform_noise_over_the_batch(mode):
    model = _make("siamese", loss="nce", temperature=0.5, pairs=mode)
    with torch.no_grad():
        model.log_z.fill_(0.3)
    z1, z2 = _embeddings()
    labels = torch.tensor([0, 1, 0, 2, 1, 0]) if mode == "labels" else None
    u1, u2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)

    def direction(a, b):
        data, noise = [], []
        for i in range(6):
            for j in range(6):
                pos = (i == j) if labels is None else bool(labels[i] == labels[j])
                (data if pos else noise).append(float(a[i] @ b[j]) / 0.5 - 0.3)
        data, noise = torch.tensor(data, dtype=torch.float64), torch.tensor(noise, dtype=torch.float64)
        return nce.nce_loss(log_p_model_data=data, log_p_noise_data=torch.full_like(data, -math.log(6)),
                            log_p_model_noise=noise, log_p_noise_noise=torch.full_like(noise, -math.log(6)))

    want = 0.5 * (direction(u1, u2) + direction(u2, u1))
    assert float(model.pair_loss(z1, z2, labels)) == pytest.approx(float(want), abs=1e-6)
    assert "log_z" in model.state_dict()


@pytest.mark.parametrize("mode", ["instances", "labels"])
def test_siamese_soft_nearest_neighbour_on_both_views(mode):
    model = _make("siamese", loss="soft_nearest_neighbour", temperature=0.5, pairs=mode)
    z1, z2 = _embeddings()
    labels = torch.tensor([0, 1, 0, 2, 1, 0]) if mode == "labels" else None
    ids = torch.arange(6) if labels is None else labels
    x = F.normalize(torch.cat([z1, z2]), dim=1)
    want = soft_nearest_neighbour.soft_nearest_neighbour_loss(x, torch.cat([ids, ids]), 0.5)
    assert float(model.pair_loss(z1, z2, labels)) == pytest.approx(float(want), abs=1e-10)


def test_siamese_loss_embeds_both_views_with_one_head():
    model = _make("siamese", loss="info_nce")
    views = _views(16)
    model.batch_labels = torch.zeros(8, dtype=torch.long)
    feats = model.forward_views(views)
    z1, z2 = model.head(torch.cat(feats)).chunk(2)
    assert float(model.loss(feats, views, torch.arange(8))) == pytest.approx(float(model.pair_loss(z1, z2)), abs=1e-6)


def test_siamese_label_mode_refuses_unlabelled_data():
    model = _make("siamese", pairs="labels")
    views = _views(16)
    model.batch_labels = torch.tensor([0, 1, -1, 2, -1, 0, 1, 2])
    with pytest.raises(SSLError, match="pairs: labels got 2 unlabelled images .*use pairs: instances"):
        _loss(model, views)
    with pytest.raises(SSLError, match="two views per image"):
        _loss(model, views[:1])
    with pytest.raises(SSLError, match="unknown loss 'triplet'"):
        _make("siamese", loss="triplet")


# ---- through Lightning: short fits, and the loss drops on a tiny fixed batch ------------------------------------
class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(trainer.callback_metrics["train/loss"]))


@pytest.mark.parametrize("name,kw", [("rotation", {}), ("jigsaw", {"tile_size": 8}), ("context_prediction", {}),
                                     ("siamese", {"loss": "info_nce"}),
                                     ("siamese", {"loss": "contrastive_margin", "pairs": "labels"})])
def test_short_fit_runs_through_lightning(name, kw):
    rec = Losses()
    views = 2 if name == "siamese" else 1
    fit(_make(name, num_classes=None, **kw), _data(SIZE.get(name, 16), views), max_epochs=1, callbacks=[rec],
        log_every_n_steps=1)
    assert len(rec.values) == 3 and all(math.isfinite(v) for v in rec.values)


def test_siamese_label_mode_refuses_a_dataset_without_classes(tmp_path):
    for i in range(8):  # a flat folder of images: unlabelled (label -1, no classes)
        write_image(tmp_path / f"img{i}.png", size=(16, 16), seed=i)
    data = SSLDataModule("image_folder", root=str(tmp_path), batch_size=8, num_workers=0, pin_memory=False,
                         image_size=16, views=[ViewConfig(size=16, count=2)])
    assert data.num_classes == 0
    with pytest.raises(SSLError, match="needs a labelled training set.*use pairs: instances"):
        fit(_make("siamese", pairs="labels", in_channels=3, num_classes=None), data, max_epochs=1)


@pytest.mark.parametrize("name,kw", [("rotation", {}), ("jigsaw", {"tile_size": 8}), ("context_prediction", {}),
                                     ("siamese", {"loss": "contrastive_margin"}), ("siamese", {"loss": "nce"}),
                                     ("siamese", {"loss": "info_nce"}), ("siamese", {"loss": "soft_nearest_neighbour"})])
def test_loss_drops_on_a_tiny_fixed_batch(name, kw):
    model = _make(name, **kw)
    views = _views(SIZE.get(name, 16), seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    values = []
    for _ in range(25):
        torch.manual_seed(0)  # the same tiles / patches / positions every step: a fixed batch
        loss = _loss(model, views)
        loss = loss["loss"] if isinstance(loss, dict) else loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(float(loss))
    assert values[-1] < 0.7 * values[0], values
