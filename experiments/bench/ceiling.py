"""The ceiling of throughput.py's headline b / a: how much of each method's step is its own compute.

b / a compares the full training step with the bare backbone's forward + backward. A method that does
more than one backbone forward + backward per image (BYOL's teacher forward, heads, loss, optimizer step)
cannot reach 1 however fast its input pipeline is: on fixed tensors, with no data and no framework, its
step m gives m / a, the highest b / a any implementation of it can reach on this machine. This script
breaks m down. For SimCLR, BYOL and SwAV multi-crop with throughput.py's settings it times, on fixed
tensors in the same memory format:

  a           the bare backbone's forward + backward, views of one shape in one pass (throughput.py's a)
  a_per_view  the same with one pass per view
  student     the method's backbone forward + backward over the views as the method runs them
              (one pass per view for BYOL, whose official code does so; one pass per shape otherwise)
  teacher     the momentum teacher's forward without gradients (BYOL: backbone and projector, both views)
  m           the method's whole step: backbone, heads, teacher, loss, backward, SGD step (throughput.py's m)

one step of each in turn, ``--steps`` times after a warm-up, so the machine's drift (up to 25% from one
minute to the next) cancels out of their ratios: each ratio is the median over steps of the ratio within
a step (quartiles in brackets). ``rest`` is m - student - teacher (heads, loss, optimizer step).

    python experiments/bench/ceiling.py            # -> experiments/results/bench/ceiling.{json,md}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import OUT, _fixed_inputs, framework, one_pass_inputs, setup_arguments, views_label  # noqa: E402


def parts(model, views: list[torch.Tensor], batched: list[torch.Tensor], index: torch.Tensor) -> dict:
    """One callable per part of the step (``teacher`` is None for a method without one); ``batched`` are
    a's inputs, the views of each shape in one batch."""
    net = model.backbone
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("probe")]
    opt = torch.optim.SGD(params, lr=1e-6)

    def backward(outputs: list[torch.Tensor]) -> None:
        sum(o.mean() for o in outputs).backward()
        model.zero_grad(set_to_none=True)

    def m() -> None:
        out = model.loss(model.forward_views(views), views, index)
        (out["loss"] if isinstance(out, dict) else out).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def teacher() -> None:  # BYOL's target: backbone and projector over the two views, no gradients
        with torch.no_grad():
            [model.teacher_projector(f) for f in model.forward_views(views[:2], model.teacher_backbone)]

    return {"a": lambda: backward([net(x) for x in batched]), "a_per_view": lambda: backward([net(v) for v in views]),
            "student": lambda: backward(model.forward_views(views)), "m": m,
            "teacher": teacher if hasattr(model, "teacher_backbone") else None}


def measure(method: str, a: argparse.Namespace) -> dict:
    """Builds the method as throughput.py does (a few framework steps), then times its parts in turn."""
    build = argparse.Namespace(**{**vars(a), "steps": 2, "warmup": 1})
    _, shapes, _, model = framework(method, build, "device")
    model = model.cpu().train()
    views = _fixed_inputs(a, shapes, "cpu")
    batched = one_pass_inputs(a, shapes, "cpu")
    calls = {k: f for k, f in parts(model, views, batched, torch.arange(a.batch_size)).items() if f is not None}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(a.warmup + a.steps):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    ratio = lambda num, den: [x / y for x, y in zip(times[num], times[den])]  # noqa: E731
    quartiles = lambda xs: statistics.quantiles(xs, n=4)  # noqa: E731
    row = {"method": method, "views": [list(s) for s in shapes],
           "ms": {k: 1000 * statistics.median(t) for k, t in times.items()}}
    row["ms"]["rest"] = row["ms"]["m"] - row["ms"]["student"] - row["ms"].get("teacher", 0.0)
    row["ceiling"] = {"median": statistics.median(ratio("a", "m")), "quartiles": quartiles(ratio("a", "m"))[::2]}
    row["per_view_over_one_pass"] = statistics.median(ratio("a_per_view", "a"))
    if "teacher" in times:
        row["teacher_over_a"] = statistics.median(ratio("teacher", "a"))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    setup_arguments(p)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=60, help="timed steps of each part, in turn")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    a.workers, a.precision, a.extra = 0, "32-true", []  # framework() only builds the model here
    sys.argv = sys.argv[:1]
    rows = [measure(method, a) for method in a.methods]
    device = f"CPU, {torch.get_num_threads()} torch threads"
    header = (f"{device}; {a.dataset}, backbone {a.backbone}, batch {a.batch_size}, fp32, "
              f"{'channels-last' if a.channels_last else 'contiguous'}, fixed tensors, {a.steps} steps of each part in "
              f"turn after {a.warmup}; ms: medians; ratios: medians of the ratio within a step, quartiles in brackets "
              f"({time.strftime('%Y-%m-%d')})")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"ceiling{a.tag}.json").write_text(json.dumps({"device": device, "settings": vars(a), "rows": rows,
                                                          "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    lines = ["| method | views | a ms | a per view ms | student ms | teacher ms | rest ms | m ms | "
             "ceiling m / a (img/s) | teacher ms / a ms | a per view ms / a ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms, q = r["ms"], r["ceiling"]["quartiles"]
        teacher = f"{ms['teacher']:.1f}" if "teacher" in ms else "-"
        share = f"{r['teacher_over_a']:.2f}" if "teacher_over_a" in r else "-"
        lines.append(f"| {r['method']} | {views_label(r['views'])} | {ms['a']:.1f} | {ms['a_per_view']:.1f} | "
                     f"{ms['student']:.1f} | {teacher} | {ms['rest']:.1f} | {ms['m']:.1f} | "
                     f"**{r['ceiling']['median']:.2f}** ({q[0]:.2f}-{q[1]:.2f}) | {share} | {r['per_view_over_one_pass']:.2f} |")
    table = "\n".join(lines)
    (OUT / f"ceiling{a.tag}.md").write_text(header + "\n\n" + table + "\n")
    print(header)
    print(table)


if __name__ == "__main__":
    main()
