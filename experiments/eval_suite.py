"""Runs every evaluation command on one checkpoint with CPU-sized settings and records each command's
wall time (a fresh ``ssl-lightning`` process per command, start-up included).

    python experiments/eval_suite.py --checkpoint runs/<demo run>/checkpoints/last.ckpt
Writes experiments/results/eval_suite/summary.{json,md} and copies the embedding and retrieval PNGs there.
The settings below shorten the GPU protocols of experiments/eval/*.yaml to fit a 2-core CPU (stated in
the table); pass --full to run the configs as they are.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "eval_suite"
EVAL = HERE / "eval"
BIN = str(Path(sys.executable).with_name("ssl-lightning"))

# command -> (config, CPU-sized overrides, what was shortened)
SUITE = {
    "knn": ("knn.yaml", [], "as configured"),
    "linear_cached": ("linear_sgd.yaml", ["--cached", "true", "--train.lr", "1.0", "--train.schedule", "cosine"],
                      "features cached (no augmentation), SGD lr 1.0 cosine, 100 epochs"),
    "linear": ("linear_sgd.yaml", ["--data.train_subset", "10000", "--train.epochs", "10", "--train.lr", "1.0",
                                   "--train.schedule", "cosine"],
               "augmented, 10,000 train images, 10 epochs, SGD lr 1.0 cosine"),
    "finetune_1pct": ("finetune_1pct.yaml", [], "as configured (600 labels, 60 epochs)"),
    "finetune_10pct": ("finetune_10pct.yaml", ["--train.epochs", "10"], "6,000 labels, 10 epochs (30 in the config)"),
    "cluster": ("cluster.yaml", [], "k-means, k = 10, fitted on train features"),
    "embed": ("embed.yaml", [], "UMAP of 5,000 val features"),
    "retrieve": ("retrieve.yaml", [], "8 queries x 8 neighbours"),
    "export": ("export.yaml", [], "as configured"),
}
COMMAND = {"linear_cached": "linear", "finetune_1pct": "finetune", "finetune_10pct": "finetune"}


def run(name: str, checkpoint: str, out_dir: Path, full: bool, workers: int) -> dict:
    config, overrides, note = SUITE[name]
    command = COMMAND.get(name, name)
    args = [BIN, command, "--config", str(EVAL / config), "--checkpoint", checkpoint, "--out_dir", str(out_dir / name)]
    if command != "export":
        args += ["--data.num_workers", str(workers)]
    if not full:
        args += overrides
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{name} failed ({' '.join(args)}):\n{proc.stderr[-3000:]}")
    print(proc.stdout[-2500:], flush=True)
    results = json.loads((out_dir / name / "results.json").read_text())
    return {"command": " ".join(["ssl-lightning", command, "--config", f"experiments/eval/{config}", *args[6:]]),
            "settings": note if not full else "as configured", "seconds": seconds, "results": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--only", nargs="*", default=list(SUITE))
    p.add_argument("--full", action="store_true", help="the configs' own settings (GPU-sized)")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.only:
            records[name] = run(name, a.checkpoint, Path(tmp), a.full, a.workers)
            print(f"== {name}: {records[name]['seconds']:.0f} s", flush=True)
        for name, png in (("embed", "embed"), ("retrieve", "retrieve")):
            for f in (Path(tmp) / name).glob("*.png"):
                shutil.copy(f, OUT / f"{png}.png")
    (OUT / "summary.json").write_text(json.dumps({"checkpoint": a.checkpoint, "date": time.strftime("%Y-%m-%d"),
                                                  "runs": records}, indent=1, default=str) + "\n")
    lines = ["| command | settings | result | wall time |", "|---|---|---|---|"]
    for name, r in records.items():
        res = r["results"]
        if "top1" in res:
            result = f"top-1 {res['top1']:.4f}, top-5 {res['top5']:.4f}"
        elif name == "knn":
            best = res.get("best", {})
            result = f"best top-1 {best.get('top1', float('nan')):.4f} (k {best.get('k')}, T {best.get('temperature')})"
        elif name == "cluster":
            result = ", ".join(f"{k.upper()} {res[k]:.4f}" for k in ("nmi", "ami", "ari", "acc"))
        else:
            result = "written"
        lines.append(f"| {name} | {r['settings']} | {result} | {r['seconds']:.0f} s |")
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
