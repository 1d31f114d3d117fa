"""Training-step hygiene: no host synchronisation inside any method's training step, channels-last and
compile switches. On a GPU, a value read back from the device (``.item()``, ``bool(tensor)``,
``int(tensor)``, ``.tolist()``...) stalls the CPU until the device catches up; here every such read
during ``training_step`` is counted on CPU, where they can be intercepted."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from ssl_lightning.cli import SSLCLI

REPO = Path(__file__).resolve().parents[1]
METHODS = ["simclr", "byol", "moco_v2", "mocov3", "simsiam", "swav", "dino", "barlow_twins", "vicreg", "wmse",
           "twist", "muconpro", "npid"]
METHODS += ["autoencoder", "context_encoder"]  # DAE: CPU-seeded noise reads
READS = ["item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"]
SYNTHETIC = '{"size": 64, "num_classes": 4, "channels": 1, "image_size": 28}'


class CountReads(L.Callback):
    """Wraps ``training_step`` from the second batch on (the first may set things up lazily)."""

    def __init__(self) -> None:
        self.reads: list[str] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        step, reads = pl_module.training_step, self.reads

        def counted(batch, batch_idx):
            if batch_idx == 0:
                return step(batch, batch_idx)
            originals = {name: getattr(torch.Tensor, name) for name in READS}

            def wrap(name, fn):
                def read(self, *args, **kwargs):
                    reads.append(name)
                    return fn(self, *args, **kwargs)
                return read
            try:
                for name, fn in originals.items():
                    setattr(torch.Tensor, name, wrap(name, fn))
                return step(batch, batch_idx)
            finally:
                for name, fn in originals.items():
                    setattr(torch.Tensor, name, fn)

        pl_module.training_step = counted


def _cli(method: str, tmp_path, *extra: str) -> SSLCLI:
    extra_model = ["--model.init_args.memory_bank_size", "256"] if method == "muconpro" else []
    if method == "moco_v2":
        extra_model = ["--model.init_args.queue_size", "64"]
    if method == "wmse":
        extra_model = ["--model.init_args.w_size", "16", "--model.init_args.emb", "8"]
    return SSLCLI(run=False, args=[
        "--config", str(REPO / "experiments" / "fashion_mnist" / f"{method}.yaml"), "--run_dir", str(tmp_path),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--data.dataset", "synthetic",
        "--data.dataset_options", SYNTHETIC, "--data.batch_size", "16", "--data.num_workers", "0",
        "--data.pin_memory", "false", "--model.init_args.backbone_kwargs", '{"width": 8}', *extra_model, *extra])


@pytest.mark.parametrize("method", METHODS)
def test_training_step_reads_nothing_back_from_the_device(method: str, tmp_path) -> None:
    cli = _cli(method, tmp_path)
    counter = CountReads()
    cli.trainer.callbacks.append(counter)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3
    assert counter.reads == [], f"{method}'s training step read values back from the device: {counter.reads}"


def test_channels_last_switch_trains_like_the_contiguous_layout(tmp_path) -> None:
    """``channels_last`` puts the model in that layout and changes only the memory order: the same 3 steps
    end at the same weights as with the contiguous layout (rounding aside)."""
    states = []
    for flag in ["false", "true"]:  # the last run, checked for its layout below, is the channels-last one
        cli = _cli("simclr", tmp_path / flag, "--model.init_args.channels_last", flag, "--data.augment", "device")
        seen = []
        cli.trainer.callbacks.append(type("Seen", (L.Callback,), {"on_train_batch_end": lambda self, tr, pl, out, batch, i:
                                                                   seen.append(batch[0][0].shape)})())
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        assert seen and all(s == (16, 1, 28, 28) for s in seen)
        states.append(cli.model.state_dict())
    conv = next(m for m in cli.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    contiguous, channels_last = states
    assert list(contiguous) == list(channels_last)
    for name, value in contiguous.items():
        torch.testing.assert_close(channels_last[name], value, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_compile_switch_keeps_the_state_dict_keys() -> None:
    from ssl_lightning.methods import SimCLR
    plain = SimCLR(backbone="convnet", in_channels=1, num_classes=0)
    compiled = SimCLR(backbone="convnet", in_channels=1, num_classes=0, compile=True)
    assert compiled.backbone._compiled_call_impl is not None  # compiled in place ...
    assert list(compiled.state_dict()) == list(plain.state_dict())  # ... so checkpoints keep their keys
