"""Colour methods' check on the generated colour dataset (``synthetic_colour``: 10 classes = 5 shapes x 2
isoluminant hues, so the gray image cannot tell half the classes apart; the configs give the backgrounds a random
hue, ``background_chroma: 35``): trains Colorization and SplitBrain briefly on the CPU (small ConvNet,
experiments/synthetic_colour/*.yaml) and reports

* kNN top-1 (k 200, T 0.1) of the random-init and of the trained backbone, bank = training images, queries =
  held-out images (the learning check's protocol, ``ssl_lightning.evaluation.learning``);
* for SplitBrain also the kNN of each half's features alone and of both, with the last map and with every stage's map
  pooled (trained, and at a fresh random init of seed 0);
* the held-out loss of the trained model against the prior-only baseline (predicting the training images'
  empirical bin distribution at every position): Colorization's rebalanced loss and its unweighted
  cross-entropy, SplitBrain's two cross-entropies (L -> ab, ab -> L).

Reading the figures: an L-only encoder (Colorization, SplitBrain's L half) can reach at most the 5 shapes (50%).
Why coloured backgrounds: on gray ones (the dataset's default; ``--variant gray_background -- --data.dataset_options
'{size: 4000}'``) an image's hue alone names its class, so even random features of ab classify (SplitBrain's ab half
0.991) and its task (ab -> L: object vs gray background, the hue does not predict L) lets training lose the hue
that random features kept (0.805 -> 0.740). With a background of random hue the colours no longer name the class by
themselves; the shape's hue still does, for features that find the shape.

    python experiments/colour_check.py colorization:10 split_brain:10
Writes experiments/results/colour_check/{results.json,table.md} and colorized.png (held-out images, their L,
Colorization's annealed-mean colorization). A variant: ``--variant NAME`` and CLI overrides after ``--``, written
to ``results/colour_check/variants/<method>.<NAME>.json`` (not in results.json)::

    python experiments/colour_check.py split_brain:5 --variant lr5e-4 -- --model.init_args.lr 5e-4
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ssl_lightning.backbones.feature_maps import feature_maps, pool, stages
from ssl_lightning.evaluation.knn import weighted_knn
from ssl_lightning.evaluation.learning import learning_check, parse_variant_args
from ssl_lightning.losses.pretext.colorization import colorization_loss
from ssl_lightning.methods import Colorization, SplitBrain
from ssl_lightning.methods.pretext.colour import subsample
from ssl_lightning.pretext.color import bin_counts, lab_inputs, network_input, quantize_ab, quantize_l, rgb_to_lab

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "colour_check"
TRAIN, EVAL, VAL = 4000, 2000, 1000  # pretraining images, kNN bank, held-out queries (and held-out losses)


def _batches(ds, batch_size: int = 250):
    for images, _ in DataLoader(ds, batch_size=batch_size):
        yield images


def _uniform_logits(log_p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The prior-only prediction: ``log p`` at every position of ``like`` (B, Q, h, w)."""
    return log_p.to(like)[None, :, None, None].expand_as(like)


@torch.no_grad()
def colorization_heldout(model: Colorization, dm) -> dict[str, float]:
    model.eval()
    log_p = torch.log((model.prior_counts / model.prior_counts.sum()).clamp_min(1e-12))
    sums = {"heldout_loss": 0.0, "heldout_loss_prior_only": 0.0, "heldout_ce": 0.0, "heldout_ce_prior_only": 0.0}
    n = 0
    hp = model.hparams
    for x in _batches(dm.val_set):
        logits, ab = model.logits(model.encode(model.rgb(x)))
        prior_logits = _uniform_logits(log_p, logits)
        for key, lam in (("heldout_loss", hp.lam), ("heldout_ce", 1.0)):  # lam 1: every weight 1
            sums[key] += x.shape[0] * float(colorization_loss(logits, ab, model.bins, model.prior_counts, lam,
                                                              hp.neighbours, hp.sigma, hp.gray_threshold))
            sums[key + "_prior_only"] += x.shape[0] * float(colorization_loss(
                prior_logits, ab, model.bins, model.prior_counts, lam, hp.neighbours, hp.sigma, hp.gray_threshold))
        n += x.shape[0]
    _save_colorizations(model, next(iter(_batches(dm.val_set, 10))))
    return {k: v / n for k, v in sums.items()} | {"chance_ln_q": math.log(model.bins.shape[0])}


def _save_colorizations(model: Colorization, x: torch.Tensor) -> None:
    """Held-out images: originals, their L, and the annealed-mean colorization (T 0.38), one row each."""
    from torchvision.utils import save_image

    rgb = model.rgb(x)
    gray = (lab_inputs(rgb)[0] + 0.5).clamp(0, 1).expand(-1, 3, -1, -1)  # (L - 50) / 100 + 0.5 = L / 100
    OUT.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat([rgb, gray, model.colorize(x)]), OUT / "colorized.png", nrow=x.shape[0], padding=1)


