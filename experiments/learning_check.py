"""Learning check for every method's Fashion-MNIST config: kNN top-1 of the small ConvNet at random
initialisation and after a short pretraining on a 5,000-image subset (CPU).

    python experiments/learning_check.py simclr:3 byol:6        # method:epochs, configs in experiments/fashion_mnist/
Writes experiments/results/learning_check/<method>.json and prints the table of every method measured so far.

A variant of one config: ``--variant NAME`` and CLI overrides after ``--`` (written to
``results/learning_check/variants/<method>.<NAME>.json``, not in the table)::

    python experiments/learning_check.py context_prediction:3 --variant p12 -- --model.init_args.patch 12
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from ssl_lightning.evaluation.learning import learning_check, parse_variant_args

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "learning_check"


def main(specs: list[str], variant: str | None = None, overrides: list[str] | None = None) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        method, _, epochs = spec.partition(":")
        with tempfile.TemporaryDirectory() as run_dir:
            r = learning_check(str(HERE / "fashion_mnist" / f"{method}.yaml"), int(epochs or 3), run_dir,
                               extra_args=overrides)
        record = {**asdict(r), "config": f"experiments/fashion_mnist/{method}.yaml", "gain": r.gain}
        path = OUT / f"{method}.json"
        if variant is not None:
            record["overrides"] = overrides
            path = OUT / "variants" / f"{method}.{variant}.json"
            path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{method}{'.' + variant if variant else ''}: kNN {r.knn_random_init:.4f} -> {r.knn_trained:.4f} "
              f"({r.epochs} epochs, {r.seconds:.0f} s) {' '.join(overrides or [])}", flush=True)
    results = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    print("\n| method | epochs | kNN random init | kNN trained | probe top-1 | seconds |\n|---|---|---|---|---|---|")
    for method, r in sorted(results.items()):
        print(f"| {method} | {r['epochs']} | {r['knn_random_init']:.4f} | {r['knn_trained']:.4f} | "
              f"{r['probe_trained']:.4f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    args, sys.argv = sys.argv[1:], sys.argv[:1]  # the CLI inside reads only its own arguments
    specs, variant, overrides = parse_variant_args(args)
    main(specs or ["simclr:3", "byol:6"], variant, overrides)
