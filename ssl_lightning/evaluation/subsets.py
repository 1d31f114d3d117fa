"""Labelled subsets for semi-supervised fine-tuning (SimCLR / BYOL protocol: 1% or 10% of the labels).

ImageNet's official 1% / 10% lists live in google-research/simclr ``imagenet_subsets/``; for other
datasets the subset is stratified (the same fraction, or the same count, of every class) and seeded,
and is saved with the results so that it can be reused (``--subset_file``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ssl_lightning.registry import SSLError


def stratified_subset(labels: torch.Tensor, fraction: float | None = None, per_class: int | None = None,
                      seed: int = 0) -> list[int]:
    """Sorted indices of ``per_class`` images of every class, or ``round(fraction * n_c)`` (at least one)
    of each class's ``n_c``; chosen by a permutation seeded with ``seed``. Labels < 0 are never chosen."""
    if (fraction is None) == (per_class is None):
        raise SSLError("Give exactly one of --fraction (e.g. 0.01 for 1%) and --per_class (images per class)")
    if fraction is not None and not 0 < fraction <= 1:
        raise SSLError(f"fraction must be in (0, 1], got {fraction} (1% is 0.01)")
    g = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for c in torch.unique(labels[labels >= 0]).tolist():
        members = (labels == c).nonzero().flatten()
        n = per_class if per_class is not None else max(1, round(fraction * members.numel()))
        if n > members.numel():
            raise SSLError(f"Class {c} has only {members.numel()} images, fewer than per_class={n}: lower --per_class")
        chosen += members[torch.randperm(members.numel(), generator=g)[:n]].tolist()
    return sorted(chosen)


def save_subset(path: str | Path, indices: list[int], **meta: Any) -> None:
    """``{"indices": [...], **meta}`` as JSON (indices into the training split)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**meta, "indices": [int(i) for i in indices]}, indent=1))


def load_subset(path: str | Path, dataset: str, train_size: int) -> dict[str, Any]:
    """A saved subset, checked against the training split it will index."""
    path = Path(path)
    if not path.is_file():
        raise SSLError(f"Subset file {str(path)!r} not found: give the subset.json written by an earlier finetune run")
    subset = json.loads(path.read_text())
    if subset.get("dataset") not in (None, dataset) or subset.get("train_size") not in (None, train_size):
        raise SSLError(f"Subset file {str(path)!r} was made for {subset.get('dataset')} with {subset.get('train_size')} "
                       f"training images, not {dataset} with {train_size}: use the same data settings or a new subset")
    if not subset.get("indices") or max(subset["indices"]) >= train_size or min(subset["indices"]) < 0:
        raise SSLError(f"Subset file {str(path)!r} has no indices, or indices outside the training split (0..{train_size - 1})")
    return subset
