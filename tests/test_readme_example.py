"""The README's "new method in about 30 lines" example, executed exactly as printed there, trains."""
from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from ssl_lightning import SSLDataModule
from ssl_lightning.methods import METHODS

README = Path(__file__).resolve().parents[1] / "README.md"


def _example_source() -> str:
    text = README.read_text()
    match = re.search(r"<!-- example: new-method -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its new-method example block"
    return match.group(1)


def test_readme_example_trains_and_computes_its_objective():
    source = _example_source()
    assert len(source.strip().splitlines()) <= 35
    namespace: dict = {"__name__": "readme_example"}
    if "align_uniform" in METHODS:  # executed before in this session
        METHODS._items.pop("align_uniform")
    exec(compile(source, str(README), "exec"), namespace)
    cls = namespace["AlignUniform"]
    assert METHODS.get("align_uniform") is cls

    L.seed_everything(0)
    model = cls(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=10,
                proj_hidden=32, proj_out=16, lr=0.5, warmup_epochs=0)
    # the objective is the paper's: check it against a direct computation
    feats = [torch.randn(6, model.backbone.num_features) for _ in range(2)]
    out = model.loss(feats, [], torch.arange(6))
    z_a, z_b = (F.normalize(model.projector(f), dim=1) for f in feats)
    align = ((z_a - z_b) ** 2).sum(1).mean()
    uniform = sum(torch.log(torch.exp(-2 * torch.cdist(z, z) ** 2)[~torch.eye(6, dtype=torch.bool)].mean())
                  for z in (z_a, z_b)) / 2
    torch.testing.assert_close(out["align"], align)
    torch.testing.assert_close(out["uniform"], uniform)

    dm = SSLDataModule("synthetic", batch_size=16, num_workers=0, pin_memory=False, image_size=16,
                       dataset_options={"size": 64, "image_size": 16, "channels": 1})
    before = model.backbone.features[0].weight.detach().clone()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    assert trainer.global_step == 8
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "train/align" in trainer.callback_metrics and "train/uniform" in trainer.callback_metrics
    assert not torch.equal(before, model.backbone.features[0].weight)
