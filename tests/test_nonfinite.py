"""A NaN / inf loss stops the run with one message (step, terms, learning rate, fixes) and no checkpoint is written
after it; ``on_nonfinite=skip`` drops such steps' updates instead (ssl_lightning.modules.nonfinite)."""
from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ssl_lightning import SSLDataModule
from ssl_lightning.methods import BYOL, SimCLR
from ssl_lightning.modules.nonfinite import NonFiniteLossError

from ddp_utils import free_port  # tests/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")
SMALL = dict(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=10, optimizer="sgd",
             momentum=0.9, warmup_epochs=1)


class Breaks:
    """Mixin: the method's loss terms plus a finite ``aux`` term; ``term`` gets ``+ value`` (NaN / inf) at the
    global steps ``bad_steps`` and from ``bad_from`` on, on every rank or only on ``bad_rank``."""

    def __init__(self, bad_steps: tuple[int, ...] = (), bad_from: int | None = None, term: str = "loss",
                 value: float = NAN, bad_rank: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)

    def loss(self, feats, views, index):
        out = super().loss(feats, views, index)
        terms = dict(out) if isinstance(out, dict) else {"loss": out}
        terms["aux"] = terms["loss"].detach() * 0
        hp, step = self.hparams, self.trainer.global_step
        bad = step in hp.bad_steps or (hp.bad_from is not None and step >= hp.bad_from)
        if bad and (hp.bad_rank is None or self.global_rank == hp.bad_rank):
            terms[hp.term] = terms[hp.term] + hp.value
        return terms


class BreaksSimCLR(Breaks, SimCLR):
    pass


class BreaksBYOL(Breaks, BYOL):
    pass


def simclr(**kwargs) -> BreaksSimCLR:
    L.seed_everything(0)
    return BreaksSimCLR(proj_hidden=16, proj_out=8, **SMALL, **kwargs)


def data(size: int = 64) -> SSLDataModule:  # batches of 8
    return SSLDataModule("synthetic", batch_size=8, num_workers=0, pin_memory=False, image_size=16,
                         dataset_options={"size": size, "image_size": 16, "channels": 1})


def trainer(callbacks=(), checkpoints: bool = False, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=checkpoints, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks), **kwargs)


class LearningRates(L.Callback):
    """The first group's learning rate at each global step."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.at[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def count_reads(model) -> list[int]:
    """The global steps at which the guard read its record back from the device."""
    guard, steps = model.nonfinite, []
    read = guard._read

    def counted(*args):
        steps.append(model.trainer.global_step)
        return read(*args)

    guard._read = counted
    return steps


# ---- stop ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("term,value,kind", [("loss", NAN, "nan"), ("aux", INF, "inf")])
def test_stop_names_the_first_bad_step_its_term_and_lr_at_the_interval(term, value, kind):
    model = simclr(bad_from=4, term=term, value=value)
    lrs, reads = LearningRates(), count_reads(model)
    with pytest.raises(NonFiniteLossError) as info:
        trainer([lrs], max_epochs=1, log_every_n_steps=3).fit(model, data())
    msg = str(info.value)
    # read back only at the interval boundaries (after 3 and 6 batches), not per step; the FIRST bad step is named
    assert reads == [3, 6]
    assert lrs.at[4] != lrs.at[5]  # warm-up: the learning rate named is step 4's, not a later one
    assert msg.startswith(f"Training stopped at step 6: train/{term} was {kind} at step 4 "
                          f"(epoch 0, learning rate {lrs.at[4]:.4g}). No checkpoint was written after that step. "), msg
    for fix in ["a lower --model.init_args.lr (now 0.3)", "a longer --model.init_args.warmup_epochs (now 1)",
                "--trainer.precision 32-true or bf16-mixed instead of 16-mixed", "--trainer.gradient_clip_val",
                "--model.init_args.on_nonfinite skip"]:
        assert fix in msg
    assert "\n" not in msg


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class DigestAtEpochStart(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path, self.digests = path, {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.path.is_file():
            self.digests[trainer.current_epoch] = _digest(self.path)


def test_no_checkpoint_after_the_bad_step_and_the_last_good_one_loads(tmp_path):
    """4 steps per epoch, NaN at step 5 (epoch 1), no interval check before the end of epoch 1: the end-of-epoch
    save is aborted; last.ckpt stays the intact, finite epoch-0 file."""
    last = tmp_path / "last.ckpt"
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, filename="epoch{epoch:03d}",
                           auto_insert_metric_name=False)  # as the CLI's
    digest = DigestAtEpochStart(last)
    model = simclr(bad_steps=(5,))
    with pytest.raises(NonFiniteLossError) as info:
        trainer([ckpt, digest], checkpoints=True, max_epochs=2, log_every_n_steps=50).fit(model, data(32))
    msg = str(info.value)
    assert "train/loss was nan at step 5 (epoch 1," in msg
    assert f"No checkpoint was written after that step; the newest, {last}, is from before it." in msg
    assert sorted(os.listdir(tmp_path)) == ["epoch000.ckpt", "last.ckpt"]  # no epoch001.ckpt
    assert _digest(last) == digest.digests[1]  # not rewritten during epoch 1
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 4 and saved["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    good = BreaksSimCLR.load_from_checkpoint(last, map_location="cpu").eval()
    assert torch.isfinite(good(torch.randn(2, 1, 16, 16))).all()


class PoisonAfterLastStep(L.Callback):
    """Makes a weight inf after the epoch's last optimizer step, before any loss is computed with it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == trainer.num_training_batches - 1:
            with torch.no_grad():
                pl_module.backbone.features[0].weight[0, 0, 0, 0] = INF


