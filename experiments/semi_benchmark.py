"""Semi-supervised benchmark on Fashion-MNIST: every semi-supervised method with 100 and 1,000 labels, a small
ConvNet, the same fixed budget (optimizer steps, labelled batch, backbone) and the same label split per seed,
beside the supervised-only baseline and "SimCLR-pretrained backbone + FixMatch" (CPU).

    PYTHONPATH=. python experiments/semi_benchmark.py                     # the whole table (resumable)
    PYTHONPATH=. python experiments/semi_benchmark.py --methods fixmatch supervised --labels 100 --seeds 0

Each method trains from its config ``experiments/fashion_mnist/semi/<method>.yaml`` (its own loss settings),
with the budget below replacing the config's: ``--steps`` optimizer steps (epochs scaled so that epoch-based
ramps and per-epoch ensembles keep their share of training), ``--width`` ConvNet, ``--batch`` labelled images
per step and at most ``--mu`` unlabelled images per labelled one. The error rate is that of the FINAL model
(the EMA model where the method has one) on the 10,000 test images -- no selection on the test set. Every run is
appended to ``experiments/results/semi_benchmark/results.json`` as soon as it ends; runs already there (same
method, labels, seed and budget) are skipped, so the table can be built in pieces. ``table.md`` is rewritten
from all the runs of the current budget after every run. ``--jobs`` runs train side by side, one core each
(augmentation in the run's own process); the SimCLR pretraining of a seed runs first, once, and is kept under
``<out>/simclr/``. Each run records its wall time and its CPU time (what it costs on free cores).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from concurrent.futures import ProcessPoolExecutor, as_completed

import yaml

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "fashion_mnist" / "semi"
OUT = HERE / "results" / "semi_benchmark"
SIMCLR_CONFIG = HERE / "fashion_mnist" / "simclr.yaml"
SIMCLR_FIXMATCH = "simclr+fixmatch"
#: table rows in order: method key -> (config file, label)
METHODS = {
    "supervised": ("supervised", "Supervised (labelled only)"),
    "entropy_minimisation": ("entropy_minimisation", "Entropy minimisation"),
    "pseudo_label": ("pseudo_label", "Pseudo-label"),
    "pi_model": ("pi_model", "Pi-model"),
    "temporal_ensembling": ("temporal_ensembling", "Temporal ensembling"),
    "mean_teacher": ("mean_teacher", "Mean Teacher"),
    "vat": ("vat", "VAT + EntMin"),
    "mixmatch": ("mixmatch", "MixMatch"),
    "fixmatch": ("fixmatch", "FixMatch"),
    SIMCLR_FIXMATCH: ("fixmatch", "SimCLR-pretrained backbone + FixMatch"),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--labels", nargs="+", type=int, default=[100, 1000])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of every run")
    p.add_argument("--width", type=int, default=8, help="ConvNet width (channels of its first block)")
    p.add_argument("--batch", type=int, default=32, help="labelled images per step")
    p.add_argument("--mu", type=int, default=3, help="at most this many unlabelled images per labelled one")
    p.add_argument("--num-val", type=int, default=500, help="validation images carved from the training labels")
    p.add_argument("--simclr-epochs", type=int, default=2, help="SimCLR pretraining epochs (on --simclr-subset)")
    p.add_argument("--simclr-subset", type=int, default=10000, help="training images SimCLR pretrains on")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one per free core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--workers", type=int, default=0, help="data loader workers per run (0: augment in the run's process)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--redo", action="store_true", help="train runs again even if results.json has them")
    return p.parse_args(argv)


def budget(args: argparse.Namespace) -> dict:
    return {"steps": args.steps, "width": args.width, "batch": args.batch, "mu": args.mu, "num_val": args.num_val,
            "simclr_epochs": args.simclr_epochs, "simclr_subset": args.simclr_subset}


def run_key(method: str, labels: int, seed: int) -> str:
    return f"{method}/{labels}/{seed}"


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def save_results(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def cli_args(config: Path, run_dir: str, args: argparse.Namespace, labels: int, seed: int, split: Path | None,
             init_backbone: str | None) -> list[str]:
    """The SSLCLI arguments of one run: the method's config with the benchmark's budget."""
    cfg = yaml.safe_load(config.read_text())
    data = cfg.get("data", {})
    trainer = cfg.get("trainer", {})
    config_steps = int(trainer.get("max_steps") or 0)
    config_per_epoch = int(data.get("steps_per_epoch") or 0)
    # epochs scaled with the budget: the same number of epochs (per-epoch ensembles, epoch ramps) in fewer steps
    per_epoch = args.steps
    if config_steps > 0 and config_per_epoch > 0:
        per_epoch = max(1, round(args.steps * config_per_epoch / config_steps))
    mu = min(int(data.get("mu", 0)), args.mu)
    out = ["--config", str(config), "--run_dir", run_dir, "--seed_everything", str(seed),
           "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false",
           "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", str(args.steps),
           "--trainer.max_epochs", "-1", "--trainer.val_check_interval", "null",
           "--trainer.check_val_every_n_epoch", str(10 ** 6),  # no validation while training: one at the end
           "--trainer.num_sanity_val_steps", "0",
           "--model.init_args.backbone", "convnet", "--model.init_args.backbone_kwargs", json.dumps({"width": args.width}),
           "--data.dataset", "fashion_mnist", "--data.batch_size", str(args.batch), "--data.mu", str(mu),
           "--data.steps_per_epoch", str(per_epoch), "--data.seed", str(seed), "--data.num_workers", str(args.workers),
           "--data.pin_memory", "false"]
    model_args = cfg.get("model", {}).get("init_args", {})
    if model_args.get("rampup_unit") == "steps" and config_steps > 0:  # a ramp in steps keeps its share too
        length = float(model_args.get("rampup_length", 0)) * args.steps / config_steps
        out += ["--model.init_args.rampup_length", str(length)]
    if split is not None and split.exists():
        out += ["--data.label_split", str(split), "--data.num_labels", "null", "--data.labels_per_class", "null",
                "--data.num_val", "null"]
    else:
        out += ["--data.num_labels", str(labels), "--data.labels_per_class", "null", "--data.num_val",
                str(args.num_val), "--data.split_seed", str(seed)]
    if init_backbone:
        out += ["--model.init_args.init_backbone", init_backbone]
    return out


def train(argv: list[str], threads: int) -> dict:
    """One fit through the CLI in this process, then the final validation (val/acc, test/acc)."""
    import torch

    from ssl_lightning.cli import SSLCLI

    torch.set_num_threads(threads)
    start, cpu = time.time(), cpu_seconds()
    cli = SSLCLI(run=False, args=argv)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds = time.time() - start
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    merged = {k: float(v) for m in metrics for k, v in m.items()}
    return {"test_acc": merged["test/acc"], "val_acc": merged.get("val/acc"), "fit_seconds": round(fit_seconds, 1),
            "seconds": round(time.time() - start, 1), "cpu_seconds": round(cpu_seconds() - cpu, 1),
            "steps": int(cli.trainer.global_step)}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the loader workers): what the run costs on a
    machine whose cores are free (the wall time here depends on what else runs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pretrain_simclr(args: argparse.Namespace, seed: int) -> tuple[str, float]:
    """A brief SimCLR run (its Fashion-MNIST config, this benchmark's ConvNet width), kept under ``<out>/simclr/``
    so that later invocations reuse it; returns its last checkpoint and the seconds it took (0 if reused)."""
    import torch

    from ssl_lightning.cli import SSLCLI

    run_dir = args.out / "simclr" / f"width{args.width}-epochs{args.simclr_epochs}-n{args.simclr_subset}-seed{seed}"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if checkpoint.exists():
        return str(checkpoint), 0.0
    torch.set_num_threads(args.threads * args.jobs)
    start = time.time()
    cli = SSLCLI(run=False, args=[
        "--config", str(SIMCLR_CONFIG), "--run_dir", str(run_dir), "--seed_everything", str(seed),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_epochs", str(args.simclr_epochs),
        "--trainer.check_val_every_n_epoch", str(10 ** 6), "--trainer.num_sanity_val_steps", "0",
        "--model.init_args.backbone_kwargs", json.dumps({"width": args.width}),
        "--data.train_subset", str(args.simclr_subset), "--data.num_workers", str(args.jobs),
        "--data.pin_memory", "false", "--data.seed", str(seed)])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return str(checkpoint), time.time() - start


def make_split(path: Path, labels: int, seed: int, num_val: int) -> None:
    """The seed's label split (stratified, seeded), written once: every method of the table trains on it."""
    from ssl_lightning.data import SemiSupervisedDataModule

    dm = SemiSupervisedDataModule(dataset="fashion_mnist", num_labels=labels, num_val=num_val, split_seed=seed,
                                  seed=seed, mu=0, num_workers=0, pin_memory=False)
    dm.setup("fit")
    dm.split.save(path)


def run_job(key: str, argv: list[str], threads: int) -> tuple[str, dict]:
    """One run (in a pool process with --jobs > 1)."""
    return key, train(argv, threads)


def summarise(results: dict, current: dict) -> str:
    """The markdown table of the runs made with the current budget."""
    runs = {k: v for k, v in results["runs"].items() if v.get("budget") == current}
    labels = sorted({int(k.split("/")[1]) for k in runs})
    lines = [f"Fashion-MNIST, test error rate (%) of the FINAL model, mean +- std over seeds (n), ConvNet width "
             f"{current['width']}, {current['steps']} steps, {current['batch']} labelled images per step, mu <= "
             f"{current['mu']}; wall time per run (s, mean) on this CPU.", "",
             "| method | " + " | ".join(f"{n} labels" for n in labels) + " | s / run |",
             "|---|" + "---|" * len(labels) + "---|"]
    for method, (_, name) in METHODS.items():
        cells, seconds = [], []
        for n in labels:
            rows = [v for k, v in runs.items() if k.startswith(f"{method}/{n}/")]
            errors = [100 * (1 - r["test_acc"]) for r in rows]
            seconds += [r["seconds"] for r in rows]
            if not errors:
                cells.append("-")
            elif len(errors) == 1:
                cells.append(f"{errors[0]:.2f} (1)")
            else:
                cells.append(f"{statistics.mean(errors):.2f} +- {statistics.stdev(errors):.2f} ({len(errors)})")
        if any(c != "-" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(seconds):.0f} |")
    pretraining = sum(v["seconds"] for v in results.get("pretraining", {}).values() if v.get("budget") == current)
    total = sum(v["seconds"] for v in runs.values()) + pretraining
    lines += ["", f"{len(runs)} runs, {total / 60:.1f} min of run time in all ({pretraining / 60:.1f} of SimCLR "
              "pretraining; runs side by side with --jobs overlap)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "splits").mkdir(exist_ok=True)
    path = args.out / "results.json"
    results = load_results(path)
    results.setdefault("pretraining", {})
    current = budget(args)
    with tempfile.TemporaryDirectory() as work:
        jobs = []
        for labels in args.labels:
            for seed in args.seeds:
                split = args.out / "splits" / f"fashion_mnist-{labels}labels-val{args.num_val}-seed{seed}.json"
                for method in args.methods:
                    key = run_key(method, labels, seed)
                    done = results["runs"].get(key)
                    if done and done.get("budget") == current and not args.redo:
                        print(f"{key}: done ({100 * (1 - done['test_acc']):.2f}% error), skipped", flush=True)
                        continue
                    if not split.exists():
                        make_split(split, labels, seed, args.num_val)
                    init = None
                    if method == SIMCLR_FIXMATCH:  # pretrained first, in this process, with all the cores
                        init, seconds = pretrain_simclr(args, seed)
                        if seconds:
                            results["pretraining"][f"simclr/{seed}"] = {"seconds": round(seconds, 1), "budget": current}
                            save_results(path, results)
                    run_dir = tempfile.mkdtemp(dir=work, prefix=f"{method}-{labels}-{seed}-")
                    config = CONFIGS / f"{METHODS[method][0]}.yaml"
                    jobs.append((key, cli_args(config, run_dir, args, labels, seed, split, init),
                                 str(config.relative_to(HERE.parent))))

        def record(key: str, result: dict, config: str) -> None:
            result.update(budget=current, config=config)
            results["runs"][key] = result
            save_results(path, results)
            (args.out / "table.md").write_text(summarise(results, current))
            print(f"{key}: {100 * (1 - result['test_acc']):.2f}% test error, {result['seconds']:.0f} s", flush=True)

        if args.jobs <= 1:
            for key, run_argv, config in jobs:
                record(*run_job(key, run_argv, args.threads), config)
        else:  # runs side by side, one core each (spawned processes: a fresh torch each)
            configs = {key: config for key, _, config in jobs}
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(run_job, key, run_argv, args.threads) for key, run_argv, _ in jobs]
                for future in as_completed(futures):
                    key, result = future.result()
                    record(key, result, configs[key])
    print(summarise(results, current))


if __name__ == "__main__":
    main(sys.argv[1:])
