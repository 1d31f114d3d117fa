"""Frozen-backbone features of a whole dataset: the input of kNN, cached linear evaluation, clustering,
embeddings and retrieval."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device | str = "cpu"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D) float32, labels (N,) long)`` on the CPU for every ``(image, label)`` batch of
    ``loader``, in loader order, with ``backbone`` in eval mode (BN running statistics used, not
    updated) under ``no_grad``; the backbone's train/eval mode is restored afterwards."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            images, y = batch[0], batch[1]
            feats.append(backbone(images.to(device, non_blocking=True)).float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        return torch.zeros(0, getattr(backbone, "num_features", 0)), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)
