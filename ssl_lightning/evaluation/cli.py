"""The evaluation commands of ``ssl-lightning``: every standard protocol on a checkpoint of any method.

    ssl-lightning linear   --config experiments/eval/linear_sgd.yaml --checkpoint runs/<run>/checkpoints/last.ckpt
    ssl-lightning knn      --config experiments/eval/knn.yaml --checkpoint ...
    ssl-lightning finetune --config experiments/eval/finetune_1pct.yaml --checkpoint ...
    ssl-lightning cluster  --config experiments/eval/cluster.yaml --checkpoint ... [--source head]
    ssl-lightning transfer --config experiments/eval/transfer.yaml --checkpoint ... --data.dataset cifar100
    ssl-lightning export   --checkpoint ...            (plain torchvision / timm state dict)
    ssl-lightning embed | retrieve --checkpoint ...    (UMAP / t-SNE map, nearest-neighbour grid)

``--checkpoint`` is a Lightning ``.ckpt`` or an exported weight file; the dataset defaults to the
pretraining one (the run's config.yaml). Each command prints a table, writes ``results.json`` into
``--out_dir`` (default ``<run dir>/eval/<command>``) and returns the results dict. Models only ever
train on the ``train`` split and report on the ``val`` split.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ssl_lightning.evaluation.checkpoint import load_backbone, load_module
from ssl_lightning.evaluation.data import EvalData, EvalSplits, dataset_labels, eval_splits, resolve_data
from ssl_lightning.evaluation.features import extract_features
from ssl_lightning.registry import SSLError


@dataclass
class Training:
    """How the classifier is trained.

    Args:
        epochs: passes over the (labelled) training set.
        optimizer: ``sgd``, ``lars`` (LARC, SimSiam's linear evaluation) or ``adamw``.
        lr: the head's learning rate per 256 images (x global batch / 256).
        backbone_lr: the backbone's, per 256 images (fine-tuning only; None = lr).
        weight_decay: weight decay. momentum: SGD / LARS momentum.
        schedule: ``cosine`` (per step), ``step`` (x0.1 at each of ``milestones``, fractions of training) or ``constant``.
    """

    epochs: int = 100
    optimizer: str = "sgd"
    lr: float = 30.0
    backbone_lr: float | None = None
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.6, 0.8)


# ---- shared helpers ---------------------------------------------------------------------------------
def _device(device: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)


def _out_dir(out_dir: str | None, info: dict[str, Any], command: str) -> Path:
    return Path(out_dir) if out_dir else Path(info["run_dir"]) / "eval" / command


def _features(backbone: nn.Module, splits: EvalSplits, device: str) -> tuple[torch.Tensor, ...]:
    """Un-augmented features and labels of the train split and of the val split."""
    dev = _device(device)
    backbone.to(dev)
    tf, ty = extract_features(backbone, splits.loader(splits.train_set(augment=False), train=False), dev)
    vf, vy = extract_features(backbone, splits.loader(splits.val_set(), train=False), dev)
    return tf, ty, vf, vy


def _meta(command: str, info: dict[str, Any], splits: EvalSplits | None = None) -> dict[str, Any]:
    meta = {"command": command, "checkpoint": info["checkpoint"], "backbone": info["backbone"],
            "component": info.get("component"), "method": info.get("method"),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if splits is not None:
        meta.update(dataset=splits.name, num_classes=splits.num_classes, num_train=len(splits.train_base),
                    num_val=len(splits.val_base), data=asdict(splits.settings))
    return meta


def _report(results: dict[str, Any], out_dir: Path, title: str, rows: list[dict[str, Any]], write: bool = True
            ) -> dict[str, Any]:
    """Prints ``rows`` as a rich table and writes ``results`` to ``out_dir/results.json``."""
    if not write:  # a non-zero DDP rank
        return results
    from rich.console import Console
    from rich.table import Table

    out_dir.mkdir(parents=True, exist_ok=True)
    results["results_file"] = str(out_dir / "results.json")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    table = Table(title=title)
    for column in rows[0] if rows else []:
        table.add_column(column)
    for row in rows:
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()))
    console = Console(soft_wrap=True)
    console.print(table)
    console.print(f"results: {out_dir / 'results.json'}", highlight=False)
    return results


def _classify(command: str, checkpoint: str, data: EvalData, train: Training, cached: bool, freeze: bool,
              component: str, device: str, trainer: dict[str, Any] | None, out_dir: str | None,
              indices: list[int] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from ssl_lightning.evaluation.linear import Classifier, fit_classifier

    backbone, info = load_backbone(checkpoint, component)
    splits = eval_splits(resolve_data(data, info), info["in_channels"])
    settings = splits.settings
    if cached:  # features once (un-augmented), then the head alone on the tensors
        tf, ty, vf, vy = _features(backbone, splits, device)
        if indices is not None:
            tf, ty = tf[indices], ty[indices]
        net = nn.Identity()
        net.num_features = tf.shape[1]
        train_loader = DataLoader(TensorDataset(tf, ty), batch_size=settings.batch_size, shuffle=True)
        val_loader = DataLoader(TensorDataset(vf, vy), batch_size=settings.eval_batch_size)
    else:
        net = backbone
        train_loader = splits.loader(splits.train_set(augment=True, indices=indices), train=True)
        val_loader = splits.loader(splits.val_set(), train=False)
    model = Classifier(net, splits.num_classes, freeze_backbone=freeze, optimizer=train.optimizer, lr=train.lr,
                       backbone_lr=train.backbone_lr, weight_decay=train.weight_decay, momentum=train.momentum,
                       schedule=train.schedule, milestones=tuple(train.milestones))
    scores, t = fit_classifier(model, train_loader, val_loader, train.epochs, trainer)
    results = {**_meta(command, info, splits), "mode": "cached" if cached else "augmented",
               "num_train_used": len(train_loader.dataset), **(extra or {}), "training": asdict(train), **scores}
    rows = [{"dataset": splits.name, "mode": results["mode"], "train images": len(train_loader.dataset),
             "top-1": scores["top1"], "top-5": scores["top5"]}]
    return _report(results, _out_dir(out_dir, info, command), f"{command}: {Path(checkpoint).name}", rows, t.is_global_zero)


# ---- commands -----------------------------------------------------------------------------------------
def linear(checkpoint: str, data: EvalData = EvalData(), train: Training = Training(), cached: bool = False,
           component: str = "backbone", device: str = "auto", trainer: dict[str, Any] | None = None,
           out_dir: str | None = None) -> dict[str, Any]:
    """Linear evaluation: a linear classifier on the frozen backbone (eval mode, BN statistics fixed).

    Trained with random resized crops + flips on the train split; top-1 / top-5 on centre crops of the val split.

    Args:
        checkpoint: a Lightning .ckpt of any method, or an exported backbone (.pt with its .json).
        data: the labelled dataset (default: the pretraining one).
        train: optimiser and schedule (MoCo: SGD lr 30, step; SimSiam: LARS lr 0.1, cosine).
        cached: extract un-augmented features once and train the head on them (fast sweeps; no augmentation).
        component: which backbone of the checkpoint (``backbone``; ``teacher_backbone`` for DINO's / BYOL's teacher).
        device: feature extraction device in cached mode (auto, cpu, cuda).
        trainer: extra lightning Trainer arguments (accelerator, devices, precision, ...).
        out_dir: where results.json goes (default <run dir>/eval/linear).
    """
    return _classify("linear", checkpoint, data, train, cached, True, component, device, trainer, out_dir)


def transfer(checkpoint: str, data: EvalData, train: Training = Training(), cached: bool = False,
             component: str = "backbone", device: str = "auto", trainer: dict[str, Any] | None = None,
             out_dir: str | None = None) -> dict[str, Any]:
    """Transfer: linear evaluation on another dataset than the pretraining one (--data.dataset).

    A 1-channel backbone on RGB images, or the reverse, needs ``--data.grayscale true``.

    Args:
        checkpoint: a Lightning .ckpt of any method, or an exported backbone (.pt with its .json).
        data: the target dataset (``data.dataset`` required).
        train: optimiser and schedule.
        cached: train the head on features extracted once.
        component: which backbone of the checkpoint.
        device: feature extraction device in cached mode.
        trainer: extra lightning Trainer arguments.
        out_dir: where results.json goes (default <run dir>/eval/transfer-<dataset>).
    """
    if not data.dataset:
        raise SSLError("transfer needs a target dataset: --data.dataset (e.g. --data.dataset cifar100)")
    return _classify(f"transfer-{data.dataset}", checkpoint, data, train, cached, True, component, device, trainer,
                     out_dir, extra={"target_dataset": data.dataset})


def finetune(checkpoint: str, data: EvalData = EvalData(),
             train: Training = Training(epochs=60, lr=0.05, backbone_lr=0.05),
             fraction: float | None = 0.01, per_class: int | None = None, subset_file: str | None = None,
             subset_seed: int = 0, component: str = "backbone", trainer: dict[str, Any] | None = None,
             out_dir: str | None = None) -> dict[str, Any]:
    """Semi-supervised fine-tuning of the whole backbone and a linear head on a labelled subset.

    The subset is stratified and seeded (``fraction`` of every class, or ``per_class`` images each) and
    saved as ``subset.json`` beside the results; ``--subset_file`` reuses a saved one.

    Args:
        checkpoint: a Lightning .ckpt of any method, or an exported backbone (.pt with its .json).
        data: the labelled dataset (default: the pretraining one).
        train: optimiser and schedule; ``lr`` is the head's, ``backbone_lr`` the backbone's (per 256 images).
        fraction: share of each class's training images (0.01 = 1%, 0.1 = 10%).
        per_class: images per class instead of a fraction.
        subset_file: a subset.json of an earlier run (overrides fraction / per_class).
        subset_seed: seed of the subset choice.
        component: which backbone of the checkpoint.
        trainer: extra lightning Trainer arguments.
        out_dir: where results.json and subset.json go (default <run dir>/eval/finetune).
    """
    from ssl_lightning.evaluation.subsets import load_subset, save_subset, stratified_subset

    _, info = load_backbone(checkpoint, component)
    settings = resolve_data(data, info)
    splits = eval_splits(settings, info["in_channels"])
    n_train = len(splits.train_base)
    if subset_file:
        subset = load_subset(subset_file, splits.name, n_train)
    else:
        labels = dataset_labels(splits.train_base)
        indices = stratified_subset(labels, None if per_class else fraction, per_class, subset_seed)
        subset = {"dataset": splits.name, "split": "train", "train_size": n_train, "train_subset": settings.train_subset,
                  "fraction": None if per_class else fraction, "per_class": per_class, "seed": subset_seed,
                  "indices": indices}
    out = _out_dir(out_dir, info, "finetune")
    save_subset(out / "subset.json", subset["indices"], **{k: v for k, v in subset.items() if k != "indices"})
    extra = {"subset_file": str(out / "subset.json"), "subset_size": len(subset["indices"]),
             "fraction": subset.get("fraction"), "per_class": subset.get("per_class")}
    return _classify("finetune", checkpoint, settings, train, False, False, component, "auto", trainer, str(out),
                     indices=subset["indices"], extra=extra)


def knn(checkpoint: str, data: EvalData = EvalData(), k: list[int] = [10, 20, 100, 200],  # noqa: B006
        temperature: list[float] = [0.07, 0.1], chunk_size: int = 1024, component: str = "backbone",  # noqa: B006
        device: str = "auto", out_dir: str | None = None) -> dict[str, Any]:
    """Weighted kNN classification (Wu et al., 2018) for every k and T; top-1 on the val split.

    L2-normalised un-augmented train features form the bank; the cosine top-k neighbours vote with weight exp(s / T).

    Args:
        checkpoint: a Lightning .ckpt of any method, or an exported backbone (.pt with its .json).
        data: the labelled dataset (default: the pretraining one).
        k: numbers of neighbours (DINO: 10, 20, 100, 200).
        temperature: vote temperatures T (0.07 Wu et al. / DINO; 0.1 MoCo's CIFAR monitor).
        chunk_size: queries per chunk (memory stays bounded).
        component: which backbone of the checkpoint.
        device: feature extraction and kNN device (auto, cpu, cuda).
        out_dir: where results.json goes (default <run dir>/eval/knn).
    """
    from ssl_lightning.evaluation.knn import weighted_knn

    backbone, info = load_backbone(checkpoint, component)
    splits = eval_splits(resolve_data(data, info), info["in_channels"])
    tf, ty, vf, vy = _features(backbone, splits, device)
    dev = _device(device)
    tf, ty, vf = tf.to(dev), ty.to(dev), vf.to(dev)
    table = []
    for kk in k:
        for t in temperature:
            pred = weighted_knn(tf, ty, vf, splits.num_classes, kk, t, chunk_size).cpu()
            table.append({"k": kk, "temperature": t, "top1": float((pred == vy).float().mean())})
    best = max(table, key=lambda r: r["top1"])
    results = {**_meta("knn", info, splits), "table": table, "best": best}
    return _report(results, _out_dir(out_dir, info, "knn"), f"weighted kNN: {Path(checkpoint).name}", table)


def cluster(checkpoint: str, data: EvalData = EvalData(), source: Literal["features", "head"] = "features",
            num_clusters: int | None = None, fit_split: Literal["train", "val"] = "train", normalize: bool = True,
            n_init: int = 10, seed: int = 0, method: str | None = None, component: str = "backbone",
            device: str = "auto", out_dir: str | None = None) -> dict[str, Any]:
    """Unsupervised classification of the val split: NMI, AMI, ARI and Hungarian ACC.

    Clusters are k-means on the backbone features (fitted on ``fit_split``; labels are never used to
    fit) or the argmax of the method's class head (TWIST); see ``ssl_lightning.evaluation.clustering``.

    Args:
        checkpoint: a Lightning .ckpt (``--source head`` needs one); exported backbones work with features.
        data: the labelled dataset (default: the pretraining one).
        source: ``features`` (k-means) or ``head`` (the method's ``class_probabilities``).
        num_clusters: k of k-means (default: the number of classes, which Hungarian ACC needs).
        fit_split: where k-means is fitted; the val split is always the one scored.
        normalize: L2-normalise features before k-means (cosine geometry).
        n_init: k-means restarts. seed: k-means seed.
        method: the method class when the checkpoint does not name it (``--source head``).
        component: which backbone of the checkpoint.
        device: feature extraction device.
        out_dir: where results.json goes (default <run dir>/eval/cluster).
    """
    from ssl_lightning.evaluation.clustering import cluster_metrics

    dev = _device(device)
    if source == "head":
        module = load_module(checkpoint, method)
        backbone, (_, info) = getattr(module, component), load_backbone(checkpoint, component)
    else:
        backbone, info = load_backbone(checkpoint, component)
    splits = eval_splits(resolve_data(data, info), info["in_channels"])
    if source == "head":
        backbone.to(dev)
        vf, vy = extract_features(backbone, splits.loader(splits.val_set(), train=False), dev)
        module.to(dev)
        with torch.no_grad():
            probs = [module.class_probabilities(f.to(dev)) for f in vf.split(splits.settings.eval_batch_size)]
        if probs and probs[0] is None:
            raise SSLError(f"{type(module).__name__} has no class head (class_probabilities returns None): "
                           "use --source features (k-means)")
        pred, k = torch.cat(probs).argmax(1).cpu(), int(probs[0].shape[1])
    else:
        from sklearn.cluster import KMeans

        k = num_clusters or splits.num_classes
        backbone.to(dev)
        vf, vy = extract_features(backbone, splits.loader(splits.val_set(), train=False), dev)
        fit = vf if fit_split == "val" else extract_features(
            backbone, splits.loader(splits.train_set(augment=False), train=False), dev)[0]
        prep = (lambda x: torch.nn.functional.normalize(x, dim=1)) if normalize else (lambda x: x)
        kmeans = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(prep(fit).double().numpy())
        pred = torch.from_numpy(kmeans.predict(prep(vf).double().numpy()))
    scores = cluster_metrics(pred, vy)
    results = {**_meta("cluster", info, splits), "source": source, "num_clusters": k,
               "fit_split": fit_split if source == "features" else None, "normalize": normalize, **scores,
               "nmi_averaging": "arithmetic (scikit-learn default)"}
    rows = [{"source": source, "k": k, **{m.upper(): scores[m] for m in ("nmi", "ami", "ari", "acc")}}]
    return _report(results, _out_dir(out_dir, info, "cluster"), f"clustering: {Path(checkpoint).name}", rows)


def export(checkpoint: str, component: str = "backbone", name: str = "backbone", out_dir: str | None = None
           ) -> dict[str, Any]:
    """Export the backbone as a plain state dict (torchvision ResNet / timm ViT keys) with a .json on how to load it.

    Writes ``<out_dir>/<name>.pt`` and ``<out_dir>/<name>.json``; the ConvNet exports its own state dict.

    Args:
        checkpoint: a Lightning .ckpt of any method.
        component: which backbone of the checkpoint (``teacher_backbone`` for a teacher).
        name: file name stem.
        out_dir: default <run dir>/eval/export.
    """
    from ssl_lightning.evaluation.export import export_backbone

    backbone, info = load_backbone(checkpoint, component)
    out = _out_dir(out_dir, info, "export")
    meta = export_backbone(backbone, info, out / f"{name}.pt")
    results = {**_meta("export", info), **meta}
    rows = [{"weights": meta["weights"], "format": meta["format"], "tensors": meta["num_tensors"]}]
    return _report(results, out, f"export: {Path(checkpoint).name}", rows)


def embed(checkpoint: str, data: EvalData = EvalData(), method: Literal["umap", "tsne"] = "umap",
          split: Literal["train", "val"] = "val", max_points: int | None = 5000, seed: int = 0,
          component: str = "backbone", device: str = "auto", out_dir: str | None = None) -> dict[str, Any]:
    """A 2-D UMAP or t-SNE map of the backbone features of a split, coloured by class, as a PNG.

    Args:
        checkpoint: a Lightning .ckpt of any method, or an exported backbone.
        data: the dataset (default: the pretraining one).
        method: umap or tsne. split: which split's images.
        max_points: a seeded random subset of at most this many points.
        seed: seed of the subset and the projection.
        component: which backbone of the checkpoint.
        device: feature extraction device.
        out_dir: default <run dir>/eval/embed.
    """
    from ssl_lightning.evaluation.embed import dataset_class_names, plot_embedding

    backbone, info = load_backbone(checkpoint, component)
    splits = eval_splits(resolve_data(data, info), info["in_channels"])
    ds = splits.val_set() if split == "val" else splits.train_set(augment=False)
    dev = _device(device)
    feats, labels = extract_features(backbone.to(dev), splits.loader(ds, train=False), dev)
    out = _out_dir(out_dir, info, "embed")
    png = plot_embedding(feats, labels, out / f"{method}_{split}.png", method, dataset_class_names(ds), seed, max_points)
    results = {**_meta("embed", info, splits), "method": method, "split": split, "png": png}
    return _report(results, out, f"embedding: {Path(checkpoint).name}", [{"method": method, "split": split, "png": png}])


def retrieve(checkpoint: str, data: EvalData = EvalData(), num_queries: int = 8, k: int = 8, seed: int = 0,
             component: str = "backbone", device: str = "auto", out_dir: str | None = None) -> dict[str, Any]:
    """Nearest-neighbour retrieval grid (PNG): val queries and their k most cosine-similar train images.

    Queries are seeded random val images; the bank is the un-augmented train split.

    Args:
        checkpoint: a Lightning .ckpt of any method, or an exported backbone.
        data: the dataset (default: the pretraining one).
        num_queries: query images. k: neighbours shown per query.
        seed: seed of the query choice.
        component: which backbone of the checkpoint.
        device: feature extraction device.
        out_dir: default <run dir>/eval/retrieve.
    """
    from torch.utils.data import Subset

    from ssl_lightning.evaluation.retrieve import retrieval_grid

    backbone, info = load_backbone(checkpoint, component)
    splits = eval_splits(resolve_data(data, info), info["in_channels"])
    tf, ty, vf, vy = _features(backbone, splits, device)
    pick = torch.randperm(len(vy), generator=torch.Generator().manual_seed(seed))[:num_queries].tolist()
    queries = Subset(splits.val_set(), pick)
    out = _out_dir(out_dir, info, "retrieve")
    png = retrieval_grid(queries, vf[pick], splits.train_set(augment=False), tf, out / "retrieval.png", k,
                         vy[pick], ty, splits.mean, splits.std)
    results = {**_meta("retrieve", info, splits), "queries": pick, "k": k, "png": png}
    return _report(results, out, f"retrieval: {Path(checkpoint).name}", [{"queries": len(pick), "k": k, "png": png}])


COMMANDS = {f.__name__: f for f in (linear, knn, finetune, cluster, transfer, export, embed, retrieve)}


def main(args: list[str] | None = None) -> Any:
    """``ssl-lightning <command> [--config <yaml>] [--flags]``: parses with jsonargparse and runs the command."""
    from jsonargparse import auto_cli

    return auto_cli(COMMANDS, args=args, as_positional=False, prog="ssl-lightning", default_env=False)
