"""Does the batched on-device augmentation learn as well as the per-image one? SimCLR's learning check
(experiments/fashion_mnist/simclr.yaml, 5,000 images, 3 epochs) with data.augment workers and device
over several seeds (the seed of the data order / augmentations and of the model's initialisation).

    python experiments/bench/pipelines_knn.py --seeds 0 1 2 3
    python experiments/bench/pipelines_knn.py --augments device --round_uint8 --tag _rounded   # the experiment below
Writes experiments/results/bench/pipelines_knn<tag>.{json,md}.

``--round_uint8`` (an experiment, not a feature): the batched ops round like the per-image uint8 ones,
the crop to the nearest 1/255 and brightness / contrast down to it, to test whether the rounding
explains the gap between the two pipelines.
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
    p.add_argument("--augments", nargs="+", default=["workers", "device"])
    p.add_argument("--round_uint8", action="store_true")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    if a.round_uint8:
        round_like_uint8()
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
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"pipelines_knn{a.tag}.json").write_text(json.dumps(
        {"method": a.method, "epochs": a.epochs, "round_uint8": a.round_uint8, "rows": rows,
         "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    lines = ["| seed | " + " | ".join(f"kNN {m}" for m in a.augments) + " |", "|---|" + "---|" * len(a.augments)]
    for seed in a.seeds:
        knn = [next(r["knn_trained"] for r in rows if r["seed"] == seed and r["augment"] == m) for m in a.augments]
        lines.append(f"| {seed} | " + " | ".join(f"{v:.4f}" for v in knn) + " |")
    for m in a.augments:
        lines.append(f"| mean {m} | " + " | ".join(
            f"{statistics.mean(r['knn_trained'] for r in rows if r['augment'] == m):.4f}" if m == n else ""
            for n in a.augments) + " |")
    table = "\n".join(lines)
    rounding = ", batched ops rounded like uint8" if a.round_uint8 else ""
    (OUT / f"pipelines_knn{a.tag}.md").write_text(f"{a.method}, {a.epochs} epochs, Fashion-MNIST 5,000-image subset, CPU"
                                                 f"{rounding} ({time.strftime('%Y-%m-%d')})\n\n{table}\n")
    print(table)


def round_like_uint8() -> None:
    """Patches the batched ops to round as the per-image pipeline's uint8 ops do (an experiment)."""
    import ssl_lightning.data.batch_views as bv

    crop = bv.resized_crop
    bv.resized_crop = lambda *args, **kwargs: (crop(*args, **kwargs) * 255).round() / 255

    def floored(op):
        return lambda x, factor: (op(x, factor) * 255 + 1e-4).floor() / 255

    bv.JITTER_OPS = (floored(bv.JITTER_OPS[0]), floored(bv.JITTER_OPS[1])) + tuple(bv.JITTER_OPS[2:])


if __name__ == "__main__":
    main()
