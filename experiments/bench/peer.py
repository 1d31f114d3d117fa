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

The README's tables (each run writes experiments/results/bench/peer<tag>.{json,md}):

    python experiments/bench/peer.py --methods simclr --seeds 0 1 2 3 --tag _concat \
        --loop_from experiments/results/bench/peer_simclr_per_view_projector.json
    python experiments/bench/peer.py --methods simclr --augments device --seeds 4 5 6 7 8 9 --tag _seeds4to9
    python experiments/bench/peer.py --methods simclr --merge <the two JSONs above>              # -> peer.*
    python experiments/bench/peer.py --methods byol --augments device --seeds 3 4 5 6 7 --tag _byol_seeds3to7
    python experiments/bench/peer.py --methods byol --merge peer_byol_and_previous_simclr_head.json \
        peer_byol_seeds3to7.json --tag _byol                                                     # -> peer_byol.*
    python experiments/bench/peer.py --methods simclr --augments device --seeds 0 1 2 3 4 5 6 7 8 9 \
        --decay_all --center_shift --loop_from experiments/results/bench/peer.json --tag _same_recipe

``--loop_from`` reuses the loop's rows of an earlier JSON (the loop is deterministic on a CPU; its timings
then come from another moment, so the speed ratio is taken from the seeds whose loop ran in the same run).
``--decay_all``, ``--center_shift`` and ``--lightly_views`` are experiments on the kNN difference: each makes
ssl_lightning follow the loop in one place where the two differ (weight decay on every parameter; a shift in
SimCLR's last BatchNorm; lightly's PIL transforms instead of torchvision's tensor ops).
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
def lightly_transform(method: str):
    """lightly's PIL transform of the config's views: image -> [view 1, view 2]."""
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform, SimCLRTransform

    from ssl_lightning.data.datasets import DATASETS

    spec = DATASETS.get("fashion_mnist")
    norm = {"mean": list(spec.mean), "std": list(spec.std)}
    if method == "simclr":  # experiments/fashion_mnist/simclr.yaml: scale 0.3-1, jitter 0.4/0.4/0.4/0.1, no blur
        return SimCLRTransform(input_size=28, cj_strength=0.5, min_scale=0.3, gaussian_blur=0.0, normalize=norm)
    # experiments/fashion_mnist/byol.yaml: scale 0.3-1, jitter 0.4/0.4/0.2/0.1, no blur, solarize 0 / 0.2
    common = dict(input_size=28, min_scale=0.3, gaussian_blur=0.0, normalize=norm)
    return BYOLTransform(BYOLView1Transform(**common, solarization_prob=0.0),
                         BYOLView2Transform(**common, solarization_prob=0.2))


def run_lightly(method: str, seed: int, epochs: int, train_subset: int, eval_subset: int, val_subset: int,
                workers: int) -> dict:
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule
    from torchvision import transforms as T

    from ssl_lightning.backbones import build_backbone
    from ssl_lightning.data.datasets import DATASETS
    from ssl_lightning.evaluation.knn import weighted_knn

    torch.manual_seed(seed)
    spec = DATASETS.get("fashion_mnist")
    train, test = spec.load(spec.default_root, "train", False), spec.load(spec.default_root, "val", False)
    backbone = build_backbone("convnet", in_channels=1)
    transform = lightly_transform(method)
    if method == "simclr":
        batch, lr, wd = 128, 1.2 * 128 / 256, 5e-4
        heads = torch.nn.ModuleDict({"proj": SimCLRProjectionHead(256, 512, 128)})
        criterion = NTXentLoss(temperature=0.5)
        optimizer = torch.optim.SGD(list(backbone.parameters()) + list(heads.parameters()), lr=lr, momentum=0.9, weight_decay=wd)
    else:
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


def shift_simclr_head() -> None:
    """Patches SimCLR's projector so that its last BatchNorm learns a shift, as lightly's
    ``SimCLRProjectionHead`` does (the official head has none; an experiment, not a feature)."""
    import ssl_lightning.methods.joint_embedding.simclr as simclr

    plain = simclr.mlp
    simclr.mlp = lambda dims, **kw: plain(dims, **{**kw, "last_center": True})  # noqa: E731


def use_lightly_views(method: str) -> None:
    """Patches the per-image (``workers``) pipeline to make the views with lightly's PIL transform, the loop's
    (an experiment on the kNN gap: PIL vs torchvision tensor ops; needs ``--augments workers``)."""
    import ssl_lightning.data.datamodule as datamodule

    transform = lightly_transform(method)
    datamodule.MultiViewTransform = lambda views, mean, std: lambda image: transform(to_pil_image(image))  # noqa: E731


def summarise(rows: list[dict], method: str, augment: str) -> dict:
    """Mean kNN of each side over seeds, the paired difference's mean and standard error, median speed ratio."""
    rows = [r for r in rows if r["method"] == method and augment in r["ssl_lightning"]]
    pairs = [(r["ssl_lightning"][augment], r["lightly_loop"]) for r in rows]
    diff = [o["knn_top1"] - q["knn_top1"] for o, q in pairs]
    se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    # speed from the seeds whose loop ran in the same run (a reused loop row was timed at another moment)
    timed = [(r["ssl_lightning"][augment], r["lightly_loop"]) for r in rows if not r.get("loop_reused")]
    reused, timed = not timed, timed or pairs
    return {"method": method, "augment": augment, "seeds": len(pairs), "speed_seeds": len(timed), "loop_reused": reused,
            "speed_ratio": statistics.median(o["images_per_s"] / q["images_per_s"] for o, q in timed),
            "images_per_s": statistics.median(o["images_per_s"] for o, _ in timed),
            "lightly_images_per_s": statistics.median(q["images_per_s"] for _, q in timed),
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
    p.add_argument("--center_shift", action="store_true",
                   help="experiment: SimCLR's last BatchNorm learns a shift, as in lightly's head")
    p.add_argument("--lightly_views", action="store_true",
                   help="experiment: the workers pipeline makes its views with lightly's PIL transform, as the loop")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="train nothing: pool the rows of earlier peer JSONs (of --methods) into peer<tag>.{json,md}")
    a = p.parse_args()
    if a.lightly_views and (a.augments != ["workers"] or len(a.methods) != 1):
        p.error("--lightly_views patches the per-image pipeline of one method: use --augments workers --methods <one>")
    if a.decay_all:
        decay_everything()
    if a.center_shift:
        shift_simclr_head()
    if a.lightly_views:
        use_lightly_views(a.methods[0])
    sys.argv = sys.argv[:1]
    OUT.mkdir(parents=True, exist_ok=True)
    if a.merge:
        records = [json.loads(Path(f).read_text()) for f in a.merge]
        rows = [{**r, "loop_reused": bool(r.get("loop_reused") or rec["settings"].get("loop_from"))}
                for rec in records for r in rec["rows"] if r["method"] in a.methods]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        augments = list(dict.fromkeys(m for r in rows for m in r["ssl_lightning"]))
        return write(rows, methods, augments, records[0]["settings"], a.tag, f"merged from {' '.join(a.merge)}")
    extra = [f for arg in a.ours_args for f in arg.split()]
    sizes = (a.epochs, a.train_subset, a.eval_subset, a.val_subset, a.workers)
    reused = {(r["method"], r["seed"]): r["lightly_loop"]
              for r in json.loads(Path(a.loop_from).read_text())["rows"]} if a.loop_from else {}
    rows = []
    for method in a.methods:
        for seed in a.seeds:
            ours = {augment: run_ours(method, seed, *sizes, ["--data.augment", augment, *extra]) for augment in a.augments}
            peer = reused[method, seed] if a.loop_from else run_lightly(method, seed, *sizes)
            rows.append({"method": method, "seed": seed, "ssl_lightning": ours, "lightly_loop": peer,
                         "loop_reused": bool(a.loop_from)})
            print(f"{method} seed {seed}: lightly loop {peer['images_per_s']:.0f} img/s kNN {peer['knn_top1']:.4f} | " +
                  " | ".join(f"ours [{m}] {o['images_per_s']:.0f} img/s kNN {o['knn_top1']:.4f}" for m, o in ours.items()),
                  flush=True)
    notes = [f"extra ssl_lightning flags: {' '.join(extra) or 'none'}"]
    notes += ["experiment: ssl_lightning decays every parameter (--decay_all)"] * a.decay_all
    notes += ["experiment: SimCLR head with a learned last-BN shift (--center_shift)"] * a.center_shift
    notes += ["experiment: views from lightly PIL transform (--lightly_views)"] * a.lightly_views
    notes += [f"lightly loop rows reused from {a.loop_from}"] * bool(a.loop_from)
    write(rows, a.methods, a.augments, vars(a), a.tag, "; ".join(notes))


def write(rows: list[dict], methods: list[str], augments: list[str], settings: dict, tag: str, notes: str) -> None:
    """peer<tag>.json and peer<tag>.md: the summary per method and pipeline, then the seeds."""
    summary = [summarise(rows, method, augment) for method in methods for augment in augments
               if any(r["method"] == method and augment in r["ssl_lightning"] for r in rows)]
    record = {"settings": settings, "torch_threads": torch.get_num_threads(), "rows": rows, "summary": summary,
              "date": time.strftime("%Y-%m-%d"), "notes": notes}
    (OUT / f"peer{tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| method | ssl_lightning pipeline | seeds | ssl_lightning img/s | lightly loop img/s | speed ratio (seeds) | "
             "kNN ssl_lightning | kNN lightly loop | kNN difference (+- s.e.) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['method']} | {r['augment']} | {r['seeds']} | {r['images_per_s']:.0f} | {r['lightly_images_per_s']:.0f} | "
                     f"{r['speed_ratio']:.2f} ({r['speed_seeds']}{', loop reused' if r['loop_reused'] else ''}) | {r['knn']:.4f} | {r['lightly_knn']:.4f} | "
                     f"{r['knn_difference']:+.4f} +- {r['knn_difference_se']:.4f} |")
    per_seed = ["| method | seed | kNN lightly loop | " + " | ".join(f"kNN {m} | img/s {m}" for m in augments) +
                " | img/s lightly loop |", "|---|---|---|" + "---|---|" * len(augments) + "---|"]
    for r in rows:
        ours = r["ssl_lightning"]
        per_seed.append(f"| {r['method']} | {r['seed']} | {r['lightly_loop']['knn_top1']:.4f} | " + " | ".join(
            f"{ours[m]['knn_top1']:.4f} | {ours[m]['images_per_s']:.0f}" if m in ours else "- | -" for m in augments) +
            f" | {r['lightly_loop']['images_per_s']:.0f}{' (reused)' if r.get('loop_reused') else ''} |")
    header = (f"Fashion-MNIST subset {settings['train_subset']}, {settings['epochs']} epochs, small ConvNet, "
              f"{settings['workers']} loader workers, CPU ({time.strftime('%Y-%m-%d')}); speed: median over the seeds "
              f"whose loop ran in the same run; kNN: mean over seeds; difference: ssl_lightning - lightly loop, paired "
              f"by seed; {notes}")
    table = "\n".join(lines)
    (OUT / f"peer{tag}.md").write_text(header + "\n\n" + table + "\n\nPer seed:\n\n" + "\n".join(per_seed) + "\n")
    print(table)
    print("\n".join(per_seed))


if __name__ == "__main__":
    main()
