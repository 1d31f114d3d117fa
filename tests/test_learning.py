"""Learning, not just running: a short pretraining on real data (a 5,000-image Fashion-MNIST subset,
the small ConvNet, the experiments/fashion_mnist configs) raises the kNN accuracy of the backbone
above the same backbone's accuracy at random initialisation.

SimCLR's check runs here, as the suite's end-to-end guard that the shared machinery learns; every other
method's (BYOL's included) is the benchmark ``python experiments/learning_check.py <method>:<epochs>``,
which keeps ``make test`` short as method families arrive."""
from __future__ import annotations

from pathlib import Path

import pytest

from ssl_lightning.evaluation.learning import learning_check

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
# epochs per method: enough on this 2-core CPU for a clear rise, short enough for the suite
EPOCHS = {"simclr": 5}


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist "
                                                "(make test and .ci/run install it)")
@pytest.mark.parametrize("method", sorted(EPOCHS))
def test_knn_rises_above_random_init(method, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["ssl-lightning"])
    result = learning_check(str(REPO / f"experiments/fashion_mnist/{method}.yaml"), EPOCHS[method], str(tmp_path))
    with capsys.disabled():
        print(f"\n[learning check] {method}: kNN top-1 random init {result.knn_random_init:.4f} -> "
              f"after {result.epochs} epochs {result.knn_trained:.4f}")
    assert 0.3 < result.knn_random_init < 0.9
    assert result.gain > 0.005, f"{method} did not learn: {result}"
