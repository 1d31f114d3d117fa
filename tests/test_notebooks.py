"""The notebooks under notebooks/: stored without outputs, and every cell runs with the tiny settings
(SSL_NOTEBOOK_TINY=1). Cells are executed in-process, in order, in one fresh namespace per notebook
(no Jupyter kernel needed); 03 reads the checkpoint that 01 writes."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_new_objective.ipynb", "03_evaluate_and_plot.ipynb"]


def run_notebook(name: str) -> dict:
    """Executes the code cells of ``name``; returns the namespace (``_seconds``: the wall time)."""
    nb = json.loads((NOTEBOOKS / name).read_text())
    namespace: dict = {"__name__": "__main__"}
    start = time.time()
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{name}[cell {i}]", "exec"), namespace)
    namespace["_seconds"] = time.time() - start
    print(f"{name}: {namespace['_seconds']:.1f} s")
    return namespace


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One working directory for the module, with the tiny settings, so 03 finds 01's run."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("notebooks")
        mp.chdir(path)
        mp.setenv("SSL_NOTEBOOK_TINY", "1")
        mp.delenv("SSL_CHECKPOINT", raising=False)
        yield path


@pytest.fixture(scope="module")
def quickstart(workdir):
    return run_notebook("01_quickstart.ipynb")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    nb = json.loads((NOTEBOOKS / name).read_text())
    assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["language"] == "python"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert all(set(c) >= {"id", "cell_type", "metadata", "source"} for c in nb["cells"])
    assert len({c["id"] for c in nb["cells"]}) == len(nb["cells"])
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


def test_01_quickstart_pretrains_and_evaluates_with_knn(quickstart, workdir):
    ns = quickstart
    assert ns["TINY"] and ns["EPOCHS"] == 1
    assert (workdir / "runs" / "quickstart" / "checkpoints" / "last.ckpt").is_file()
    assert (workdir / "runs" / "quickstart" / "config.yaml").is_file()
    assert 0.0 < ns["knn_monitor"].initial_accuracy <= 1.0
    assert 0.0 < ns["metrics"]["val/knn_top1"] <= 1.0 and 0.0 <= ns["metrics"]["val/probe_top1"] <= 1.0
    # the kNN of the reloaded checkpoint's features is the accuracy the run logged
    assert ns["queries"].shape[0] == ns["VAL_IMAGES"] and ns["bank"].shape[0] == ns["BANK_IMAGES"]
    assert ns["knn_from_checkpoint"] == pytest.approx(ns["metrics"]["val/knn_top1"], abs=1.5 / ns["VAL_IMAGES"])


def test_02_new_objective_checks_its_loss_and_trains(workdir):
    ns = run_notebook("02_new_objective.ipynb")  # its cells assert the batched loss = the loop formula
    logged = ns["logged"]
    assert all(math.isfinite(logged[k]) for k in ("train/loss", "train/attract", "train/repel"))
    assert ns["trainer"].global_step == ns["TRAIN_IMAGES"] // ns["BATCH_SIZE"]
    assert 0.0 < ns["knn_monitor"].initial_accuracy <= 1.0 and 0.0 < logged["val/knn_top1"] <= 1.0
    assert type(ns["model"]).__name__ == "SpectralContrastive"


def test_03_evaluate_and_plot_sweeps_knn_and_writes_plots(quickstart, workdir):
    ns = run_notebook("03_evaluate_and_plot.ipynb")
    keys = {(n, k, t) for n in ("random init", "pretrained") for k in ns["K_VALUES"] for t in ns["TEMPERATURES"]}
    assert set(ns["sweep"]) == keys and all(0.0 <= v <= 1.0 for v in ns["sweep"].values())
    # the sweep's k=200, T=0.1 cell on the checkpoint's features is the accuracy 01 measured
    assert ns["sweep"]["pretrained", 200, 0.1] == pytest.approx(quickstart["knn_from_checkpoint"], abs=1e-6)
    for png in (ns["embedding_png"], ns["retrieval_png"]):
        path = Path(png)
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.resolve().is_relative_to(workdir.resolve())
