"""``ssl-lightning check-data``: reads every image of the splits a run uses, before the run.

    ssl-lightning check-data --config experiments/imagenet100/simclr.yaml --data.root /data/imagenet
    ssl-lightning check-data --data.dataset image_folder --data.root photos/ --workers 16 --output report.json

The data settings are :class:`~ssl_lightning.data.SSLDataModule`'s (a fit config's ``data:`` section and/or
``--data.*`` flags, later ones winning). Image files are fully decoded (``Image.load()``: a truncated file
fails there, not at ``Image.open``) by a thread pool (PIL decodes without the GIL). It prints per split
the images per class, the widths and heights (min / median / max), the modes and every unreadable file,
and the crop size a run would use; exit status 1 when a file is unreadable, 0 otherwise (2: bad settings).
In-memory datasets (fashion_mnist, cifar, stl10, synthetic) get counts and sizes: nothing there can be
unreadable. Whole splits are read: ``train_subset`` and the like are not applied (a run's subset is a sample
of them). ``data.on_bad_image`` does not matter here: every unreadable file is listed.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from ssl_lightning.data.datamodule import SSLDataModule
from ssl_lightning.data.folder import ArrayDataset, ImageFolderDataset
from ssl_lightning.data.image_size import upsampling_warning
from ssl_lightning.registry import SSLError

CHUNK = 64  # files per pool task
UNLABELLED = "(unlabelled)"
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
LISTED_CLASSES = 20  # more classes than this are summarised (min / median / max images per class)


def default_workers() -> int:
    """Python's thread-pool default: enough threads to overlap file reads and decoding."""
    return min(32, (os.cpu_count() or 1) + 4)


@dataclass
class SplitReport:
    """What one split holds: images per class, sizes, modes, unreadable files (path, error)."""

    split: str
    role: str
    kind: str  # "files", "arrays" or "none"
    location: str
    images: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    width: dict[str, float] = field(default_factory=dict)
    height: dict[str, float] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    bad: list[dict[str, str]] = field(default_factory=list)


