"""Does the batched on-device augmentation learn as well as the per-image one? SimCLR's learning-check setting
(experiments/fashion_mnist/simclr.yaml, 5,000 images, 3 epochs) with data.augment workers and device
over several seeds (the seed of the data order / augmentations and of the model's initialisation).

    python experiments/bench/pipelines_knn.py --seeds 0 1 2 3 4 5 6 7 8 9
    python experiments/bench/pipelines_knn.py --augments device --round_uint8 --tag _rounded   # the experiments below
    python experiments/bench/pipelines_knn.py --augments workers --float_workers --tag _float
Writes experiments/results/bench/pipelines_knn<tag>.{json,md}.

``--round_uint8`` (an experiment, not a feature): the batched ops round like the per-image uint8 ones,
the crop to the nearest 1/255 and brightness / contrast down to it, to test whether the rounding
explains the gap between the two pipelines. ``--float_workers`` (the converse experiment): the per-image
pipeline converts each image to float before its first op, so that it never rounds.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ssl_lightning.evaluation.learning import learning_check

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "results" / "bench"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="simclr")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--augments", nargs="+", default=["workers", "device"])
    p.add_argument("--round_uint8", action="store_true")
    p.add_argument("--float_workers", action="store_true")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    if a.round_uint8:
        round_like_uint8()
    if a.float_workers:
        per_image_in_float()
    sys.argv = sys.argv[:1]
    config = str(HERE.parent / "fashion_mnist" / f"{a.method}.yaml")
    rows = []
    for seed in a.seeds:
        for augment in a.augments:
            with tempfile.TemporaryDirectory() as run_dir:
                r = learning_check(config, a.epochs, run_dir, extra_args=[
                    "--data.augment", augment, "--seed_everything", str(seed), "--data.seed", str(seed)])
            rows.append({"seed": seed, "augment": augment, "knn_random_init": r.knn_random_init,
                         "knn_trained": r.knn_trained, "probe_trained": r.probe_trained, "seconds": r.seconds})
            print(f"seed {seed} {augment}: kNN {r.knn_random_init:.4f} -> {r.knn_trained:.4f}", flush=True)
    record = {"method": a.method, "epochs": a.epochs, "round_uint8": a.round_uint8, "float_workers": a.float_workers,
              "rows": rows, "date": time.strftime("%Y-%m-%d")}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"pipelines_knn{a.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    (OUT / f"pipelines_knn{a.tag}.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    """kNN per seed and pipeline, the mean of each, and (for two pipelines) the paired difference per seed with
    its mean and standard error over seeds."""
    rows = record["rows"]
    augments = list(dict.fromkeys(r["augment"] for r in rows))
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    knn = {(r["seed"], r["augment"]): r["knn_trained"] for r in rows}
    paired = len(augments) == 2
    head = "| seed | " + " | ".join(f"kNN {m}" for m in augments) + (f" | {augments[1]} - {augments[0]} |" if paired else " |")
    lines = [head, "|---|" + "---|" * (len(augments) + paired)]
    for seed in seeds:
        cells = [f"{knn[seed, m]:.4f}" for m in augments]
        if paired:
            cells.append(f"{knn[seed, augments[1]] - knn[seed, augments[0]]:+.4f}")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    means = [f"{statistics.mean(knn[s, m] for s in seeds):.4f}" for m in augments]
    if paired:
        diff = [knn[s, augments[1]] - knn[s, augments[0]] for s in seeds]
        se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        means.append(f"{statistics.mean(diff):+.4f} +- {se:.4f} (s.e.)")
    lines.append("| mean | " + " | ".join(means) + " |")
    notes = ", batched ops rounded like uint8" if record.get("round_uint8") else ""
    notes += ", per-image ops in float (no rounding)" if record.get("float_workers") else ""
    return (f"{record['method']}, {record['epochs']} epochs, Fashion-MNIST 5,000-image subset, CPU{notes} "
            f"({record['date']})\n\n" + "\n".join(lines) + "\n")


def round_like_uint8() -> None:
    """Patches the batched ops to round as the per-image pipeline's uint8 ops do (an experiment)."""
    import ssl_lightning.data.batch_views as bv

    crop = bv.resized_crop
    bv.resized_crop = lambda *args, **kwargs: (crop(*args, **kwargs) * 255).round() / 255

    def floored(op):
        return lambda x, factor: (op(x, factor) * 255 + 1e-4).floor() / 255

    bv.JITTER_OPS = (floored(bv.JITTER_OPS[0]), floored(bv.JITTER_OPS[1])) + tuple(bv.JITTER_OPS[2:])


def per_image_in_float() -> None:
    """Patches the per-image pipeline to convert to float [0, 1] before its first op (an experiment; the
    views used here have no solarisation, whose threshold 128 assumes uint8)."""
    import torch
    from torchvision.transforms import v2

    import ssl_lightning.data.views as views

    build = views.build_view

    def build_float(cfg, mean, std):
        ops = build(cfg, mean, std).transforms
        return v2.Compose([ops[0], v2.ToDtype(torch.float32, scale=True), *ops[1:]])

    views.build_view = build_float


if __name__ == "__main__":
    main()
