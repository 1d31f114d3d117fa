"""Does the batched on-device augmentation learn as well as the per-image one? SimCLR's learning check
(experiments/fashion_mnist/simclr.yaml, 5,000 images, 3 epochs) with data.augment workers and device
over several seeds (the seed of the data order / augmentations and of the model's initialisation).

    python experiments/bench/pipelines_knn.py --seeds 0 1 2 3
Writes experiments/results/bench/pipelines_knn.{json,md}.
"""
from __future__ import annotations

import argparse
import json
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
    a = p.parse_args()
    sys.argv = sys.argv[:1]
    config = str(HERE.parent / "fashion_mnist" / f"{a.method}.yaml")
    rows = []
    for seed in a.seeds:
        for augment in ("workers", "device"):
            with tempfile.TemporaryDirectory() as run_dir:
                r = learning_check(config, a.epochs, run_dir, extra_args=[
                    "--data.augment", augment, "--seed_everything", str(seed), "--data.seed", str(seed)])
            rows.append({"seed": seed, "augment": augment, "knn_random_init": r.knn_random_init,
                         "knn_trained": r.knn_trained, "probe_trained": r.probe_trained, "seconds": r.seconds})
            print(f"seed {seed} {augment}: kNN {r.knn_random_init:.4f} -> {r.knn_trained:.4f}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "pipelines_knn.json").write_text(json.dumps({"method": a.method, "epochs": a.epochs, "rows": rows,
                                                         "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    lines = ["| seed | kNN workers | kNN device | device - workers |", "|---|---|---|---|"]
    diffs = []
    for seed in a.seeds:
        w, d = (next(r["knn_trained"] for r in rows if r["seed"] == seed and r["augment"] == m) for m in ("workers", "device"))
        diffs.append(d - w)
        lines.append(f"| {seed} | {w:.4f} | {d:.4f} | {d - w:+.4f} |")
    lines.append(f"| mean | | | {statistics.mean(diffs):+.4f} |")
    table = "\n".join(lines)
    (OUT / "pipelines_knn.md").write_text(f"{a.method}, {a.epochs} epochs, Fashion-MNIST 5,000-image subset, CPU "
                                          f"({time.strftime('%Y-%m-%d')})\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