def read_image(path: str) -> tuple[int, int, str] | str:
    """``(width, height, mode)`` of a fully decoded image file, or why it cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()  # Image.open only parses the header: decoding finds truncated and corrupt data
            return img.width, img.height, img.mode
    except Exception as e:  # noqa: BLE001 -- any failure to decode is what is being looked for
        return f"{type(e).__name__}: {e}"


def _read_chunk(paths: list[str]) -> list[tuple[int, int, str] | str]:
    return [read_image(p) for p in paths]


def _stats(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}


def _class_counts(labels: list[int], names: list[str]) -> dict[str, int]:
    counts = Counter(labels)
    out = {name: counts.get(i, 0) for i, name in enumerate(names)}  # empty classes included
    out.update({str(label): n for label, n in sorted(counts.items()) if label >= len(names)})
    if counts.get(-1):
        out[UNLABELLED] = counts[-1]
    return out


def scan_split(ds: Dataset | None, split: str, role: str, workers: int) -> SplitReport:
    """Reads every image of a folder split with ``workers`` threads; sizes an in-memory one from its shape."""
    if ds is None:
        return SplitReport(split, role, "none", "no such split (an image folder without val/): not evaluated")
    if isinstance(ds, ArrayDataset):
        n, c, h, w = ds.images.shape
        labels = [int(t) for t in ds.targets.tolist()]
        return SplitReport(split, role, "arrays", "in-memory arrays: nothing can be unreadable", n,
                           _class_counts(labels, list(ds.classes)), _stats([w] * n), _stats([h] * n),
                           {MODES.get(c, f"{c} channels"): n})
    if not isinstance(ds, ImageFolderDataset):
        raise SSLError(f"check-data reads image folders and in-memory arrays, not {type(ds).__name__}")
    paths = [p for p, _ in ds.samples]
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = [r for chunk in pool.map(_read_chunk, chunks) for r in chunk]
    good = [r for r in results if not isinstance(r, str)]
    bad = [{"path": p, "error": r} for p, r in zip(paths, results) if isinstance(r, str)]
    return SplitReport(split, role, "files", str(ds.root), len(paths), _class_counts(ds.targets, list(ds.classes)),
                       _stats([r[0] for r in good]), _stats([r[1] for r in good]),
                       dict(Counter(r[2] for r in good).most_common()), bad)


def check(dm: SSLDataModule, workers: int | None = None) -> dict[str, Any]:
    """The report of every split ``dm`` uses: the pretraining split, train (kNN bank, probes) and val."""
    roles: dict[str, list[str]] = {}
    for split, role in ((dm.spec.pretrain_split, "pretraining"), ("train", "kNN bank and probes"), ("val", "validation")):
        roles.setdefault(split, []).append(role)
    workers = workers or default_workers()
    splits = [scan_split(dm._load(split), split, ", ".join(r), workers) for split, r in roles.items()]
    report: dict[str, Any] = {"dataset": dm.dataset, "root": dm.root, "workers": workers,
                              "splits": [asdict(s) for s in splits],
                              "bad_files": sum(len(s.bad) for s in splits), "images": sum(s.images for s in splits)}
    try:  # the crop size a run would use, and whether its crops upsample the images
        sides, given = dm.image_sides, dm.given_image_size
        report["image_size"] = dm.image_size
        report["image_size_from"] = (f"the data ({sides.describe()})" if given is None
                                     else "the dataset's default" if given == dm.spec.image_size else "the settings")
        report["upsampling"] = upsampling_warning(max(v.size for v in dm.view_configs), sides)
    except SSLError as e:  # e.g. no sampled header readable: the files above say why
        report.update(image_size=None, image_size_from=str(e), upsampling=None)
    return report


def _num(x: float) -> str:
    return f"{x:g}"


def format_report(report: dict[str, Any]) -> list[str]:
    """Plain lines: one block per split, then the crop size and the verdict."""
    lines = [f"check-data: {report['dataset']} at {report['root']} ({report['workers']} threads)"]
    for s in report["splits"]:
        head = f"{s['split']} ({s['role']})"
        if s["kind"] == "none":
            lines.append(f"{head}: {s['location']}")
            continue
        lines.append(f"{head}: {s['images']} images, {s['location']}")
        classes = s["classes"]
        named = {k: v for k, v in classes.items() if k != UNLABELLED}
        if named and len(named) <= LISTED_CLASSES:
            lines.append("  per class   " + ", ".join(f"{k} {v}" for k, v in named.items()))
        elif named:
            counts = sorted(named.values())
            lines.append(f"  per class   {len(named)} classes, min {counts[0]} / median {_num(statistics.median(counts))}"
                         f" / max {counts[-1]} images")
        empty = [k for k, v in named.items() if v == 0]
        if empty:
            lines.append(f"  empty       {len(empty)} classes without images: {', '.join(empty[:10])}"
                         + (" ..." if len(empty) > 10 else ""))
        if classes.get(UNLABELLED):
            lines.append(f"  unlabelled  {classes[UNLABELLED]}")
        for axis in ("width", "height"):
            st = s[axis]
            if st:
                lines.append(f"  {axis:<11} min {_num(st['min'])} / median {_num(st['median'])} / max {_num(st['max'])} px")
        if s["modes"]:
            lines.append("  modes       " + ", ".join(f"{k} {v}" for k, v in s["modes"].items()))
        if s["kind"] == "files":
            lines.append(f"  unreadable  {len(s['bad'])}")
            lines += [f"    {b['path']}: {b['error']}" for b in s["bad"]]
    size = report["image_size"]
    lines.append(f"image_size: {size} px, from {report['image_size_from']}" if size else
                 f"image_size: unknown: {report['image_size_from']}")
    if report["upsampling"]:
        lines.append(f"warning: {report['upsampling']}")
    bad = report["bad_files"]
    lines.append(f"bad files: {bad}: remove or replace them, or set data.on_bad_image: skip (warns and uses the next "
                 "readable image)" if bad else "bad files: 0")
    return lines


def _config_to_data(args: list[str]) -> list[str]:
    """``--config file.yaml`` (``-c``) -> ``--data <its data: section>``, in place, so that later flags win."""
    import yaml

    out, i = [], 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        if key not in ("--config", "-c"):
            out.append(args[i])
            i += 1
            continue
        path = value if eq else (args[i + 1] if i + 1 < len(args) else "")
        i += 1 if eq else 2
        if not os.path.isfile(path):
            raise SSLError(f"Config file {path!r} does not exist: give --config the YAML of a fit run "
                           "(e.g. experiments/cifar10/simclr.yaml or runs/<run>/config.yaml)")
        data = (yaml.safe_load(Path(path).read_text()) or {}).get("data")
        if not isinstance(data, dict):
            raise SSLError(f"{path} has no data: section: give the config of a fit run, or --data.dataset and --data.root")
        out += ["--data", yaml.safe_dump(data)]
    return out


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="ssl-lightning check-data", default_env=False,
                            description="Read every image of the splits a run uses; exit 1 if any is unreadable.")
    parser.add_argument("--config", "-c", type=str | None, default=None,
                        help="A fit config (experiments/... or runs/<run>/config.yaml): its data: section is used.")
    parser.add_class_arguments(SSLDataModule, "data")
    parser.add_argument("--workers", type=int | None, default=None,
                        help=f"Threads reading the files (default: CPUs + 4, at most 32; here {default_workers()}).")
    parser.add_argument("--output", type=str | None, default=None, help="Also write the report as JSON to this file.")
    return parser


def main(args: list[str] | None = None) -> int:
    """Parses the arguments, scans, prints the report; returns the exit status (1: unreadable files)."""
    argv = sys.argv[1:] if args is None else list(args)
    parser = build_parser()
    cfg = parser.parse_args(_config_to_data(argv))
    report = check(parser.instantiate_classes(cfg).data, cfg.workers)
    print("\n".join(format_report(report)), flush=True)
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(report, indent=1))
        print(f"report: {cfg.output}")
    return 1 if report["bad_files"] else 0
