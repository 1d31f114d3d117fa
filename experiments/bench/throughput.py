"""Throughput: the full training step through the framework against the bare backbone.

For each method (SimCLR, BYOL, SwAV multi-crop) with the same backbone, batch and views:
  (a) the limit: the bare backbone's forward + backward on fixed tensors of the method's view shapes
      (views of one shape in one pass, as most methods run them; BYOL runs one pass per view), no data,
      no heads, no optimizer;
  (m) the method's own compute on the same fixed tensors outside Lightning: backbone, heads, teacher,
      loss, backward and an SGD step (no data, augmentation, probe or logging);
  (b) the full training step through ssl_lightning: Trainer, loader, augmentation (per-image workers or
      batched on the device, ``--augment``), heads, loss, teacher, optimizer, online probe and logging;
measured in training images per second after a warm-up, all three in the same memory format
(channels-last, ``model.channels_last``; ``--no-channels_last`` for the contiguous layout). The headline
is b / a; b / m isolates the framework's and the input pipeline's cost from the method's own extra
compute (BYOL's teacher forward, heads, loss).

The speed of this shared 2-core machine drifts by up to 25% between minutes, so a, m and b are measured
in ``--rounds`` interleaved rounds (b for each pipeline, then a and m right after) and each ratio is the
median over rounds of the ratio within a round; the table also gives the lowest and highest.
``ceiling.py`` measures m / a without that drift (each part of the step timed one step at a time, in turn).

    python experiments/bench/throughput.py                          # CPU, small ConvNet, Fashion-MNIST, batch 256
    python experiments/bench/throughput.py --dataset cifar10 --root <dir> --backbone resnet18 \
        --backbone_kwargs '{"cifar_stem": true}' --batch_size 512 --precision bf16-mixed --tag _gpu
Writes experiments/results/bench/throughput<tag>.{json,md} (``--out``: another folder). ``experiments/bench/gpu.sh``
runs it on one GPU: ResNet-18 at CIFAR size in bf16 on generated images (``--dataset synthetic --dataset_options``).
The README's figures come from
    python experiments/bench/throughput.py --rounds 5 --steps 30                    # throughput.*
    python experiments/bench/throughput.py --no-channels_last --tag _contiguous     # throughput_contiguous.* (*)
    python experiments/bench/throughput.py --methods simclr byol --augment device [--no-channels_last] \
        --tag _layout_{channels_last,contiguous}                                     # back to back
    python experiments/bench/throughput.py --methods simclr --augment device --rounds 2 --backbone resnet18 \
        --backbone_kwargs '{"cifar_stem": true}' --batch_size 64 --steps 6 --warmup 2 [--no-channels_last] \
        --tag _layout_resnet18_{channels_last,contiguous}
(*) measured before the switch existed, when the script ran contiguous on CPUs: the same layout.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "results" / "bench"
METHODS = {  # method -> (class path, views preset, extra model args)
    "simclr": ("ssl_lightning.methods.SimCLR", "simclr", ["--model.init_args.proj_hidden", "512"]),
    "byol": ("ssl_lightning.methods.BYOL", "byol", ["--model.init_args.proj_hidden", "512", "--model.init_args.pred_hidden", "512"]),
    "swav_multicrop": ("ssl_lightning.methods.SwAV", "multicrop", ["--model.init_args.proj_hidden", "512",
                                                                   "--model.init_args.num_prototypes", "100"]),
}


class StepTimer(L.Callback):
    """Images per second from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1, self.images = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.images += batch[0][0].shape[0]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t1 = time.perf_counter()

    @property
    def images_per_s(self) -> float:
        return self.images / (self.t1 - self.t0)