@torch.no_grad()
def split_brain_heldout(model: SplitBrain, dm) -> dict[str, float]:
    """Held-out cross-entropies; the prior-only baseline uses the bin frequencies of the (un-augmented) training
    images on the same 1/stride grid."""
    model.eval()
    stride, l_bins = model.hparams.stride, model.hparams.l_bins
    ab_counts, l_counts = torch.zeros(model.bins.shape[0], dtype=torch.float64), torch.zeros(l_bins, dtype=torch.float64)
    for x in _batches(dm.eval_set):
        lab = subsample(rgb_to_lab(model.rgb(x)), stride)
        ab_counts += bin_counts(lab[:, 1:].double(), model.bins)
        l_counts += torch.bincount(quantize_l(lab[:, 0], l_bins).reshape(-1), minlength=l_bins).double()
    log_ab = torch.log((ab_counts / ab_counts.sum()).clamp_min(1e-12))
    log_l = torch.log((l_counts / l_counts.sum()).clamp_min(1e-12))
    sums = dict.fromkeys(("heldout_ce_l_to_ab", "heldout_ce_l_to_ab_prior_only", "heldout_ce_ab_to_l",
                          "heldout_ce_ab_to_l_prior_only"), 0.0)
    n = 0
    for x in _batches(dm.val_set):
        ab_logits, l_logits, lab = model.logits(model.encode(model.rgb(x)))
        t_ab, t_l = quantize_ab(lab[:, 1:], model.bins), quantize_l(lab[:, 0], l_bins)
        for key, logits, log_p, target in (("heldout_ce_l_to_ab", ab_logits, log_ab, t_ab),
                                           ("heldout_ce_ab_to_l", l_logits, log_l, t_l)):
            sums[key] += x.shape[0] * float(F.cross_entropy(logits, target))
            sums[key + "_prior_only"] += x.shape[0] * float(F.cross_entropy(_uniform_logits(log_p, logits), target))
        n += x.shape[0]
    return {k: v / n for k, v in sums.items()}


@torch.no_grad()
def _knn(encode, dm) -> float:
    """kNN top-1 (k 200, T 0.1; the monitor's protocol) of ``encode(normalised images)``: bank = the un-augmented
    training images, queries = the held-out images."""
    def features(ds):
        feats, labels = zip(*((encode(x), y) for x, y in DataLoader(ds, batch_size=250)))
        return torch.cat(feats), torch.cat(labels)

    bank, bank_labels = features(dm.eval_set)
    queries, labels = features(dm.val_set)
    preds = weighted_knn(bank, bank_labels, queries, dm.num_classes, k=200, temperature=0.1)
    return float((preds == labels).float().mean())


def split_brain_halves(model: SplitBrain, dm) -> dict[str, float]:
    """kNN of each half's features alone and of both, trained and at a fresh random init (seed 0): the pooled
    output (``knn_{l_half,ab_half,both}_{tag}``, what the learning check evaluates), and every stage's map
    average-pooled (``knn_{...}_{stage}_{tag}``: which layer keeps the class), and both halves' pooled outputs
    each L2-normalised before the concatenation (``knn_both_balanced_{tag}``: neither half outweighs the other
    in the cosine)."""
    L.seed_everything(0)
    fresh = type(model)(**{k: v for k, v in model.hparams.items() if not k.startswith("_")})  # not the CLI's _class_path
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "backbone" not in k and "head" not in k},
                          strict=False)  # the data statistics (buffers), not the weights
    names = [s.name for s in stages(model.backbone.l_net)]
    out = {}
    for tag, m in (("trained", model), ("random_init", fresh)):
        m.eval()
        lab = lambda x, m=m: network_input(m.rgb(x), "lab")  # noqa: E731
        out[f"knn_l_half_{tag}"] = _knn(lambda x, m=m: m.backbone.l_net(lab(x)[:, :1]), dm)
        out[f"knn_ab_half_{tag}"] = _knn(lambda x, m=m: m.backbone.ab_net(lab(x)[:, 1:]), dm)
        out[f"knn_both_{tag}"] = _knn(m, dm)
        out[f"knn_both_balanced_{tag}"] = _knn(lambda x, m=m: torch.cat(
            [F.normalize(m.backbone.l_net(lab(x)[:, :1]), dim=1), F.normalize(m.backbone.ab_net(lab(x)[:, 1:]), dim=1)], 1), dm)
        for name in names:
            l_feat = lambda x, m=m, n=name: pool(feature_maps(m.backbone.l_net, lab(x)[:, :1], upto=n)[n])  # noqa: E731
            ab_feat = lambda x, m=m, n=name: pool(feature_maps(m.backbone.ab_net, lab(x)[:, 1:], upto=n)[n])  # noqa: E731
            out[f"knn_l_half_{name}_{tag}"] = _knn(l_feat, dm)
            out[f"knn_ab_half_{name}_{tag}"] = _knn(ab_feat, dm)
            out[f"knn_both_{name}_{tag}"] = _knn(lambda x, f=l_feat, g=ab_feat: torch.cat([f(x), g(x)], 1), dm)
    return out


