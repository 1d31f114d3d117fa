"""DeepCluster's learning-check variants: experiments/fashion_mnist/deepcluster.yaml trained by
:func:`ssl_lightning.evaluation.learning.learning_check` (5,000 Fashion-MNIST images, small ConvNet, CPU) with
CLI overrides, one run after another; prints kNN at random init and after training per variant.

    python experiments/deepcluster_variants.py 30 5 "k30=--model.init_args.num_clusters 30 --model.init_args.pca_dim 32"
Arguments: the epochs, how often (epochs) to validate (kNN printed each time, with the seconds so far), then
``name=overrides`` per variant (``name=`` alone: the config as it is). Nothing is saved; the committed json is
written by ``experiments/learning_check.py deepcluster:<epochs>`` from the config itself.
"""
from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

from ssl_lightning.evaluation.learning import learning_check

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "fashion_mnist" / "deepcluster.yaml"
sys.path.insert(0, str(HERE))  # knn_curve.KNNCurve, the callback that prints each validation's kNN


def main(epochs: int, every: int, variants: list[str]) -> None:
    rows = []
    for spec in variants:
        name, _, overrides = spec.partition("=")
        with tempfile.TemporaryDirectory() as run_dir:
            r = learning_check(str(CONFIG), epochs, run_dir, extra_args=[
                "--trainer.check_val_every_n_epoch", str(every), "--trainer.callbacks+=knn_curve.KNNCurve",
                *shlex.split(overrides)])
        rows.append((name, overrides, r))
        print(f"{name}: kNN {r.knn_random_init:.4f} -> {r.knn_trained:.4f}, probe {r.probe_trained:.4f}, "
              f"NMI {r.metrics.get('val/nmi', float('nan')):.4f} ({epochs} epochs, {r.seconds:.0f} s) [{overrides}]",
              flush=True)
    print(f"\n| variant | overrides | epochs | kNN random init | kNN trained | probe | seconds |\n|---|---|---|---|---|---|---|")
    for name, overrides, r in rows:
        print(f"| {name} | `{overrides}` | {epochs} | {r.knn_random_init:.4f} | {r.knn_trained:.4f} | "
              f"{r.probe_trained:.4f} | {r.seconds:.0f} |")


if __name__ == "__main__":
    args, sys.argv = sys.argv[1:], sys.argv[:1]  # the CLI inside reads only its own arguments
    main(int(args[0]), int(args[1]), args[2:] or ["config="])
