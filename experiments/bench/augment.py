"""Augmentation throughput: the per-image torchvision pipeline (what each loader worker runs, one image at a
time) against the batched on-device augmentation, both on one CPU core; optionally the batched one on a GPU.

    python experiments/bench/augment.py                  # 32 px, simclr preset (2 views), batch 256
    python experiments/bench/augment.py --device cuda    # adds the batched figure on the GPU

Writes experiments/results/bench/augment.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ssl_lightning.data.batch_views import BatchMultiView
from ssl_lightning.data.views import MultiViewTransform, view_preset

OUT = Path(__file__).resolve().parents[1] / "results" / "bench"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10


def _best_rate(step, views_per_step: int, seconds: float, sync=lambda: None) -> float:
    """Views per second of the fastest of the repeats that fit in ``seconds`` (at least 3)."""
    step()  # warm-up
    sync()
    rates, start = [], time.perf_counter()
    while len(rates) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        step()
        sync()
        rates.append(views_per_step / (time.perf_counter() - t))
    return max(rates)


def views_per_second(image_size: int = 32, preset: str = "simclr", batch_size: int = 256, seconds: float = 5.0,
                     device: str | None = None) -> dict:
    """Views/s on one CPU core: per-image pipeline vs batched (and the batched one on ``device`` if given)."""
    torch.set_num_threads(1)
    views = view_preset(preset, image_size)
    n_views = sum(v.count for v in views)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    per_image = MultiViewTransform(views, MEAN, STD)
    n_single = 64
    rate_single = _best_rate(lambda: [per_image(images[i]) for i in range(n_single)], n_single * n_views, seconds)
    batched = BatchMultiView(views, MEAN, STD)
    g = torch.Generator().manual_seed(0)
    rate_batch = _best_rate(lambda: batched(images, g), batch_size * n_views, seconds)
    result = {"image_size": image_size, "preset": preset, "views_per_image": n_views, "batch_size": batch_size,
              "threads": torch.get_num_threads(), "per_image_views_per_s_per_core": round(rate_single, 1),
              "batched_views_per_s_per_core": round(rate_batch, 1), "ratio": round(rate_batch / rate_single, 2),
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    if device:
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        for big in (batch_size, 1024):
            imgs = torch.randint(0, 256, (big, 3, image_size, image_size), dtype=torch.uint8, device=device)
            result[f"batched_views_per_s_{device}_batch{big}"] = round(
                _best_rate(lambda: batched(imgs, g), big * n_views, seconds, sync), 1)
        result["device_name"] = torch.cuda.get_device_name() if device.startswith("cuda") else device
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--preset", default="simclr")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    parser.add_argument("--device", default=None, help="also time the batched augmentation there (e.g. cuda)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    r = views_per_second(args.image_size, args.preset, args.batch_size, args.seconds, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "augment.json").write_text(json.dumps(r, indent=2) + "\n")
    lines = ["# Augmentation throughput (views per second per core)", "",
             f"{r['preset']} preset, {r['image_size']} px, {r['views_per_image']} views per image, "
             f"{r['threads']} thread, torch {r['torch']}.", "",
             "| pipeline | views/s/core |", "|---|---|",
             "| per-image torchvision v2 (one image at a time, as in a loader worker) | "
             f"{r['per_image_views_per_s_per_core']:.0f} |",
             f"| batched (`BatchMultiView`, batch {r['batch_size']}, CPU) | {r['batched_views_per_s_per_core']:.0f} |",
             "", f"Ratio batched / per-image: **{r['ratio']:.1f}x**."]
    gpu = {k: v for k, v in r.items() if k.startswith("batched_views_per_s_") and "core" not in k}
    if gpu:
        rates = ", ".join(f"{k.rsplit('_', 1)[-1]}: {v:.0f} views/s" for k, v in gpu.items())
        lines += ["", f"On {r['device_name']}: {rates}"]
    (out / "augment.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
