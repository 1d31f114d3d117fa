"""Peer comparison: SimCLR and BYOL through ssl_lightning vs the same recipe written as a plain PyTorch
loop from lightly's components (its transforms, heads, losses and momentum utilities).

Same backbone (our small ConvNet, so the networks are identical), batch, augmentation parameters,
optimizer, schedule and epochs, on a seeded Fashion-MNIST subset; both are scored by the same weighted
kNN (k 200, T 0.1) on the same un-augmented train / test subsets. Throughput counts training images
per second over the training epochs only (no validation in either timing).

Each seed sets, on both sides, the subsets, the model's initialisation, the data order and the
augmentations' random stream; a short run's kNN moves by about 0.01 from seed to seed, so the verdict is
the mean over seeds of the paired difference (ssl_lightning - lightly loop, same seed) with its standard
error. ``--augments`` runs ssl_lightning with each input pipeline against the same lightly loop.

    python experiments/bench/peer.py --epochs 10 --seeds 0 1 2 3 --methods simclr   # the README's SimCLR rows
    python experiments/bench/peer.py --epochs 10 --seeds 0 1 2                      # its BYOL rows (*)
Writes experiments/results/bench/peer<tag>.{json,md}. (*) That run's files were renamed
peer_byol_and_previous_simclr_head.{json,md}: its SimCLR rows predate SimCLR's official last BatchNorm.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.functional import to_pil_image

from ssl_lightning.data.datamodule import TransformDataset, _subset

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "results" / "bench"
CONFIGS = {"simclr": HERE.parent / "fashion_mnist" / "simclr.yaml", "byol": HERE.parent / "fashion_mnist" / "byol.yaml"}


class TrainTimer(L.Callback):
    """Training seconds and images, validation excluded (from the first batch's start to the last's end)."""

    def __init__(self) -> None:
        self.seconds, self.images, self._t0 = 0.0, 0, None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images += batch[0][0].shape[0]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds += time.perf_counter() - self._t0


def run_ours(method: str, seed: int, epochs: int, train_subset: int, eval_subset: int, val_subset: int,
             workers: int, extra: list[str]) -> dict:
    from ssl_lightning.callbacks import KNNMonitor
    from ssl_lightning.cli import SSLCLI

    timer = TrainTimer()
    with tempfile.TemporaryDirectory() as run_dir:
        cli = SSLCLI(run=False, args=[
            "--config", str(CONFIGS[method]), "--run_dir", run_dir, "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.accelerator", "cpu", "--trainer.max_epochs", str(epochs),
            "--trainer.check_val_every_n_epoch", str(epochs), "--trainer.num_sanity_val_steps", "0",
            "--data.train_subset", str(train_subset), "--data.eval_subset", str(eval_subset),
            "--data.val_subset", str(val_subset), "--data.num_workers", str(workers),
            "--data.pin_memory", "false", "--seed_everything", str(seed), "--data.seed", str(seed), *extra])
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        knn = float(cli.trainer.callback_metrics["val/knn_top1"])
        assert any(isinstance(c, KNNMonitor) for c in cli.trainer.callbacks)
        hp, dm = cli.model.hparams, cli.datamodule
    return {"images_per_s": timer.images / timer.seconds, "train_seconds": timer.seconds, "knn_top1": knn,
            "batch_size": dm.batch_size, "optimizer": hp.optimizer, "lr_per_256": hp.lr}


# ---- the peer: a plain loop from lightly's pieces (the same seeded subsets as SSLDataModule's) ---------
def run_lightly(method: str, seed: int, epochs: int, train_subset: int, eval_subset: int, val_subset: int,
                workers: int) -> dict:
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform, SimCLRTransform
    from lightly.utils.scheduler import cosine_schedule
    from torchvision import transforms as T

    from ssl_lightning.backbones import build_backbone
    from ssl_lightning.data.datasets import DATASETS
    from ssl_lightning.evaluation.knn import weighted_knn

    torch.manual_seed(seed)
    spec = DATASETS.get("fashion_mnist")
    norm = {"mean": list(spec.mean), "std": list(spec.std)}
    train, test = spec.load(spec.default_root, "train", False), spec.load(spec.default_root, "val", False)
    backbone = build_backbone("convnet", in_channels=1)
    if method == "simclr":  # experiments/fashion_mnist/simclr.yaml: scale 0.3-1, jitter 0.4/0.4/0.4/0.1, no blur
        transform = SimCLRTransform(input_size=28, cj_strength=0.5, min_scale=0.3, gaussian_blur=0.0, normalize=norm)
        batch, lr, wd = 128, 1.2 * 128 / 256, 5e-4
        heads = torch.nn.ModuleDict({"proj": SimCLRProjectionHead(256, 512, 128)})
        criterion = NTXentLoss(temperature=0.5)
        optimizer = torch.optim.SGD(list(backbone.parameters()) + list(heads.parameters()), lr=lr, momentum=0.9, weight_decay=wd)
    else:  # experiments/fashion_mnist/byol.yaml: scale 0.3-1, jitter 0.4/0.4/0.2/0.1, no blur, solarize 0 / 0.2
        common = dict(input_size=28, min_scale=0.3, gaussian_blur=0.0, normalize=norm)
        transform = BYOLTransform(BYOLView1Transform(**common, solarization_prob=0.0),
                                  BYOLView2Transform(**common, solarization_prob=0.2))
        batch, lr, wd = 64, 2e-3 * 64 / 256, 1e-4
        heads = torch.nn.ModuleDict({"proj": BYOLProjectionHead(256, 512, 128), "pred": BYOLPredictionHead(128, 512, 128)})
        criterion = NegativeCosineSimilarity()
        optimizer = torch.optim.AdamW(list(backbone.parameters()) + list(heads.parameters()), lr=lr, weight_decay=wd)
        teacher = torch.nn.ModuleDict({"backbone": copy.deepcopy(backbone), "proj": copy.deepcopy(heads["proj"])})
        deactivate_requires_grad(teacher)
    pretrain = TransformDataset(_subset(train, train_subset, seed), lambda image: transform(to_pil_image(image)))
    loader = DataLoader(pretrain, batch_size=batch, shuffle=True,
                        drop_last=True, num_workers=workers, persistent_workers=workers > 0)
    steps, warmup = epochs * len(loader), len(loader)  # 1 warm-up epoch, then cosine, per step (as the configs)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    seconds, images, step = 0.0, 0, 0
    for _ in range(epochs):
        backbone.train(), heads.train()
        t0 = time.perf_counter()
        for (x0, x1), _ in loader:
            if method == "simclr":
                z = heads["proj"](backbone(torch.cat([x0, x1]))).chunk(2)
                loss = criterion(*z)
            else:
                m = cosine_schedule(step, steps, 0.99, 1.0)
                update_momentum(backbone, teacher["backbone"], m)
                update_momentum(heads["proj"], teacher["proj"], m)
                p0, p1 = (heads["pred"](heads["proj"](backbone(x))) for x in (x0, x1))
                with torch.no_grad():
                    t0_, t1_ = (teacher["proj"](teacher["backbone"](x)) for x in (x0, x1))
                loss = 0.5 * (criterion(p0, t1_) + criterion(p1, t0_))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sched.step()
            images, step = images + x0.shape[0], step + 1
        seconds += time.perf_counter() - t0
    evaluate = T.Compose([T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    feats = {}
    backbone.eval()
    with torch.no_grad():
        for name, ds in (("bank", _subset(train, eval_subset, seed)), ("query", _subset(test, val_subset, seed))):
            loader = DataLoader(TransformDataset(ds, lambda image: evaluate(to_pil_image(image))), batch_size=512)
            out = [(backbone(x), y) for x, y in loader]
            feats[name] = torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
    pred = weighted_knn(*feats["bank"], feats["query"][0], 10, k=200, temperature=0.1)
    return {"images_per_s": images / seconds, "train_seconds": seconds,
            "knn_top1": float((pred == feats["query"][1]).float().mean()), "batch_size": batch}


def decay_everything() -> None:
    """Patches ssl_lightning's parameter groups so that weight decay applies to every parameter, biases and
    norm parameters included, as in the lightly loop (an experiment on the kNN gap, not a feature)."""
    import ssl_lightning.methods.base as base

    grouped = base.param_groups
    base.param_groups = lambda params, weight_decay, **extra: [  # noqa: E731
        {"params": [p for g in grouped(params, weight_decay, **extra) for p in g["params"]],
         "weight_decay": weight_decay, **extra}]


def summarise(rows: list[dict], method: str, augment: str) -> dict:
    """Mean kNN of each side over seeds, the paired difference's mean and standard error, median speed ratio."""
    pairs = [(r["ssl_lightning"][augment], r["lightly_loop"]) for r in rows if r["method"] == method]
    diff = [o["knn_top1"] - q["knn_top1"] for o, q in pairs]
    se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return {"method": method, "augment": augment, "seeds": len(pairs),
            "speed_ratio": statistics.median(o["images_per_s"] / q["images_per_s"] for o, q in pairs),
            "images_per_s": statistics.median(o["images_per_s"] for o, _ in pairs),
            "lightly_images_per_s": statistics.median(q["images_per_s"] for _, q in pairs),
            "knn": statistics.mean(o["knn_top1"] for o, _ in pairs),
            "lightly_knn": statistics.mean(q["knn_top1"] for _, q in pairs),
            "knn_difference": statistics.mean(diff), "knn_difference_se": se}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["simclr", "byol"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--augments", nargs="+", default=["device", "workers"], help="ssl_lightning's input pipelines")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train_subset", type=int, default=5000)
    p.add_argument("--eval_subset", type=int, default=5000)
    p.add_argument("--val_subset", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ours_args", nargs="*", default=[], help="extra CLI flags for the ssl_lightning runs")
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--loop_from", default=None, help="reuse the lightly loop's rows (same method and seed) from this "
                   "earlier peer JSON instead of running it again (the loop is deterministic on a CPU)")
    p.add_argument("--decay_all", action="store_true",
                   help="experiment: ssl_lightning decays every parameter, biases and norms too, as the loop does")
    a = p.parse_args()
    if a.decay_all:
        decay_everything()
    sys.argv = sys.argv[:1]
    OUT.mkdir(parents=True, exist_ok=True)
    extra = [f for arg in a.ours_args for f in arg.split()]
    sizes = (a.epochs, a.train_subset, a.eval_subset, a.val_subset, a.workers)
    reused = {(r["method"], r["seed"]): r["lightly_loop"]
              for r in json.loads(Path(a.loop_from).read_text())["rows"]} if a.loop_from else {}
    rows = []
    for method in a.methods:
        for seed in a.seeds:
            ours = {augment: run_ours(method, seed, *sizes, ["--data.augment", augment, *extra]) for augment in a.augments}
            peer = reused[method, seed] if a.loop_from else run_lightly(method, seed, *sizes)
            rows.append({"method": method, "seed": seed, "ssl_lightning": ours, "lightly_loop": peer})
            print(f"{method} seed {seed}: lightly loop {peer['images_per_s']:.0f} img/s kNN {peer['knn_top1']:.4f} | " +
                  " | ".join(f"ours [{m}] {o['images_per_s']:.0f} img/s kNN {o['knn_top1']:.4f}" for m, o in ours.items()),
                  flush=True)
    summary = [summarise(rows, method, augment) for method in a.methods for augment in a.augments]
    record = {"settings": vars(a), "torch_threads": torch.get_num_threads(), "rows": rows, "summary": summary,
              "date": time.strftime("%Y-%m-%d")}
    (OUT / f"peer{a.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| method | ssl_lightning pipeline | seeds | ssl_lightning img/s | lightly loop img/s | speed ratio | "
             "kNN ssl_lightning | kNN lightly loop | kNN difference (+- s.e.) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['method']} | {r['augment']} | {r['seeds']} | {r['images_per_s']:.0f} | {r['lightly_images_per_s']:.0f} | "
                     f"{r['speed_ratio']:.2f} | {r['knn']:.4f} | {r['lightly_knn']:.4f} | "
                     f"{r['knn_difference']:+.4f} +- {r['knn_difference_se']:.4f} |")
    per_seed = ["| method | seed | kNN lightly loop | " + " | ".join(f"kNN {m} | img/s {m}" for m in a.augments) +
                " | img/s lightly loop |", "|---|---|---|" + "---|---|" * len(a.augments) + "---|"]
    for r in rows:
        per_seed.append(f"| {r['method']} | {r['seed']} | {r['lightly_loop']['knn_top1']:.4f} | " + " | ".join(
            f"{r['ssl_lightning'][m]['knn_top1']:.4f} | {r['ssl_lightning'][m]['images_per_s']:.0f}" for m in a.augments) +
            f" | {r['lightly_loop']['images_per_s']:.0f} |")
    header = (f"Fashion-MNIST subset {a.train_subset}, {a.epochs} epochs, small ConvNet, {a.workers} loader workers, CPU "
              f"({time.strftime('%Y-%m-%d')}); speed: median over seeds; kNN: mean over seeds; difference: ssl_lightning - "
              f"lightly loop, paired by seed; extra ssl_lightning flags: {' '.join(extra) or 'none'}"
              f"{'; experiment: ssl_lightning decays every parameter (--decay_all)' if a.decay_all else ''}"
              f"{f'; lightly loop rows reused from {a.loop_from}' if a.loop_from else ''}")
    table = "\n".join(lines)
    (OUT / f"peer{a.tag}.md").write_text(header + "\n\n" + table + "\n\nPer seed:\n\n" + "\n".join(per_seed) + "\n")
    print(table)
    print("\n".join(per_seed))


if __name__ == "__main__":
    main()
