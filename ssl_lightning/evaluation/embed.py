"""2-D maps of a backbone's features, coloured by class: UMAP (McInnes et al., 2018, umap-learn) or
t-SNE (van der Maaten & Hinton, JMLR 2008, scikit-learn), saved as PNG with matplotlib (Agg).

Features are L2-normalised first, so the Euclidean neighbourhoods both methods use are the cosine
neighbourhoods that kNN evaluation and retrieval use.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ssl_lightning.registry import SSLError

METHODS = ("umap", "tsne")
DISPLAY_NAMES = {"umap": "UMAP", "tsne": "t-SNE"}


def project_2d(features: torch.Tensor, method: str = "umap", seed: int = 0) -> np.ndarray:
    """``(N, 2)`` coordinates of the L2-normalised ``features`` ``(N, D)`` by UMAP or t-SNE (seeded)."""
    method = method.lower()
    if method not in METHODS:
        raise SSLError(f"Unknown embedding method {method!r}: use 'umap' or 'tsne'.")
    x = F.normalize(torch.as_tensor(features).detach().float().cpu(), dim=1).numpy()
    n = x.shape[0]
    if n < 3:
        raise SSLError(f"An embedding plot needs at least 3 points, got {n}: use more validation images.")
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (n - 1) / 3)  # sklearn requires perplexity < n
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    try:
        import umap
    except ImportError:
        raise SSLError("UMAP needs umap-learn: pip install umap-learn, or use --method tsne.") from None
    # random_state makes UMAP deterministic (and single-threaded); init="random" avoids the spectral
    # initialisation's eigen-solver on tiny or disconnected neighbour graphs
    reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed, n_jobs=1,
                        init="spectral" if n > 50 else "random")
    return reducer.fit_transform(x)


def plot_embedding(
    features: torch.Tensor,
    labels: torch.Tensor,
    path: str | os.PathLike,
    method: str = "umap",
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    max_points: int | None = 5000,
    title: str | None = None,
) -> str:
    """Saves a 2-D ``method`` map of ``features`` ``(N, D)`` coloured by ``labels`` ``(N,)`` (-1 =
    unlabelled, grey) as a PNG at ``path`` and returns the path. A seeded random subset of
    ``max_points`` points is drawn when there are more (t-SNE costs O(N log N) per iteration)."""
    features, labels = torch.as_tensor(features), torch.as_tensor(labels).long().reshape(-1).cpu()
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise SSLError(f"plot_embedding needs features (N, D) and labels (N,), got {tuple(features.shape)} "
                       f"and {tuple(labels.shape)}.")
    if max_points is not None and features.shape[0] > max_points:
        keep = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
        features, labels = features[keep], labels[keep]
    xy = project_2d(features, method, seed)
    figure = _scatter(xy, labels.numpy(), class_names, title or f"{DISPLAY_NAMES.get(method.lower(), method)} of {len(labels)} features")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _scatter(xy: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None, title: str):
    """A matplotlib Figure drawn without pyplot (no global backend or figure state is touched)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib import colormaps
    except ImportError:
        raise SSLError("Plots need matplotlib: pip install matplotlib.") from None
    classes = sorted(int(c) for c in np.unique(labels) if c >= 0)
    num_colours = max(classes, default=-1) + 1
    cmap = colormaps["tab10" if num_colours <= 10 else "tab20" if num_colours <= 20 else "turbo"]
    figure = Figure(figsize=(7, 6))
    ax = figure.add_subplot()
    size = 10 if len(labels) <= 2000 else 4
    unlabelled = labels < 0
    if unlabelled.any():
        ax.scatter(xy[unlabelled, 0], xy[unlabelled, 1], s=size, c="lightgrey", label="unlabelled", linewidths=0)
    for c in classes:
        mask = labels == c
        colour = cmap(c if num_colours <= 20 else c / max(1, num_colours - 1))
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=colour, label=name, linewidths=0)
    if len(classes) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2, frameon=False, fontsize=8)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return figure


def dataset_class_names(dataset) -> list[str] | None:
    """The ``classes`` of a dataset, looking through wrappers (``Subset.dataset``, ``TransformDataset.base``)."""
    for _ in range(8):
        if dataset is None:
            return None
        if getattr(dataset, "classes", None):
            return list(dataset.classes)
        inner = getattr(dataset, "base", None)
        dataset = inner if inner is not None else getattr(dataset, "dataset", None)
    return None