def framework(method: str, a: argparse.Namespace, augment: str) -> tuple[float, list[tuple[int, ...]], float, L.LightningModule]:
    """Full steps through the CLI-built Trainer; returns images/s, the view shapes, peak GPU memory (GiB)
    and the trained module (its loader workers shut down)."""
    from ssl_lightning.cli import SSLCLI

    class_path, views, extra = METHODS[method]
    timer = StepTimer(a.warmup)
    with tempfile.TemporaryDirectory() as run_dir:
        args = ["--model", class_path, "--model.init_args.backbone", a.backbone,
                "--model.init_args.backbone_kwargs", a.backbone_kwargs, "--model.init_args.warmup_epochs", "0",
                *extra, "--data.dataset", a.dataset, "--data.batch_size", str(a.batch_size), "--data.views", views,
                "--data.num_workers", str(a.workers), "--data.train_subset", str(a.batch_size * (a.warmup + a.steps)),
                "--run_dir", run_dir, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
                "--trainer.num_sanity_val_steps", "0", "--trainer.precision", a.precision, "--seed_everything", "0",
                "--model.init_args.channels_last", str(a.channels_last).lower()]
        if a.root:
            args += ["--data.root", a.root]
        if a.dataset_options:
            args += ["--data.dataset_options", a.dataset_options]
        if augment != "default":
            args += ["--data.augment", augment]
        cli = SSLCLI(run=False, args=args + a.extra)
        cli.trainer.callbacks.append(timer)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        shapes = _view_shapes(cli.datamodule)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        model = cli.model
        del cli  # shut the persistent loader workers down before anything else is timed
        gc.collect()
    return timer.images_per_s, shapes, peak, model


def _view_shapes(dm) -> list[tuple[int, ...]]:
    return [(dm.in_channels, v.size, v.size) for v in dm.view_configs for _ in range(v.count)]


def views_label(shapes: list) -> str:
    """``[(1, 28, 28), (1, 28, 28), (1, 12, 12)]`` -> ``"2x28 + 1x12"``."""
    return " + ".join(f"{sum(1 for v in shapes if tuple(v) == s)}x{s[-1]}" for s in dict.fromkeys(map(tuple, shapes)))


def _fixed_inputs(a: argparse.Namespace, shapes: list[tuple[int, ...]], device: str, n: int = 1) -> list[torch.Tensor]:
    """Random inputs of ``n`` times the batch for each shape, in the benchmark's memory format."""
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    return [torch.randn(n * a.batch_size, *s, device=device).contiguous(memory_format=fmt) for s in shapes]


def one_pass_inputs(a: argparse.Namespace, shapes: list[tuple[int, ...]], device: str) -> list[torch.Tensor]:
    """The bare backbone's fixed inputs: the views of each shape stacked into one batch (one pass per shape)."""
    counts = Counter(map(tuple, shapes))
    return [x for s, n in counts.items() for x in _fixed_inputs(a, [s], device, n)]


def _timed(step, a: argparse.Namespace, device: str) -> float:
    """Images per second of ``step``: the median of ``a.repeats`` timings of ``a.steps`` steps after a warm-up."""
    for _ in range(a.warmup):
        step()
    rates = []
    for _ in range(a.repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(a.steps * a.batch_size / (time.perf_counter() - t0))
    return statistics.median(rates)


def _autocast(a: argparse.Namespace, device: str):
    dtype = torch.bfloat16 if "bf16" in a.precision else torch.float16 if "16" in a.precision else None
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)


def bare(a: argparse.Namespace, shapes: list[tuple[int, ...]]) -> float:
    """(a) The bare backbone's forward + backward on fixed tensors (views of one shape in one pass)."""
    from ssl_lightning.backbones import build_backbone

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    net = build_backbone(a.backbone, in_channels=shapes[0][0], **json.loads(a.backbone_kwargs)).to(device)
    net = net.to(memory_format=torch.channels_last) if a.channels_last else net
    inputs = one_pass_inputs(a, shapes, device)

    def step() -> None:
        with _autocast(a, device):
            loss = sum(net(x).float().mean() for x in inputs)
        loss.backward()
        net.zero_grad(set_to_none=True)

    return _timed(step, a, device)


