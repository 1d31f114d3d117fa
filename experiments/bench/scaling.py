"""Scaling: time and peak memory per training step as the batch and the number of views / crops grow.

Each setting runs in a fresh process (so the process's peak resident memory, or the GPU's peak
allocation, belongs to that setting alone) through the full framework step of ``throughput.py``:
SimCLR at growing batch sizes, and SwAV multi-crop with 2 global crops plus 0, 2, 4, 6 local crops.

    python experiments/bench/scaling.py [--backbone convnet] [--batches 64 128 256 512] [--locals 0 2 4 6]
Writes experiments/results/bench/scaling<tag>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "results" / "bench"


def one(a: argparse.Namespace) -> None:
    """Child process: time the framework step of one setting and print a JSON line."""
    sys.path.insert(0, str(HERE))
    from throughput import framework

    a.warmup, a.steps = 2, a.steps
    extra = ["--data.num_local_crops", str(a.num_local)] if a.method == "swav_multicrop" else []
    a.extra = extra + a.extra
    ips, shapes, peak_gpu, _ = framework(a.method, a, a.augment)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print("RESULT " + json.dumps({"images_per_s": ips, "step_ms": 1000 * a.batch_size / ips, "views": len(shapes),
                                  "peak_rss_gib": peak_rss, "peak_gpu_gib": peak_gpu}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--root", default=None)
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--backbone_kwargs", default="{}")
    p.add_argument("--batches", nargs="+", type=int, default=[64, 128, 256, 512])
    p.add_argument("--locals", nargs="+", type=int, default=[0, 2, 4, 6])
    p.add_argument("--local_batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--augment", default="workers")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--extra", nargs="*", default=[])
    p.add_argument("--tag", default="")
    # child-process arguments
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="simclr", help=argparse.SUPPRESS)
    p.add_argument("--batch_size", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--num_local", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        sys.argv = sys.argv[:1]
        return one(a)
    settings = [("simclr", b, 0) for b in a.batches] + [("swav_multicrop", a.local_batch, n) for n in a.locals]
    rows = []
    for method, batch, n_local in settings:
        cmd = [sys.executable, __file__, "--one", "--method", method, "--batch_size", str(batch), "--num_local", str(n_local),
               "--dataset", a.dataset, "--backbone", a.backbone, "--backbone_kwargs", a.backbone_kwargs,
               "--workers", str(a.workers), "--precision", a.precision, "--augment", a.augment, "--steps", str(a.steps)]
        cmd += (["--root", a.root] if a.root else []) + (["--extra", *a.extra] if a.extra else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"setting {method} batch {batch} locals {n_local} failed:\n{out.stderr[-3000:]}")
        r = {"method": method, "batch_size": batch, "local_crops": n_local, **json.loads(line[7:])}
        rows.append(r)
        print(f"{method} batch {batch} views {r['views']}: {r['step_ms']:.0f} ms/step, {r['images_per_s']:.0f} img/s, "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB, peak GPU {r['peak_gpu_gib']:.2f} GiB", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    record = {"device": device, "settings": vars(a), "rows": rows, "date": time.strftime("%Y-%m-%d")}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"scaling{a.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| method | batch | views | ms / step | img/s | peak RSS GiB | peak GPU GiB |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['batch_size']} | {r['views']} | {r['step_ms']:.0f} | {r['images_per_s']:.0f} | "
              f"{r['peak_rss_gib']:.2f} | {r['peak_gpu_gib']:.2f} |" for r in rows]
    header = f"{device}; {a.dataset}, backbone {a.backbone}, {a.precision}, augmentation {a.augment} ({time.strftime('%Y-%m-%d')})"
    (OUT / f"scaling{a.tag}.md").write_text(header + "\n\n" + "\n".join(lines) + "\n")
    print(header + "\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
