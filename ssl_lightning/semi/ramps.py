"""Schedules of semi-supervised training: unlabelled-loss weights, learning-rate factors, EMA warm-up.

Each function maps the current step or epoch (and a length in the same unit) to a float, so it can weight a
loss or serve as a ``LambdaLR`` factor. The formulas follow the official code: ``sigmoid_rampup``,
``linear_rampup`` and ``cosine_rampdown`` as mean-teacher ``pytorch/mean_teacher/ramps.py`` (the sigmoid
shape from Laine & Aila's tempens), ``tempens_rampdown`` and ``pi_model_weight`` as tempens ``train.py``,
``fixmatch_lr_factor`` as fixmatch ``fixmatch.py`` and ``mean_teacher_momentum`` as mean-teacher
``pytorch/main.py``.
"""
from __future__ import annotations

import math


def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = clip(current / length, 0, 1)``: from exp(-5) ~ 0.0067 to 1; 1 if length is 0."""
    if length <= 0:
        return 1.0
    t = min(max(current, 0.0), length) / length
    return math.exp(-5.0 * (1.0 - t) ** 2)


def linear_rampup(current: float, length: float) -> float:
    """``clip(current / length, 0, 1)``; 1 if length is 0 (Pseudo-label over the first 40% of training,
    MixMatch's lambda_u over 16k steps)."""
    if length <= 0:
        return 1.0
    return min(max(current, 0.0), length) / length


def cosine_rampdown(current: float, length: float) -> float:
    """``(cos(pi t) + 1) / 2`` with ``t = clip(current / length, 0, 1)``: from 1 to 0 (SGDR's shape)."""
    if length <= 0:
        return 0.0
    t = min(max(current, 0.0), length) / length
    return 0.5 * (math.cos(math.pi * t) + 1.0)


def tempens_rampdown(epoch: float, num_epochs: int, length: float = 50) -> float:
    """Laine & Aila's ramp-down of the learning rate (and Adam's beta1) over the last ``length`` epochs:
    ``exp(-(e / 2)^2 / length)`` with ``e = epoch - (num_epochs - length)``, 1 before."""
    start = num_epochs - length
    if epoch < start:
        return 1.0
    e = 0.5 * (epoch - start)
    return math.exp(-(e * e) / length)


def pi_model_weight(epoch: int, w_max: float, rampup_length: float = 80, num_labelled: int | None = None,
                    num_samples: int | None = None) -> float:
    """The Pi-model / temporal-ensembling unsupervised weight ``w(t) = w_max sigmoid_rampup(t, 80)``, 0 in
    the first epoch (``epoch`` counts from 0); ``w_max`` is scaled by ``num_labelled / num_samples`` when
    both are given, as tempens does (w_max 100 for the Pi-model, 30 for temporal ensembling on CIFAR-10)."""
    if epoch <= 0:
        return 0.0
    if num_labelled is not None and num_samples is not None:
        w_max = w_max * num_labelled / num_samples
    return w_max * sigmoid_rampup(epoch, rampup_length)


def fixmatch_lr_factor(step: int, total_steps: int) -> float:
    """FixMatch's learning-rate factor ``cos(7 pi k / (16 K))`` with ``k / K`` clipped to [0, 1]: 1 at the
    start, cos(7 pi / 16) ~ 0.195 at the end (not 0)."""
    progress = min(max(step / total_steps, 0.0), 1.0) if total_steps > 0 else 1.0
    return math.cos(7.0 * math.pi * progress / 16.0)


def mean_teacher_momentum(step: int, alpha: float) -> float:
    """Mean Teacher's EMA decay ``min(1 - 1 / (step + 1), alpha)``: the teacher starts as a plain average of
    the first students (0 at step 0: a copy) and settles at ``alpha``."""
    return min(1.0 - 1.0 / (step + 1), alpha)


def ema_warmup_decay(step: int, decay: float) -> float:
    """TensorFlow's ``ExponentialMovingAverage(decay, num_updates=step)``: ``min(decay, (1 + t) / (10 + t))``. Unlike
    :func:`mean_teacher_momentum` (a plain average of all models so far while ``1 - 1/(t+1) < decay``), it weights
    the last ~t/10 steps, so that a short run's EMA model holds neither the initial weights nor the earliest
    ones; from t ~ 9,000 on it is ``decay`` (0.999) itself."""
    return min(decay, (1.0 + step) / (10.0 + step))
