"""Embedding maps (t-SNE / UMAP), the retrieval grid and the EmbeddingPlot callback."""
from __future__ import annotations

import glob
import math
import sys

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from ssl_lightning import SSLDataModule
from ssl_lightning.callbacks.embedding import EmbeddingPlot
from ssl_lightning.evaluation import embed
from ssl_lightning.evaluation.embed import plot_embedding, project_2d
from ssl_lightning.evaluation.retrieve import MATCH, MISMATCH, QUERY, UNKNOWN, nearest_neighbours, retrieval_grid
from ssl_lightning.methods import SimCLR
from ssl_lightning.registry import SSLError


def _clusters(n: int = 200, dim: int = 32, num_classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(num_classes, dim, generator=g)
    labels = torch.randint(num_classes, (n,), generator=g)
    return centres[labels] + 0.5 * torch.randn(n, dim, generator=g), labels


def _knn1_accuracy_2d(xy: np.ndarray, labels: torch.Tensor) -> float:
    """Leave-one-out 1-NN accuracy in the 2-D map: near 1 when the map keeps the clusters apart."""
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((labels.numpy()[d.argmin(1)] == labels.numpy()).mean())


def _is_png(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_plot_embedding_writes_png_of_a_map_that_keeps_clusters(tmp_path, method):
    if method == "umap":
        pytest.importorskip("umap")
    feats, labels = _clusters()
    labels[:5] = -1  # unlabelled points are drawn in grey
    xy = project_2d(feats, method, seed=0)
    assert xy.shape == (200, 2) and np.isfinite(xy).all()
    assert _knn1_accuracy_2d(xy[5:], labels[5:]) > 0.95
    path = plot_embedding(feats, labels, tmp_path / "sub" / f"{method}.png", method=method,
                          class_names=["a", "b", "c", "d"])
    width, height = _is_png(path)
    assert path == str(tmp_path / "sub" / f"{method}.png") and width > 300 and height > 300


def test_plot_embedding_subsamples_and_rejects_bad_input(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(embed, "project_2d", lambda f, m, s: seen.append(f.shape[0]) or np.random.rand(f.shape[0], 2))
    feats, labels = _clusters(n=120)
    plot_embedding(feats, labels, tmp_path / "a.png", method="tsne", max_points=50)
    assert seen == [50]
    monkeypatch.undo()
    with pytest.raises(SSLError, match="'umap' or 'tsne'"):
        plot_embedding(feats, labels, tmp_path / "b.png", method="pca")
    with pytest.raises(SSLError, match=r"features \(N, D\) and labels \(N,\)"):
        plot_embedding(feats, labels[:10], tmp_path / "c.png", method="tsne")


def test_missing_umap_names_the_install_and_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError
    feats, labels = _clusters(n=30)
    with pytest.raises(SSLError, match=r"pip install umap-learn.*--method tsne"):
        plot_embedding(feats, labels, tmp_path / "u.png", method="umap")


def test_nearest_neighbours_equal_brute_force_cosine_argsort():
    g = torch.Generator().manual_seed(1)
    queries, bank = torch.randn(7, 16, generator=g), torch.randn(60, 16, generator=g) * torch.rand(60, 1, generator=g)
    sims, index = nearest_neighbours(queries, bank, k=5)
    for q in range(7):
        cos = [sum(a * b for a, b in zip(queries[q].tolist(), row.tolist()))
               / math.sqrt(sum(a * a for a in queries[q].tolist()) * sum(b * b for b in row.tolist())) for row in bank]
        expected = sorted(range(60), key=lambda i: -cos[i])[:5]
        assert index[q].tolist() == expected
        assert sims[q].tolist() == pytest.approx([cos[i] for i in expected], abs=1e-5)
    with pytest.raises(SSLError, match="k = 61"):
        nearest_neighbours(queries, bank, k=61)


def _cell(grid: np.ndarray, row: int, col: int, size: int, border: int, pad: int = 2) -> np.ndarray:
    """The framed cell (row, col) of a make_grid image: (size + 2 border) square, pad px between cells."""
    step = size + 2 * border + pad
    top, left = pad + row * step, pad + col * step
    return grid[top:top + size + 2 * border, left:left + size + 2 * border]


@pytest.mark.parametrize("channels", [1, 3])
def test_retrieval_grid_size_neighbours_and_borders(tmp_path, channels):
    """Rows = queries, columns = query + k neighbours; every cell shows the de-normalised image of the
    brute-force neighbour, framed green when the labels match and red when not. The bank is a dataset
    of (image, label) tuples, the queries a tensor."""
    g = torch.Generator().manual_seed(0)
    n, q, k, size, border = 40, 3, 5, 12, 2
    pixels = torch.randint(0, 256, (n, channels, size, size), generator=g).float() / 255  # exact in a PNG
    mean, std = [0.5] * channels, [0.25] * channels
    normalised = (pixels - 0.5) / 0.25
    feats, labels = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    bank = [(normalised[i], int(labels[i])) for i in range(n)]
    path = retrieval_grid(normalised[:q], feats[:q] + 0.3, bank, feats, tmp_path / "grid.png", k=k,
                          query_labels=labels[:q], bank_labels=labels, mean=mean, std=std, border=border)
    grid = np.asarray(Image.open(path).convert("RGB"))
    step = size + 2 * border + 2
    assert grid.shape == (2 + q * step, 2 + (k + 1) * step, 3)
    _, index = nearest_neighbours(feats[:q] + 0.3, feats, k)
    as_rgb = lambda i: (pixels[i].expand(3, -1, -1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # noqa: E731
    frame = lambda c: np.round(np.array(c) * 255).astype(np.uint8)  # noqa: E731
    seen = set()
    for r in range(q):
        cells = [r] + index[r].tolist()
        colours = [QUERY] + [MATCH if labels[i] == labels[r] else MISMATCH for i in index[r].tolist()]
        seen.update(colours)
        for col, (i, colour) in enumerate(zip(cells, colours)):
            cell = _cell(grid, r, col, size, border)
            np.testing.assert_array_equal(cell[border:-border, border:-border], as_rgb(i))
            assert (cell[0] == frame(colour)).all() and (cell[:, -1] == frame(colour)).all()
    assert seen == {QUERY, MATCH, MISMATCH}  # both frame colours were checked


def test_retrieval_grid_cell_size_and_uint8_images(tmp_path):
    """uint8 images are shown as they are (no de-normalisation) and resized to ``cell_size``; unknown
    labels give grey frames."""
    images = torch.full((10, 3, 8, 8), 200, dtype=torch.uint8)
    feats = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    path = retrieval_grid(images[:2], feats[:2], images, feats, tmp_path / "g.png", k=3, cell_size=20, border=1,
                          mean=[9.0] * 3, std=[9.0] * 3)
    grid = np.asarray(Image.open(path).convert("RGB"))
    step = 20 + 2 * 1 + 2
    assert grid.shape == (2 + 2 * step, 2 + 4 * step, 3)
    inner = _cell(grid, 1, 2, 20, 1)
    assert (inner[1:-1, 1:-1] == 200).all() and (inner[0] == round(UNKNOWN[0] * 255)).all()


def test_embedding_callback_writes_plots_and_logs_to_wandb(tmp_path, monkeypatch):
    """3 epochs, every_n_epochs=2: plots after epoch 1 (due) and 2 (the last), not after epoch 0 or the
    sanity check; an offline W&B run receives both images."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    wandb.finish()  # a W&B run left open in this process would receive this test's images

    L.seed_everything(0)
    dm = SSLDataModule("synthetic", batch_size=16, num_workers=0, pin_memory=False, image_size=16,
                       dataset_options={"size": 48, "channels": 1, "image_size": 16, "num_classes": 4})
    model = SimCLR(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=4, proj_hidden=16,
                   proj_out=8, warmup_epochs=0)
    callback = EmbeddingPlot(every_n_epochs=2, method="tsne")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path / "wb"), project="test")
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        default_root_dir=tmp_path / "run", limit_train_batches=1, num_sanity_val_steps=1)
    trainer.fit(model, datamodule=dm)
    run = tmp_path / "run" / "embeddings"
    assert sorted(p.name for p in run.iterdir()) == ["epoch001.png", "epoch002.png"]
    assert callback.paths == [str(run / "epoch001.png"), str(run / "epoch002.png")]
    for path in callback.paths:
        _is_png(path)
    logger.experiment.finish()  # W&B writes media in the background: flush before looking
    logged = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "files" / "media" / "images" / "val" / "embedding_*.png"))
    assert len(logged) == 2


def test_embedding_callback_rejects_bad_settings():
    with pytest.raises(SSLError, match="every_n_epochs"):
        EmbeddingPlot(every_n_epochs=0)
    with pytest.raises(SSLError, match="'tsne' or 'umap'"):
        EmbeddingPlot(method="pca")
