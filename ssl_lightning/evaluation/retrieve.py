"""Image retrieval by cosine similarity of backbone features, shown as a grid: each row a query image
followed by its k nearest neighbours in the bank (green / red borders when the labels match / differ)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from ssl_lightning.registry import SSLError

QUERY, MATCH, MISMATCH, UNKNOWN = (0.2, 0.4, 1.0), (0.0, 0.75, 0.0), (0.9, 0.0, 0.0), (0.6, 0.6, 0.6)


@torch.no_grad()
def nearest_neighbours(query_feats: torch.Tensor, bank_feats: torch.Tensor, k: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(similarities, indices)``, both ``(Q, k)``: the ``k`` bank rows of highest cosine similarity
    to each query, most similar first."""
    if query_feats.ndim != 2 or bank_feats.ndim != 2 or query_feats.shape[1] != bank_feats.shape[1]:
        raise SSLError(f"Retrieval needs query and bank features (Q, D) and (N, D), got {tuple(query_feats.shape)} "
                       f"and {tuple(bank_feats.shape)}.")
    if not 1 <= k <= bank_feats.shape[0]:
        raise SSLError(f"k = {k} neighbours asked from a bank of {bank_feats.shape[0]} images: use 1 <= k <= bank size.")
    sims = F.normalize(query_feats.float(), dim=1) @ F.normalize(bank_feats.float(), dim=1).T
    return sims.topk(k, dim=1)


def retrieval_grid(
    query_images: torch.Tensor | Sequence[Any],
    query_feats: torch.Tensor,
    bank_images: torch.Tensor | Sequence[Any],
    bank_feats: torch.Tensor,
    path: str | os.PathLike,
    k: int = 8,
    query_labels: torch.Tensor | None = None,
    bank_labels: torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    border: int = 2,
    cell_size: int | None = None,
) -> str:
    """Saves the retrieval grid as a PNG at ``path`` and returns the path: row ``i`` is query ``i``
    (blue border) then its ``k`` nearest bank images by cosine similarity, most similar first, with a
    green border when ``bank_labels`` equals ``query_labels``, red when not, grey when unknown.

    Images are tensors ``(N, C, H, W)`` or datasets whose items are an image or ``(image, label, ...)``
    (e.g. a data module's ``val_set``), so a large bank need not be held in memory. Normalised images
    are mapped back with ``x * std + mean``; uint8 images are taken as they are. ``cell_size`` resizes
    every image to that many pixels (e.g. 64 for 28-pixel images); by default the first query's size.
    """
    if len(query_images) != query_feats.shape[0] or len(bank_images) != bank_feats.shape[0]:
        raise SSLError(f"Images and features differ in number: {len(query_images)} query images for "
                       f"{query_feats.shape[0]} features, {len(bank_images)} bank images for {bank_feats.shape[0]}.")
    _, index = nearest_neighbours(query_feats, bank_feats, k)
    cells: list[torch.Tensor] = []
    size: tuple[int, int] | None = (cell_size, cell_size) if cell_size else None
    for q in range(index.shape[0]):
        row = [(_image(query_images, q), QUERY)]
        for i in index[q].tolist():
            if query_labels is None or bank_labels is None or int(bank_labels[i]) < 0:
                colour = UNKNOWN
            else:
                colour = MATCH if int(bank_labels[i]) == int(query_labels[q]) else MISMATCH
            row.append((_image(bank_images, i), colour))
        for image, colour in row:
            image = _displayable(image, mean, std)
            size = size or tuple(image.shape[-2:])
            if tuple(image.shape[-2:]) != size:
                image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
            cells.append(_framed(image, colour, border))
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(make_grid(torch.stack(cells), nrow=k + 1, padding=2, pad_value=1.0), path)
    return path


def _image(images: torch.Tensor | Sequence[Any], i: int) -> torch.Tensor:
    item = images[i]
    return torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item).detach().cpu()


def _displayable(image: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """``(3, H, W)`` in [0, 1]: de-normalised, gray repeated to RGB."""
    if image.ndim == 2:
        image = image[None]
    if image.dtype == torch.uint8:
        image = image.float() / 255
    else:
        image = image.float()
        if std is not None:
            image = image * torch.as_tensor(std, dtype=torch.float).view(-1, 1, 1)
        if mean is not None:
            image = image + torch.as_tensor(mean, dtype=torch.float).view(-1, 1, 1)
    image = image.clamp(0, 1)
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]


def _framed(image: torch.Tensor, colour: tuple[float, float, float], border: int) -> torch.Tensor:
    if border <= 0:
        return image
    return torch.stack([F.pad(channel, (border,) * 4, value=c) for channel, c in zip(image, colour)])
