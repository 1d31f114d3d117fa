"""The size of per-dataset state (memory banks, targets, pseudo-labels): one row per pretraining image.

Such state lives in buffers, which must exist before a checkpoint is loaded into them. A method therefore takes
``num_samples`` as a hyperparameter: given, the buffers are built in ``__init__`` (``load_from_checkpoint`` gets it
from the saved hyperparameters); left None, :func:`resolve_num_samples` reads it in ``setup`` from the datamodule's
pretraining set -- Lightning runs ``setup`` before it restores a checkpoint, so ``fit(ckpt_path=...)`` finds the
buffers there -- and records it in the hyperparameters (as the probe's ``num_classes``).
"""
from __future__ import annotations

import lightning as L

from ssl_lightning.registry import SSLError


def pretrain_set_size(module: L.LightningModule) -> int | None:
    """Images in the attached datamodule's pretraining set (None without a trainer, datamodule or set)."""
    trainer = module._trainer
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    dataset = getattr(dm, "pretrain_set", None)
    if dataset is None:  # a SemiSupervisedDataModule: the unlabelled stream's images
        dataset = getattr(dm, "unlabelled_set", None)
    return None if dataset is None else len(dataset)


def resolve_num_samples(module: L.LightningModule, method: str) -> int | None:
    """``num_samples`` from the hyperparameters or, when None, from the pretraining set (then recorded in the
    hyperparameters); checks that the two agree. None when neither is known (e.g. ``validate`` without data)."""
    given, found = module.hparams.get("num_samples"), pretrain_set_size(module)
    if given is not None and found is not None and int(given) != found:
        raise SSLError(f"{method}'s per-image state has num_samples={given} rows but the pretraining set has {found} "
                       f"images (data.train_subset or the dataset changed?): set model.init_args.num_samples to {found} "
                       "or leave it out (null) to take the size from the data; a checkpoint only resumes on the same "
                       "training set")
    if given is None and found is not None:
        module.hparams.num_samples = found  # saved with checkpoints: loading rebuilds the state at this size
    return module.hparams.get("num_samples")


def require_num_samples(module: L.LightningModule, method: str) -> int:
    """As :func:`resolve_num_samples`, but an error naming the fix when the size is unknown."""
    n = resolve_num_samples(module, method)
    if n is None:
        raise SSLError(f"{method} keeps one row per training image but cannot tell how many there are (no datamodule "
                       "with a pretraining set): set model.init_args.num_samples to the training set's size")
    return int(n)


class PerSampleState:
    """Mixin (before :class:`~ssl_lightning.methods.SSLMethod` in the bases) for a method with one row of state per
    pretraining image: the method defines ``_build_state(n)`` and ``state_name``; the state is built by
    ``build_state`` in ``__init__`` when ``num_samples`` is given, else in ``setup`` from the datamodule."""

    state_name = "per-image state"
    _state_rows: int | None = None

    def _build_state(self, n: int) -> None:
        raise NotImplementedError

    def build_state(self, n: int) -> None:
        self._build_state(int(n))
        self._state_rows = int(n)

    def setup(self, stage: str) -> None:
        super().setup(stage)  # type: ignore[misc]
        method = type(self).__name__
        n = require_num_samples(self, method) if stage == "fit" else resolve_num_samples(self, method)
        if self._state_rows is None and n is not None:
            self.build_state(n)

    def require_state(self) -> None:
        """An error naming the fix when the state was never built (a forward pass outside a Trainer)."""
        if self._state_rows is None:
            raise SSLError(f"{type(self).__name__} has not built its {self.state_name}: set model.init_args.num_samples, "
                           "or train through a Trainer with the datamodule (setup reads the training set's size)")
