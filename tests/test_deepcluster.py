"""DeepCluster (Caron et al. 2018): the PCA-whitening + L2 + k-means pipeline against scikit-learn, the uniform
sampler over clusters, the Sobel front end, the classifier's per-epoch reset with a fresh optimizer state, a
Lightning run logging the NMI between consecutive clusterings, exact resume across an epoch boundary (and mid-
epoch), and the errors. The 2-process check of the gathered features and broadcast labels is in test_ddp.py."""
from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from ssl_lightning import SSLDataModule
from ssl_lightning.backbones.sobel import SobelBackbone
from ssl_lightning.data.cluster_sampler import ClusterUniformSampler, uniform_over_clusters
from ssl_lightning.data.views import ViewConfig
from ssl_lightning.methods import METHODS, DeepCluster
from ssl_lightning.modules.kmeans import ClusterAssignments, cluster, pca_whiten_l2
from ssl_lightning.registry import SSLError

from resume_utils import check_resume_is_exact, trainer  # tests/ is on sys.path

TINY = dict(backbone="convnet", backbone_kwargs={"width": 4}, in_channels=1, num_classes=0)


def blobs(n: int = 600, k: int = 6, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Well-separated Gaussian blobs, with an anisotropic random linear map (so whitening matters)."""
    g = torch.Generator().manual_seed(seed)
    centres = 8 * torch.randn(k, d, generator=g)
    truth = torch.arange(n) % k
    x = centres[truth] + torch.randn(n, d, generator=g)
    return x @ (torch.randn(d, d, generator=g) * torch.linspace(0.2, 3, d)), truth.numpy()


# ---- the clustering pipeline ------------------------------------------------------------------------------------
def test_pca_whitening_and_l2_equal_scikit_learn():
    x, _ = blobs()
    ours = pca_whiten_l2(x, 8)
    ref = F.normalize(torch.from_numpy(PCA(8, whiten=True).fit_transform(x.double().numpy())), dim=1).numpy()
    assert ours.shape == (600, 8) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    # components are defined up to sign, the whitening up to one scale (n vs n - 1): the Gram matrix of the
    # normalised rows is what must agree
    np.testing.assert_allclose(ours @ ours.T, ref @ ref.T, atol=2e-4)
    np.testing.assert_allclose(pca_whiten_l2(x, 0), F.normalize(x, dim=1).numpy(), atol=1e-6)  # no PCA: L2 only


def test_kmeans_pipeline_agrees_with_scikit_learn_on_blobs():
    x, truth = blobs()
    labels, objective = cluster(x, 6, pca_dim=8, niter=20, seed=3)
    ref_x = F.normalize(torch.from_numpy(PCA(8, whiten=True).fit_transform(x.double().numpy())), dim=1).numpy()
    ref = KMeans(6, n_init=10, random_state=0).fit_predict(ref_x)
    assert labels.dtype == torch.long and labels.shape == (600,) and objective > 0
    assert normalized_mutual_info_score(ref, labels.numpy()) > 0.99
    assert adjusted_rand_score(ref, labels.numpy()) > 0.99
    assert normalized_mutual_info_score(truth, labels.numpy()) > 0.99
    assert torch.equal(cluster(x, 6, 8, 20, seed=3)[0], labels)  # seeded


def test_cluster_assignments_keep_previous_and_score_nmi():
    state = ClusterAssignments(6)
    state.update(torch.tensor([0, 0, 1, 1, 2, 2]), epoch=0)
    assert int(state.epoch) == 0 and float(state.nmi_prev) == -1  # nothing to compare with yet
    state.update(torch.tensor([5, 5, 3, 3, 4, 4]), epoch=1)  # the same partition, renamed
    assert torch.equal(state.previous, torch.tensor([0, 0, 1, 1, 2, 2])) and float(state.nmi_prev) == pytest.approx(1)
    assert set(dict(state.named_buffers())) == {"labels", "previous", "epoch", "nmi_prev"}  # in checkpoints


# ---- uniform sampling over clusters -------------------------------------------------------------------------
def test_uniform_sampler_exact_size_balanced_and_never_an_empty_cluster():
    # clusters 0 (1 image), 2 (5), 5 (94); 1, 3, 4 are empty
    labels = torch.tensor([0] + [2] * 5 + [5] * 94)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    for num in (100, 97, 7):
        picked = uniform_over_clusters(labels, num, torch.Generator().manual_seed(1))
        assert picked.shape == (num,) and picked.dtype == torch.long
        counts = torch.bincount(labels[picked], minlength=6)
        assert counts[[1, 3, 4]].sum() == 0  # empty clusters never drawn
        assert set(counts[[0, 2, 5]].tolist()) <= {num // 3, num // 3 + 1} and counts.sum() == num
    picked = uniform_over_clusters(labels, 100, torch.Generator().manual_seed(1))
    big = picked[labels[picked] == 5]
    assert big.unique().numel() == big.numel()  # enough images: without replacement
    assert torch.equal(picked, uniform_over_clusters(labels, 100, torch.Generator().manual_seed(1)))  # seeded
    assert not torch.equal(picked, uniform_over_clusters(labels, 100, torch.Generator().manual_seed(2)))


def test_cluster_sampler_resumes_at_a_position_and_shards_like_distributed_sampler():
    labels = torch.arange(40) % 4
    dataset = list(range(40))
    full = list(ClusterUniformSampler(dataset, lambda e: labels, seed=3, epoch=2))
    assert len(full) == 40 and torch.bincount(labels[[i for i, _ in full]]).tolist() == [10] * 4
    assert list(ClusterUniformSampler(dataset, lambda e: labels, seed=3, epoch=2, skip=13)) == full[13:]
    assert len({s for _, s in full}) == 40  # every position its own augmentation seed
    other = list(ClusterUniformSampler(dataset, lambda e: labels, seed=3, epoch=3))
    assert [i for i, _ in other] != [i for i, _ in full]  # a new order each epoch
    shards = []
    for rank in range(2):  # 2 processes: the positions rank, rank + 2, ... of the one-process order
        s = ClusterUniformSampler(dataset, lambda e: labels, seed=3, epoch=2)
        s.num_replicas, s.rank, s.num_samples, s.total_size = 2, rank, 20, 40
        shards.append(list(s))
    assert shards[0] == full[0::2] and shards[1] == full[1::2]


# ---- the method --------------------------------------------------------------------------------------------
def test_sobel_front_end_is_the_official_fixed_filter():
    torch.manual_seed(0)
    model = DeepCluster(**dict(TINY, in_channels=3), sobel=True, num_clusters=4, pca_dim=4)
    assert isinstance(model.backbone, SobelBackbone) and model.backbone.backbone.features[0].in_channels == 2
    x = torch.randn(2, 3, 8, 8)
    gray = F.conv2d(x, torch.full((1, 3, 1, 1), 1 / 3))
    gx = F.conv2d(gray, torch.tensor([[[[1.0, 0, -1], [2, 0, -2], [1, 0, -1]]]]), padding=1)
    gy = F.conv2d(gray, torch.tensor([[[[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]]]]), padding=1)
    torch.testing.assert_close(model.backbone.front(x), torch.cat([gx, gy], dim=1), atol=1e-5, rtol=1e-5)
    assert not any("sobel" in name for name, _ in model.named_parameters())  # fixed, not trained
    with pytest.raises(SSLError, match="sobel false"):
        DeepCluster(**TINY, sobel=True)


def test_registered_and_errors_name_the_fix():
    assert METHODS.get("deepcluster") is DeepCluster
    with pytest.raises(SSLError, match="num_clusters"):
        DeepCluster(**TINY, num_clusters=50, pca_dim=4, num_samples=32)  # more clusters than images
    with pytest.raises(SSLError, match="pca_dim"):
        DeepCluster(**TINY, num_clusters=4, pca_dim=64, num_samples=32)  # ConvNet width 4: 32-d features
    with pytest.raises(SSLError, match="pca_dim"):
        DeepCluster(**TINY, top_dims=[16, 8], num_clusters=4, pca_dim=12, num_samples=32)  # the top's 8-d output
    model = DeepCluster(**TINY, num_clusters=4, pca_dim=4, num_samples=32)
    model._trainer = SimpleNamespace(datamodule=None)  # trainer.fit(model, train_dataloaders=...)
    with pytest.raises(SSLError, match="SSLDataModule"):
        model.labels_for_epoch(0)
    with pytest.raises(SSLError, match="not built"):
        DeepCluster(**TINY, num_clusters=4, pca_dim=4).loss([torch.randn(2, 32)], [], torch.tensor([0, 1]))


def _data(size: int = 32) -> SSLDataModule:
    return SSLDataModule("synthetic", batch_size=8, num_workers=0, pin_memory=False, image_size=16,
                         views=[ViewConfig(count=1, jitter=0.0, grayscale=0.0)],
                         dataset_options={"size": size, "image_size": 16, "channels": 1})


def _model(**kwargs) -> DeepCluster:
    L.seed_everything(0)
    return DeepCluster(**dict(dict(TINY, num_clusters=4, pca_dim=8, lr=0.5, warmup_epochs=0), **kwargs))


class EpochStart(L.Callback):
    """At each epoch's first batch (before its step): the classifier, its optimizer state, the backbone's."""

    def __init__(self) -> None:
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            opt = trainer.optimizers[0]
            group = next(g for g in opt.param_groups if g.get("name") == "classifier")
            self.rows.append({"weight": pl_module.classifier.weight.detach().clone(),
                              "bias": pl_module.classifier.bias.detach().clone(),
                              "classifier_state": [dict(opt.state.get(p, {})) for p in pl_module.classifier.parameters()],
                              "backbone_state": dict(opt.state.get(next(pl_module.backbone.parameters()), {})),
                              "momentum": group["momentum"], "labels": pl_module.assignments.labels.clone()})


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_classifier_reset_with_fresh_optimizer_state_each_epoch_backbone_keeps_its(optimizer):
    seen = EpochStart()
    model = _model(optimizer=optimizer, cluster_seed=5)
    t = trainer(2, [seen])
    t.fit(model, _data())
    assert len(seen.rows) == 2
    for epoch, row in enumerate(seen.rows):
        want = torch.randn(row["weight"].shape, generator=torch.Generator().manual_seed(5 * 1_000_003 + epoch)) * 0.01
        torch.testing.assert_close(row["weight"], want, atol=0, rtol=0)  # N(0, 0.01), re-drawn for the epoch
        assert torch.equal(row["bias"], torch.zeros(4))
        assert all(not s for s in row["classifier_state"])  # the classifier's optimizer state starts fresh
    if optimizer == "sgd":
        assert row["momentum"] == 0.0  # the official momentum-free top-layer SGD
    key = "momentum_buffer" if optimizer == "sgd" else "exp_avg"
    assert key in seen.rows[1]["backbone_state"]  # the backbone's momentum carries over the epoch boundary
    assert t.optimizers[0].state  # trained


def test_two_epoch_run_clusters_each_epoch_and_logs_the_nmi():
    model = _model(num_classes=10)
    seen = EpochStart()
    t = trainer(2, [seen])
    t.fit(model, _data())
    m = t.callback_metrics
    assert {"train/nmi_prev", "train/kmeans_objective", "train/clusters_nonempty", "train/loss"} <= set(m)
    assert 0 <= float(m["train/nmi_prev"]) <= 1 and float(m["train/clusters_nonempty"]) <= 4
    assert int(model.assignments.epoch) == 1
    assert torch.equal(model.assignments.previous, seen.rows[0]["labels"])  # epoch 0's labels, kept
    assert torch.equal(model.assignments.labels, seen.rows[1]["labels"])
    assert bool((model.assignments.labels >= 0).all()) and torch.isfinite(m["train/loss"])


def _perturb_all(model) -> None:  # restored state must not depend on the fresh model's (buffers included)
    for buf in model.buffers():
        buf.data.copy_(torch.randint_like(buf, 0, 3) if not buf.is_floating_point() else torch.randn_like(buf))
    torch.nn.init.normal_(next(model.parameters()))


@pytest.mark.parametrize("stop_at", [None, 4, 6])  # after epoch 0, at its last step (re-clusters) / mid-epoch 1
def test_deepcluster_resume_is_exact(stop_at, tmp_path):
    runs = check_resume_is_exact(lambda: _model(optimizer="adamw", num_classes=10), _data, tmp_path,
                                 perturb=_perturb_all, stop_at=stop_at)
    assert int(runs.first.assignments.epoch) == (1 if stop_at == 6 else 0)
    assert torch.equal(runs.resumed.assignments.previous, runs.first.assignments.labels if stop_at != 6
                       else runs.first.assignments.previous)
    assert int(runs.resumed.assignments.epoch) == 1
