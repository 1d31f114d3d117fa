"""MixMatch ablation on the semi-supervised benchmark's budget (experiments/semi_benchmark.py: Fashion-MNIST,
ConvNet width 8, 400 steps, 32 labelled images per step): which part of the recipe costs or buys accuracy.

    PYTHONPATH=. python experiments/mixmatch_ablation.py --labels 1000 --seeds 0 --variants config lambda_u0 alpha0

Every variant is the benchmark's run of ``experiments/fashion_mnist/semi/mixmatch.yaml`` (same CLI arguments,
same label split per seed) plus the overrides listed in :data:`VARIANTS` (``onepass``: the mixed batches in one
forward, BatchNorm statistics of all of them, instead of the interleaved first batch only). Printed per run: the
test error of the EMA model (what the benchmark reports), of the trained weights, and of the EMA model with its
BatchNorm statistics re-estimated on weakly augmented, un-mixed training images (a diagnostic of the running
statistics that the mixed batches leave), and the accuracy and mean top probability of the label guesses in
the first and last quarter of training (the unlabelled images' true labels, read for this diagnostic only). Runs go to ``<out>/results.json``; the table to ``<out>/table.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import semi_benchmark as bench  # noqa: E402

M = "--model.init_args."
SGD = [M + "optimizer", "sgd", M + "lr", "0.03", M + "momentum", "0.9", M + "nesterov", "true",
       M + "weight_decay", "5e-4", M + "lr_schedule", "fixmatch"]
#: variant -> CLI overrides on top of the benchmark's arguments for the MixMatch config
VARIANTS: dict[str, list[str]] = {
    "config": [],  # the config as it stands (lambda_u 10 since the i15-mixmatch change; 75 before)
    "lambda_u75": [M + "lambda_u", "75"],  # the paper's weight
    "lambda_u0": [M + "lambda_u", "0"],
    "alpha0": [M + "alpha", "0"],
    "lambda_u0_alpha0": [M + "lambda_u", "0", M + "alpha", "0"],
    "batch_lambda": [M + "per_example_lambda", "false"],
    "onepass": [],
    "sgd": SGD,
    "sgd_lambda_u0_alpha0": SGD + [M + "lambda_u", "0", M + "alpha", "0"],
    "lambda_u10": [M + "lambda_u", "10"],
    "lambda_u25": [M + "lambda_u", "25"],
    "lambda_u150": [M + "lambda_u", "150"],
    "ramp0.8": [M + "rampup_length", "0.8"],
    "ramp0": [M + "rampup", "none"],
    "no_ema": [M + "ema_decay", "null"],
    "sgd_lambda_u10": SGD + [M + "lambda_u", "10"],
    "sgd_lambda_u25": SGD + [M + "lambda_u", "25"],
    "lr0.005": [M + "lr", "0.005"],
    "lr0.001": [M + "lr", "0.001"],
}


def _one_pass(self, batches):
    """MixMatch.mixed_logits without interleaving: all mixed batches in one forward (BatchNorm sees all)."""
    import torch

    return self.logits(torch.cat(batches))


def evaluate(model, datamodule) -> dict:
    """Test accuracy of the EMA model, the trained weights and the EMA model with re-estimated BN statistics."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    model.eval()
    test = datamodule.test_dataloader()

    @torch.no_grad()
    def accuracy(net) -> float:
        net.eval()
        right = total = 0
        for images, labels in test:
            right += (net(images).argmax(1) == labels).sum().item()
            total += labels.numel()
        return right / total

    ema = torch.nn.Sequential(model.ema_backbone, model.ema_classifier) if model.ema_backbone is not None else None
    raw = torch.nn.Sequential(model.backbone, model.classifier)
    out = {"ema": accuracy(ema) if ema is not None else None, "raw": accuracy(raw)}
    recal = copy.deepcopy(ema if ema is not None else raw)
    for m in recal.modules():
        if isinstance(m, _BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # the cumulative average over the batches below
    recal.train()
    with torch.no_grad():
        for i, batch in enumerate(datamodule.train_dataloader()):
            batch = batch[0] if isinstance(batch, tuple) else batch
            recal(batch["unlabelled"][0][0])  # the first weak view of mu B unlabelled images
            if i == 19:
                break
    out["ema_bn_recalibrated"] = accuracy(recal)
    return out


def run(variant: str, labels: int, seed: int, args: argparse.Namespace, work: str) -> dict:
    import torch

    from ssl_lightning.cli import SSLCLI
    from ssl_lightning.methods.semi_supervised.mixmatch import MixMatch

    split = args.out / "splits" / f"fashion_mnist-{labels}labels-val{args.num_val}-seed{seed}.json"
    if not split.exists():
        bench.make_split(split, labels, seed, args.num_val)
    run_dir = tempfile.mkdtemp(dir=work, prefix=f"{variant}-{labels}-{seed}-")
    argv = bench.cli_args(bench.CONFIGS / "mixmatch.yaml", run_dir, args, labels, seed, split, None) + VARIANTS[variant]
    import ssl_lightning.methods.semi_supervised.mixmatch as mm
    from ssl_lightning.data.semi import dataset_targets

    original, original_guess, original_objective = MixMatch.mixed_logits, mm.guess_labels, MixMatch.objective
    if variant == "onepass":
        MixMatch.mixed_logits = _one_pass
    guesses: list[tuple[float, float]] = []  # per step: accuracy and max probability of the label guesses
    last: dict = {}

    def guess_labels(logits, temperature):
        last["guess"] = original_guess(logits, temperature)
        return last["guess"]

    def objective(self, batch):
        terms = original_objective(self, batch)
        dm = self.trainer.datamodule
        if "targets" not in last:
            last["targets"] = dataset_targets(dm.unlabelled_set.base)
        truth = last["targets"][batch.index]
        guesses.append(((last["guess"].argmax(1) == truth).float().mean().item(), last["guess"].max(1).values.mean().item()))
        return terms

    mm.guess_labels, MixMatch.objective = guess_labels, objective
    try:
        torch.set_num_threads(args.threads)
        start = time.time()
        cli = SSLCLI(run=False, args=argv)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        seconds = time.time() - start
        acc = evaluate(cli.model, cli.datamodule)
    finally:
        MixMatch.mixed_logits, mm.guess_labels, MixMatch.objective = original, original_guess, original_objective
    quarter = max(1, len(guesses) // 4)
    logged_guess = {f"guess_{name}_{part}": round(statistics.mean(g[i] for g in rows), 4)
                    for part, rows in (("first_quarter", guesses[:quarter]), ("last_quarter", guesses[-quarter:]))
                    for i, name in enumerate(("accuracy", "confidence"))}
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("train/")}
    return {"test_error": {k: None if v is None else round(100 * (1 - v), 2) for k, v in acc.items()},
            "train": logged, "guesses": logged_guess, "seconds": round(seconds, 1), "overrides": VARIANTS[variant]}


def table(results: dict) -> str:
    lines = ["Test error (%) of MixMatch variants, mean over seeds (n); benchmark budget "
             f"{results['budget']}.", "",
             "| variant | labels | EMA (reported) | trained weights | EMA, BN re-estimated | seeds |", "|---|---|---|---|---|---|"]
    groups: dict[tuple[str, int], list[dict]] = {}
    for key, r in results["runs"].items():
        variant, labels, _ = key.split("/")
        groups.setdefault((variant, int(labels)), []).append(r)
    for (variant, labels), rows in groups.items():
        cells = []
        for k in ("ema", "raw", "ema_bn_recalibrated"):
            values = [r["test_error"][k] for r in rows if r["test_error"][k] is not None]
            cells.append(f"{statistics.mean(values):.2f}" if values else "-")
        lines.append(f"| {variant} | {labels} | " + " | ".join(cells) + f" | {len(rows)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["config"], choices=list(VARIANTS))
    p.add_argument("--labels", nargs="+", type=int, default=[1000])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", type=Path, default=HERE / "results" / "mixmatch_ablation")
    args, rest = p.parse_known_args(argv)
    bench_args = bench.parse_args(rest)  # the benchmark's budget (--steps, --width, --batch, --mu, ...)
    for k, v in vars(args).items():
        setattr(bench_args, k, v)
    args = bench_args
    (args.out / "splits").mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    current = bench.budget(args)
    if results.get("budget") != current:
        results = {"runs": {}, "budget": current}
    with tempfile.TemporaryDirectory() as work:
        for labels in args.labels:
            for seed in args.seeds:
                for variant in args.variants:
                    key = f"{variant}/{labels}/{seed}"
                    r = run(variant, labels, seed, args, work)
                    results["runs"][key] = r
                    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
                    (args.out / "table.md").write_text(table(results))
                    e = r["test_error"]
                    print(f"{key}: EMA {e['ema']}% / trained {e['raw']}% / EMA BN re-estimated "
                          f"{e['ema_bn_recalibrated']}% test error, {r['seconds']:.0f} s, {json.dumps(r['guesses'])}, train "
                          f"{json.dumps({k: round(v, 4) for k, v in r['train'].items()})}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main(sys.argv[1:])
