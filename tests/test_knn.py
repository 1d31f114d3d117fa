"""Weighted kNN (Wu et al. 2018) against a brute-force reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.evaluation import weighted_knn


def knn_reference(train_features, train_labels, query_features, num_classes, k, temperature):
    """Full similarity matrix, top-k, votes exp(s/T), argmax; bank rows labelled -1 are dropped."""
    keep = train_labels >= 0
    bank = F.normalize(train_features[keep].double(), dim=1)
    labels = train_labels[keep]
    queries = F.normalize(query_features.double(), dim=1)
    sims = queries @ bank.T
    k = min(k, bank.shape[0])
    top_s, top_i = sims.topk(k, dim=1)
    labels = labels.tolist()
    preds = []
    for q in range(queries.shape[0]):
        votes = [0.0] * num_classes
        for s, i in zip(top_s[q].tolist(), top_i[q].tolist()):
            votes[labels[i]] += math.exp(s / temperature)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


def _clustered(n_bank: int, n_query: int, dim: int, num_classes: int, seed: int):
    """Features near class centres (so predictions are not all one class), with noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    bank_labels = torch.randint(0, num_classes, (n_bank,), generator=g)
    query_labels = torch.randint(0, num_classes, (n_query,), generator=g)
    bank = centres[bank_labels] + 1.5 * torch.randn(n_bank, dim, generator=g)
    queries = centres[query_labels] + 1.5 * torch.randn(n_query, dim, generator=g)
    return bank, bank_labels, queries, query_labels


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 1024])
@pytest.mark.parametrize("k,temperature", [(1, 0.1), (20, 0.07), (200, 0.1), (1000, 0.5)])
def test_weighted_knn_matches_brute_force(chunk_size, k, temperature):
    bank, bank_labels, queries, query_labels = _clustered(500, 40, 16, 7, seed=chunk_size + k)
    pred = weighted_knn(bank, bank_labels, queries, 7, k=k, temperature=temperature, chunk_size=chunk_size)
    ref = knn_reference(bank, bank_labels, queries, 7, k, temperature)
    assert pred.shape == (40,) and pred.dtype == torch.long
    assert torch.equal(pred, ref)
    assert len(pred.unique()) > 1


def test_weighted_knn_chunked_merge_equals_single_chunk():
    """chunk_size=8 -> bank chunks of 128 rows: four running top-k merges over 500 rows, k=200 > 128."""
    bank, bank_labels, queries, _ = _clustered(500, 50, 12, 5, seed=11)
    small = weighted_knn(bank, bank_labels, queries, 5, k=200, temperature=0.1, chunk_size=8)
    big = weighted_knn(bank, bank_labels, queries, 5, k=200, temperature=0.1, chunk_size=4096)
    assert torch.equal(small, big)
    assert torch.equal(small, knn_reference(bank, bank_labels, queries, 5, 200, 0.1))


@pytest.mark.parametrize("chunk_size", [4, 8, 1024])
def test_weighted_knn_ignores_unlabelled_rows(chunk_size):
    bank, bank_labels, queries, query_labels = _clustered(300, 40, 10, 4, seed=3)
    # poison: exact copies of the queries labelled -1 would be every query's nearest neighbours
    poison = queries.clone()
    full_bank = torch.cat([poison[:20], bank, poison[20:]])
    full_labels = torch.cat([torch.full((20,), -1), bank_labels, torch.full((20,), -1)])
    pred = weighted_knn(full_bank, full_labels, queries, 4, k=10, temperature=0.07, chunk_size=chunk_size)
    clean = weighted_knn(bank, bank_labels, queries, 4, k=10, temperature=0.07, chunk_size=chunk_size)
    assert torch.equal(pred, clean)
    assert torch.equal(pred, knn_reference(full_bank, full_labels, queries, 4, 10, 0.07))


def test_weighted_knn_exact_neighbour_and_weighting():
    # k=1 on a bank containing the queries themselves returns their own labels
    bank, bank_labels, _, _ = _clustered(100, 1, 8, 6, seed=0)
    pred = weighted_knn(bank, bank_labels, bank * 3.0, 6, k=1, temperature=0.1, chunk_size=16)
    assert torch.equal(pred, bank_labels)
    # weighting: one very close neighbour of class 0 beats two distant neighbours of class 1
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    assert weighted_knn(train, labels, query, 2, k=3, temperature=0.1).item() == 0
    # ... but with a huge temperature the votes are nearly uniform and the majority wins
    assert weighted_knn(train, labels, query, 2, k=3, temperature=100.0).item() == 1
