"""Unsupervised classification metrics: how well predicted clusters (k-means on features, or the
argmax of a method's class head) match the true classes.

NMI and AMI use scikit-learn's default arithmetic averaging of the two entropies; ARI is
scikit-learn's; ACC is the accuracy after the one-to-one cluster -> class matching that maximises it
(Hungarian algorithm on the confusion matrix, scipy ``linear_sum_assignment``). With more clusters
than classes the unmatched clusters count as wrong.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn import metrics

from ssl_lightning.registry import SSLError


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(np.int64).ravel()


def hungarian_accuracy(pred, labels) -> float:
    """Accuracy of ``pred`` after mapping each cluster to at most one class, the mapping chosen to
    maximise the number of correctly assigned samples."""
    pred, labels = _numpy(pred), _numpy(labels)
    if pred.shape != labels.shape:
        raise SSLError(f"cluster predictions and labels differ in length ({pred.size} vs {labels.size})")
    _, pred = np.unique(pred, return_inverse=True)
    _, labels = np.unique(labels, return_inverse=True)
    confusion = np.zeros((pred.max() + 1, labels.max() + 1), dtype=np.int64)
    np.add.at(confusion, (pred, labels), 1)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    return float(confusion[rows, cols].sum() / max(1, labels.size))


def cluster_metrics(pred, labels) -> dict[str, float]:
    """NMI, AMI, ARI and Hungarian ACC of cluster assignments ``pred`` against class ``labels``."""
    pred, labels = _numpy(pred), _numpy(labels)
    if pred.size == 0:
        raise SSLError("no samples to score: the evaluation split is empty")
    return {
        "nmi": float(metrics.normalized_mutual_info_score(labels, pred)),
        "ami": float(metrics.adjusted_mutual_info_score(labels, pred)),
        "ari": float(metrics.adjusted_rand_score(labels, pred)),
        "acc": hungarian_accuracy(pred, labels),
    }