HELDOUT = {"colorization": colorization_heldout,
           "split_brain": lambda model, dm: split_brain_heldout(model, dm) | split_brain_halves(model, dm)}


def table(results: dict) -> str:
    rows = ["| method | epochs | kNN random init | kNN trained | held-out loss (trained) | held-out loss (prior only) | seconds |",
            "|---|---|---|---|---|---|---|"]
    for method, r in sorted(results.items()):
        m = r["metrics"]
        if method == "colorization":
            trained = f"{m['heldout_loss']:.3f} (CE {m['heldout_ce']:.3f})"
            prior = f"{m['heldout_loss_prior_only']:.3f} (CE {m['heldout_ce_prior_only']:.3f})"
        else:
            trained = f"L->ab {m['heldout_ce_l_to_ab']:.3f}, ab->L {m['heldout_ce_ab_to_l']:.3f}"
            prior = f"L->ab {m['heldout_ce_l_to_ab_prior_only']:.3f}, ab->L {m['heldout_ce_ab_to_l_prior_only']:.3f}"
        rows.append(f"| {method} | {r['epochs']} | {r['knn_random_init']:.4f} | {r['knn_trained']:.4f} | {trained} | "
                    f"{prior} | {r['seconds']:.0f} |")
    m = results.get("split_brain", {}).get("metrics", {})
    if "knn_l_half_trained" in m:
        rows += ["", "SplitBrain's halves alone (kNN top-1; random init: a fresh model of seed 0):", "",
                 "| features | random init | trained |", "|---|---|---|"]
        rows += [f"| {name} | {m[f'knn_{key}_random_init']:.4f} | {m[f'knn_{key}_trained']:.4f} |"
                 for name, key in (("L half (L -> ab)", "l_half"), ("ab half (ab -> L)", "ab_half"), ("both", "both"))]
        if "knn_both_balanced_trained" in m:
            rows.append(f"| both, each half L2-normalised | {m['knn_both_balanced_random_init']:.4f} | "
                        f"{m['knn_both_balanced_trained']:.4f} |")
        for stage in sorted({k[len("knn_both_"):-len("_trained")] for k in m
                             if k.startswith("knn_both_") and k.endswith("_trained")} - {"", "balanced"}):
            rows += [f"| {name}, {stage} pooled | {m[f'knn_{key}_{stage}_random_init']:.4f} | "
                     f"{m[f'knn_{key}_{stage}_trained']:.4f} |" for name, key in (("L half", "l_half"), ("ab half", "ab_half"), ("both", "both"))]
    return "\n".join(rows) + "\n"


def main(specs: list[str], variant: str | None = None, overrides: list[str] | None = None) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for spec in specs:
        method, _, epochs = spec.partition(":")
        config = HERE / "synthetic_colour" / f"{method}.yaml"
        with tempfile.TemporaryDirectory() as run_dir:
            r = learning_check(str(config), int(epochs or 10), run_dir, TRAIN, EVAL, VAL, extra_args=overrides,
                               after_fit=HELDOUT[method])
        record = {**asdict(r), "config": f"experiments/synthetic_colour/{method}.yaml", "gain": r.gain}
        print(f"{method}{'.' + variant if variant else ''}: kNN {r.knn_random_init:.4f} -> {r.knn_trained:.4f} "
              f"({r.epochs} epochs, {r.seconds:.0f} s) {' '.join(overrides or [])}; "
              + ", ".join(f"{k} {v:.4f}" for k, v in r.metrics.items() if k.startswith("heldout")), flush=True)
        if variant is not None:  # beside the results, not in them
            record["overrides"] = overrides
            (OUT / "variants").mkdir(exist_ok=True)
            (OUT / "variants" / f"{method}.{variant}.json").write_text(json.dumps(record, indent=2) + "\n")
            print("\n" + table({method: record}))
            continue
        results[method] = record
        path.write_text(json.dumps(results, indent=2) + "\n")
    if variant is None:
        (OUT / "table.md").write_text(table(results))
        print("\n" + table(results))


if __name__ == "__main__":
    args, sys.argv = sys.argv[1:], sys.argv[:1]  # the CLI inside reads only its own arguments
    specs, variant, overrides = parse_variant_args(args)
    main(specs or ["colorization:10", "split_brain:10"], variant, overrides)
