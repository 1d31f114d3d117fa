"""The learning check: does a short pretraining raise the backbone's kNN accuracy above its
random-initialisation accuracy? Used by tests/test_learning.py and experiments/learning_check.py."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class LearningCheck:
    config: str
    epochs: int
    knn_random_init: float
    knn_trained: float
    probe_trained: float
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)  # every val/ metric after training, the last step's train/

    @property
    def gain(self) -> float:
        return self.knn_trained - self.knn_random_init


def learning_check(config: str, epochs: int, run_dir: str, train_subset: int = 5000, eval_subset: int = 5000,
                   val_subset: int = 2000, extra_args: list[str] | None = None,
                   after_fit: Callable[[Any, Any], dict[str, float]] | None = None) -> LearningCheck:
    """Trains ``config`` (a CLI YAML) for ``epochs`` on a subset, with a full validation first; ``after_fit(model,
    datamodule)`` adds the method's own figures to ``metrics`` (e.g. held-out losses)."""
    from ssl_lightning.callbacks import KNNMonitor
    from ssl_lightning.cli import SSLCLI

    start = time.time()
    cli = SSLCLI(run=False, args=[
        "--config", config, "--run_dir", run_dir, "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.max_epochs", str(epochs), "--trainer.check_val_every_n_epoch", str(epochs),
        "--trainer.num_sanity_val_steps", "-1",  # full validation first: the random-init kNN baseline
        "--data.train_subset", str(train_subset), "--data.eval_subset", str(eval_subset),
        "--data.val_subset", str(val_subset), "--data.pin_memory", "false", *(extra_args or [])])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    knn = next(c for c in cli.trainer.callbacks if isinstance(c, KNNMonitor))
    metrics = cli.trainer.callback_metrics
    extra = after_fit(cli.model, cli.datamodule) if after_fit is not None else {}
    return LearningCheck(config, epochs, float(knn.initial_accuracy), float(metrics["val/knn_top1"]),
                         float(metrics.get("val/probe_top1", float("nan"))), time.time() - start,
                         {k: float(v) for k, v in metrics.items() if k.startswith(("val/", "train/"))} | extra)


def parse_variant_args(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """The benchmark scripts' ``specs [--variant NAME] [-- CLI overrides]`` -> (specs, variant, overrides); overrides
    need a variant name, so that they never overwrite the table's results."""
    argv, overrides = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    variant = None
    if "--variant" in argv:
        i = argv.index("--variant")
        variant, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    if overrides and variant is None:
        raise SystemExit("CLI overrides need --variant NAME (so that they do not overwrite the table's results)")
    return argv, variant, overrides