def test_weights_made_nonfinite_are_not_saved(tmp_path):
    model = simclr()
    with pytest.raises(NonFiniteLossError) as info:
        trainer([ModelCheckpoint(dirpath=tmp_path, save_last=True), PoisonAfterLastStep()], checkpoints=True,
                max_epochs=1).fit(model, data(32))
    msg = str(info.value)
    assert msg.startswith("Training stopped at step 4: the model's state became non-finite "
                          "(backbone.features.0.weight), learning rate "), msg
    assert "This checkpoint was not written." in msg
    assert os.listdir(tmp_path) == []


# ---- skip ----------------------------------------------------------------------------------------------------
class Snapshots(L.Callback):
    """Parameters (teachers included) and optimizer state before each global step."""

    def __init__(self) -> None:
        self.at: dict[int, tuple[dict, dict]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        state = {(i, k): v.clone() for i, s in trainer.optimizers[0].state_dict()["state"].items()
                 for k, v in s.items() if torch.is_tensor(v)}
        self.at[trainer.global_step] = (params, state)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_skip_leaves_weights_optimizer_state_and_teacher_unchanged():
    L.seed_everything(0)
    model = BreaksBYOL(bad_steps=(2, 3), on_nonfinite="skip", proj_hidden=16, proj_out=8, pred_hidden=16,
                       momentum_base=0.9, **SMALL)
    snaps = Snapshots()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer([snaps], max_epochs=1, log_every_n_steps=50)
        t.fit(model, data())
    assert t.global_step == 8 and t.state.finished  # the skipped steps count, training goes on to the end
    skipped = [str(w.message) for w in caught if "update was skipped" in str(w.message)]
    assert len(skipped) == 2
    assert skipped[0].startswith("Step 2: train/loss was nan; its update was skipped") and skipped[1].startswith("Step 3:")
    assert float(t.callback_metrics["train/skipped_steps"]) == 2
    (p1, s1), (p2, s2), (p4, s4), (p5, s5) = (snaps.at[i] for i in (1, 2, 4, 5))
    assert any(n.startswith("teacher_") for n in p2) and len(s2) > 0  # teachers and momentum buffers are compared
    assert _same(p2, p4) and _same(s2, s4)  # steps 2 and 3 changed nothing
    for a, b in ((p1, p2), (p4, p5)):  # the good steps around them did change weights and teacher
        assert not torch.equal(a["backbone.features.0.weight"], b["backbone.features.0.weight"])
        assert not torch.equal(a["teacher_backbone.features.0.weight"], b["teacher_backbone.features.0.weight"])
    assert not _same(s4, s5)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_warnings_are_rate_limited_and_a_run_of_skips_stops():
    model = simclr(bad_from=0, on_nonfinite="skip", max_consecutive_skips=0)  # never stops: 12 skipped steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(max_epochs=1, log_every_n_steps=50)
        t.fit(model, data(96))
    skipped = [str(w.message) for w in caught if "update was skipped" in str(w.message)]
    assert float(t.callback_metrics["train/skipped_steps"]) == 12
    assert len(skipped) == 10 and "from now on every 100th skipped step is reported" in skipped[-1]

    model = simclr(bad_from=2, on_nonfinite="skip", max_consecutive_skips=3)
    with pytest.raises(NonFiniteLossError) as info, pytest.warns(UserWarning, match="its update was skipped"):
        trainer(max_epochs=1, log_every_n_steps=50).fit(model, data())
    assert str(info.value).startswith("Training stopped at step 4: 3 non-finite steps in a row (on_nonfinite=skip, "
                                      "max_consecutive_skips=3), the first: train/loss was nan at step 2 (epoch 0, ")


def test_bad_mode_is_an_ssl_error():
    from ssl_lightning import SSLError

    with pytest.raises(SSLError, match="'stop' or 'skip'"):
        SimCLR(on_nonfinite="ignore", **SMALL)


# ---- through the command line ------------------------------------------------------------------------------
def test_cli_huge_learning_rate_exits_2_with_one_error_line(tmp_path, capsys, monkeypatch):
    from ssl_lightning.cli import main  # here: test_ddp's spawned processes import this file, they need no CLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ssl-lightning"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(REPO / "experiments/fashion_mnist/simclr.yaml"), "--model.init_args.lr", "1e12",
              "--model.init_args.backbone_kwargs", "{width: 8}", "--model.init_args.proj_hidden", "16",
              "--data.dataset", "synthetic", "--data.dataset_options", "{size: 64, channels: 1, image_size: 28}",
              "--data.batch_size", "16", "--data.num_workers", "0", "--data.pin_memory", "false",
              "--trainer.logger", "false", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
              "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false", "--run_dir", "run"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith("error: Training stopped at step 4: train/loss was nan at step "), errors[0]
    assert "learning rate" in errors[0] and "--model.init_args.lr (now 1e+12)" in errors[0]
    assert "Traceback" not in err
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # the end-of-epoch checkpoint was not written


# ---- DDP: a NaN on one rank only (run in test_ddp.py's shared 2-process spawn) ---------------------------------
def scenario_one_rank_nan(rank: int, world: int, out: Path) -> dict:
    """Lightning's DDP on the scenario's process group (LOCAL_RANK set: Lightning launches nothing); rank 1 alone
    has a NaN loss at step 1. Stop mode: both ranks stop with the same message; skip mode: both skip."""
    environ = dict(os.environ)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = {}
    try:
        for mode in ("stop", "skip"):
            model = simclr(bad_steps=(1,), bad_rank=1, on_nonfinite=mode)
            t = trainer(max_epochs=1, log_every_n_steps=3, devices=world, strategy="ddp")
            try:
                t.fit(model, data())  # 64 images / (8 x 2) = 4 steps
                result[mode] = {"steps": t.global_step, "skipped": model.nonfinite.skipped_steps,
                                "weight": model.backbone.features[0].weight.detach().clone()}
            except NonFiniteLossError as err:
                result[mode] = {"error": str(err), "steps": t.global_step}
    finally:  # the next scenarios of the shared spawn see the environment they had
        os.environ.clear()
        os.environ.update(environ)
    return result


def check_one_rank_nan(results: list[dict]) -> None:
    """Without gathering the flags, rank 0 would train on (stop: into a collective rank 1 never joins; skip: with
    weights that differ from rank 1's)."""
    stop = [res["stop"] for res in results]
    assert all("error" in s and s["steps"] == 3 for s in stop), stop
    assert stop[0]["error"] == stop[1]["error"]
    assert stop[0]["error"].startswith("Training stopped at step 3: train/loss was nan at step 1 (epoch 0, rank 1, ")
    skip = [res["skip"] for res in results]
    assert [s["steps"] for s in skip] == [4, 4] and [s["skipped"] for s in skip] == [1, 1]
    assert torch.equal(skip[0]["weight"], skip[1]["weight"])  # the ranks stayed in step
