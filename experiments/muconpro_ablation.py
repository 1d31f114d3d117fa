"""MuConPro ablation in the poster's layout: GenPro / DiscPro / MuConPro at T in {0, 1, inf}, each
pretrained on the Fashion-MNIST subset with experiments/fashion_mnist/muconpro.yaml (the learning check:
online linear probe top-1 and kNN top-1 after a short pretraining).

    python experiments/muconpro_ablation.py --epochs 5                     # 9 runs
    python experiments/muconpro_ablation.py --epochs 1 --train_subset 256 --eval_subset 256 --val_subset 256

Writes experiments/results/muconpro_ablation/<objective>_T<T>.json per run, results.json (all runs)
and table.md (rows: objective x T; columns: linear, kNN).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from ssl_lightning.evaluation.learning import learning_check

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "fashion_mnist" / "muconpro.yaml"
NAMES = {"genpro": "GenPro", "discpro": "DiscPro", "muconpro": "MuConPro"}


def _label(t: float) -> str:
    return "inf" if math.isinf(t) else f"{t:g}"


def table(records: list[dict]) -> str:
    lines = ["| objective | T | linear top-1 | kNN top-1 | kNN at init | epochs | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {NAMES[r['objective']]} | {r['temperature']} | {r['probe_trained']:.4f} | {r['knn_trained']:.4f} | "
                     f"{r['knn_random_init']:.4f} | {r['epochs']} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train_subset", type=int, default=5000, help="pretraining images")
    p.add_argument("--eval_subset", type=int, default=5000, help="kNN bank images (un-augmented training set)")
    p.add_argument("--val_subset", type=int, default=2000, help="validation images")
    p.add_argument("--objectives", nargs="+", default=list(NAMES), choices=list(NAMES))
    p.add_argument("--temperatures", nargs="+", default=["0", "1", "inf"], help="floats, 0 or inf")
    p.add_argument("--out", type=Path, default=HERE / "results" / "muconpro_ablation")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more CLI overrides for every run")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    records = []
    for objective in args.objectives:
        for t in args.temperatures:
            label = _label(float(t))
            overrides = ["--model.init_args.objective", objective, "--model.init_args.temperature", label, *args.extra]
            with tempfile.TemporaryDirectory() as run_dir:
                r = learning_check(str(CONFIG), args.epochs, run_dir, args.train_subset, args.eval_subset,
                                   args.val_subset, extra_args=overrides)
            record = {**asdict(r), "config": str(CONFIG.relative_to(HERE.parent)), "objective": objective,
                      "temperature": label, "train_subset": args.train_subset, "eval_subset": args.eval_subset,
                      "val_subset": args.val_subset, "overrides": overrides}
            (args.out / f"{objective}_T{label}.json").write_text(json.dumps(record, indent=2) + "\n")
            records.append(record)
            print(f"{NAMES[objective]} T={label}: linear {r.probe_trained:.4f}, kNN {r.knn_trained:.4f} "
                  f"(init {r.knn_random_init:.4f}; {r.epochs} epochs, {r.seconds:.0f} s)", flush=True)
    (args.out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    md = (f"MuConPro ablation, Fashion-MNIST, small ConvNet, {args.epochs} epochs on {args.train_subset} images "
          f"(kNN bank {args.eval_subset}, validation {args.val_subset}); config {CONFIG.relative_to(HERE.parent)}.\n"
          f"linear = online linear probe top-1 (validation), kNN = kNN top-1 (validation).\n\n" + table(records))
    (args.out / "table.md").write_text(md)
    print("\n" + md)
    return records


if __name__ == "__main__":
    argv, sys.argv = sys.argv[1:], sys.argv[:1]  # the CLI inside reads only its own arguments
    main(argv)
