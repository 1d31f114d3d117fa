"""Unsupervised classification metrics against plain references, and the ClusterMonitor callback."""
from __future__ import annotations

import itertools
import math

import lightning as L
import numpy as np
import pytest
import torch
from sklearn import metrics

from ssl_lightning.callbacks import ClusterMonitor
from ssl_lightning.data import SSLDataModule
from ssl_lightning.evaluation.clustering import cluster_metrics, hungarian_accuracy
from ssl_lightning.methods import SimCLR
from ssl_lightning.registry import SSLError


def brute_force_acc(pred: np.ndarray, labels: np.ndarray) -> float:
    clusters, classes = np.unique(pred), np.unique(labels)
    best = 0
    for perm in itertools.permutations(classes, len(clusters)) if len(clusters) <= len(classes) else []:
        mapping = dict(zip(clusters, perm))
        best = max(best, sum(mapping[p] == y for p, y in zip(pred, labels)))
    return best / len(labels)


def plain_nmi(pred: np.ndarray, labels: np.ndarray) -> float:
    """I(U; V) / ((H(U) + H(V)) / 2), entropies from counts (arithmetic averaging)."""
    n = len(labels)
    def h(x):
        return -sum((c / n) * math.log(c / n) for c in np.unique(x, return_counts=True)[1])
    mi = 0.0
    for a in np.unique(pred):
        for b in np.unique(labels):
            nab = np.sum((pred == a) & (labels == b))
            if nab:
                mi += nab / n * math.log(n * nab / (np.sum(pred == a) * np.sum(labels == b)))
    return mi / ((h(pred) + h(labels)) / 2)


def plain_ari(pred: np.ndarray, labels: np.ndarray) -> float:
    comb = lambda x: x * (x - 1) / 2  # noqa: E731
    table = np.array([[np.sum((pred == a) & (labels == b)) for b in np.unique(labels)] for a in np.unique(pred)])
    index = comb(table).sum()
    rows, cols, total = comb(table.sum(1)).sum(), comb(table.sum(0)).sum(), comb(len(labels))
    expected = rows * cols / total
    return (index - expected) / ((rows + cols) / 2 - expected)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_plain_references(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 4
    labels = rng.integers(0, k, 60)
    pred = np.where(rng.random(60) < 0.6, (labels + 1) % k, rng.integers(0, k, 60))  # a permuted, noisy labelling
    m = cluster_metrics(torch.from_numpy(pred), torch.from_numpy(labels))
    assert m["acc"] == pytest.approx(brute_force_acc(pred, labels))
    assert m["nmi"] == pytest.approx(plain_nmi(pred, labels), abs=1e-10)
    assert m["ari"] == pytest.approx(plain_ari(pred, labels), abs=1e-10)
    assert m["ami"] == pytest.approx(metrics.adjusted_mutual_info_score(labels, pred), abs=1e-12)


def test_hungarian_acc_perfect_under_relabelling_and_extra_clusters() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert hungarian_accuracy(np.array([5, 5, 3, 3, 9, 9]), labels) == 1.0
    # more clusters than classes: the unmatched cluster's samples count as wrong
    assert hungarian_accuracy(np.array([0, 1, 2, 2, 3, 3]), labels) == pytest.approx(5 / 6)


def test_bad_input_is_named() -> None:
    with pytest.raises(SSLError, match="differ in length"):
        hungarian_accuracy([0, 1], [0, 1, 2])
    with pytest.raises(SSLError, match="empty"):
        cluster_metrics([], [])


class _HeadSimCLR(SimCLR):
    """SimCLR with a fixed class head: class = argmax of the first 4 feature dims."""

    def class_probabilities(self, feats: torch.Tensor) -> torch.Tensor:
        return feats[:, :4].softmax(dim=1)


def test_cluster_monitor_logs_metrics_only_for_class_heads(tmp_path) -> None:
    dm = SSLDataModule("synthetic", batch_size=16, num_workers=0, pin_memory=False, image_size=16,
                       dataset_options={"size": 32, "num_classes": 4, "channels": 1, "image_size": 16})
    for cls, expect in ((_HeadSimCLR, True), (SimCLR, False)):
        model = cls(backbone="convnet", in_channels=1, num_classes=4, proj_hidden=16, proj_out=8, warmup_epochs=0)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[ClusterMonitor()],
                            default_root_dir=tmp_path, limit_train_batches=1)
        trainer.fit(model, datamodule=dm)
        logged = {k for k in trainer.callback_metrics if k in ("val/nmi", "val/ami", "val/ari", "val/acc")}
        assert logged == ({"val/nmi", "val/ami", "val/ari", "val/acc"} if expect else set())
        if expect:
            assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0