def model_limit(a: argparse.Namespace, model: L.LightningModule, shapes: list[tuple[int, ...]]) -> float:
    """The method's own compute on fixed tensors, outside Lightning and without data: backbone over
    the views, heads, teacher, loss, backward and an SGD step (no loader, augmentation, probe or logging)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).train()
    views = _fixed_inputs(a, shapes, device)
    index = torch.arange(a.batch_size, device=device)
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("probe")]
    opt = torch.optim.SGD(params, lr=1e-6)

    def step() -> None:
        with _autocast(a, device):
            out = model.loss(model.forward_views(views), views, index)
        (out["loss"] if isinstance(out, dict) else out).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed(step, a, device)


def setup_arguments(p: argparse.ArgumentParser) -> None:
    """The options that fix what is measured: methods, data, backbone, batch and memory format."""
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--root", default=None)
    p.add_argument("--dataset_options", default=None,
                   help='data.dataset_options, e.g. \'{"size": 20000}\' for --dataset synthetic (no files needed)')
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--backbone_kwargs", default="{}")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last model and inputs for a, m and b alike (model.channels_last)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    setup_arguments(p)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--augment", nargs="+", default=["workers", "device"], help="pipelines to measure")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=1, help="timings of the fixed-tensor limits per round (median)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of b, a and m (ratios: median over rounds)")
    p.add_argument("--extra", nargs="*", default=[], help="extra CLI flags for the framework runs")
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=OUT, help="folder of throughput<tag>.{json,md}")
    a = p.parse_args()
    a.extra = [f for arg in a.extra for f in arg.split()]
    sys.argv = sys.argv[:1]
    a.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} torch threads"
    rows = []
    for method in a.methods:
        rounds: dict[str, list[dict]] = {augment: [] for augment in a.augment}
        for r in range(a.rounds):
            measured = {augment: framework(method, a, augment) for augment in a.augment}
            shapes, model = measured[a.augment[-1]][1], measured[a.augment[-1]][3]
            limit, method_limit = bare(a, shapes), model_limit(a, model, shapes)  # right after, same conditions
            for augment, (ips, _, peak, _) in measured.items():
                rounds[augment].append({"framework_images_per_s": ips, "bare_images_per_s": limit,
                                        "model_images_per_s": method_limit, "peak_gpu_gib": peak})
                print(f"{method} [{augment}] round {r}: framework {ips:.0f} img/s, bare backbone {limit:.0f} img/s "
                      f"(ratio {ips / limit:.2f}), method on fixed tensors {method_limit:.0f} img/s "
                      f"(ratio {ips / method_limit:.2f})", flush=True)
            del measured, model
            gc.collect()
        for augment, rs in rounds.items():
            ratio = [x["framework_images_per_s"] / x["bare_images_per_s"] for x in rs]
            ratio_m = [x["framework_images_per_s"] / x["model_images_per_s"] for x in rs]
            median = lambda key: statistics.median(x[key] for x in rs)  # noqa: E731
            rows.append({"method": method, "augment": augment, "views": [list(s) for s in shapes],
                         "framework_images_per_s": median("framework_images_per_s"),
                         "bare_images_per_s": median("bare_images_per_s"),
                         "model_images_per_s": median("model_images_per_s"),
                         "ratio": statistics.median(ratio), "ratio_range": [min(ratio), max(ratio)],
                         "ratio_to_model": statistics.median(ratio_m), "ratio_to_model_range": [min(ratio_m), max(ratio_m)],
                         "peak_gpu_gib": max(x["peak_gpu_gib"] for x in rs), "rounds": rs})
    record = {"device": device, "settings": {**vars(a), "out": str(a.out)}, "rows": rows, "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__}
    (a.out / f"throughput{a.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| method | augmentation | views | framework img/s (b) | bare backbone img/s (a) | b / a (range) | "
             "method on fixed tensors img/s (m) | b / m (range) | peak GPU GiB |", "|---|---|---|---|---|---|---|---|---|"]
    span = lambda r: f"{r[0]:.2f}-{r[1]:.2f}"  # noqa: E731
    for r in rows:
        views = views_label(r["views"])
        lines.append(f"| {r['method']} | {r['augment']} | {views} | {r['framework_images_per_s']:.0f} | "
                     f"{r['bare_images_per_s']:.0f} | {r['ratio']:.2f} ({span(r['ratio_range'])}) | "
                     f"{r['model_images_per_s']:.0f} | {r['ratio_to_model']:.2f} ({span(r['ratio_to_model_range'])}) | "
                     f"{r['peak_gpu_gib']:.2f} |")
    table = "\n".join(lines)
    header = (f"{device}; {a.dataset}, backbone {a.backbone}, batch {a.batch_size}, {a.precision}, "
              f"{'channels-last' if a.channels_last else 'contiguous'}, {a.workers} workers, "
              f"{a.steps} timed steps after {a.warmup}, medians of {a.rounds} interleaved rounds ({time.strftime('%Y-%m-%d')})")
    (a.out / f"throughput{a.tag}.md").write_text(header + "\n\n" + table + "\n")
    print(header)
    print(table)


if __name__ == "__main__":
    main()
