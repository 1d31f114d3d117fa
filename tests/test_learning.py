"""Learning, not just running: a short pretraining on real data (a 5,000-image Fashion-MNIST subset,
the small ConvNet, the experiments/fashion_mnist configs) raises the kNN accuracy of the backbone
above the same backbone's accuracy at random initialisation."""
from __future__ import annotations

from pathlib import Path

import pytest

from ssl_lightning.callbacks import KNNMonitor
from ssl_lightning.cli import SSLCLI

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
# (epochs) per method: enough on this 2-core CPU for a clear rise, short enough for the suite
EPOCHS = {"simclr": 3, "byol": 6}


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist "
                                                "(make test and .ci/run install it)")
@pytest.mark.parametrize("method", sorted(EPOCHS))
def test_knn_rises_above_random_init(method, tmp_path, capsys):
    cli = SSLCLI(run=False, args=[
        "--config", str(REPO / f"experiments/fashion_mnist/{method}.yaml"),
        "--run_dir", str(tmp_path), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", str(EPOCHS[method]), "--trainer.check_val_every_n_epoch", str(EPOCHS[method]),
        "--trainer.num_sanity_val_steps", "-1",  # full validation first: the random-init kNN baseline
        "--data.train_subset", "5000", "--data.eval_subset", "5000", "--data.val_subset", "2000",
        "--data.pin_memory", "false"])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    knn = next(c for c in cli.trainer.callbacks if isinstance(c, KNNMonitor))
    before, after = knn.initial_accuracy, float(cli.trainer.callback_metrics["val/knn_top1"])
    with capsys.disabled():
        print(f"\n[learning check] {method}: kNN top-1 random init {before:.4f} -> after {EPOCHS[method]} epochs {after:.4f}")
    assert before is not None and 0.3 < before < 0.9
    assert after > before + 0.005, f"{method} did not learn: kNN {before:.4f} -> {after:.4f}"
