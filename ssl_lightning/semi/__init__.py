"""Shared pieces of semi-supervised learning, each a plain function (or a small stateful module):
schedules, confidence masks, sharpening, MixUp, interleaving, unlabelled losses, the temporal ensemble."""
from ssl_lightning.modules.batchnorm import frozen_bn_stats
from ssl_lightning.semi.consistency import entropy, kl_consistency, masked_cross_entropy, softmax_mse
from ssl_lightning.semi.ensemble import TemporalEnsemble
from ssl_lightning.semi.interleave import deinterleave, interleave, interleave_offsets
from ssl_lightning.semi.masks import confidence_mask, hard_pseudo_labels, pseudo_label
from ssl_lightning.semi.mixup import MixUpResult, mix, mixup, sample_lambda
from ssl_lightning.semi.ramps import ema_warmup_decay
from ssl_lightning.semi.ramps import (cosine_rampdown, fixmatch_lr_factor, linear_rampup, mean_teacher_momentum,
                                      pi_model_weight, sigmoid_rampup, tempens_rampdown)
from ssl_lightning.semi.sharpen import sharpen

__all__ = [
    "MixUpResult",
    "TemporalEnsemble",
    "confidence_mask",
    "cosine_rampdown",
    "deinterleave",
    "ema_warmup_decay",
    "entropy",
    "fixmatch_lr_factor",
    "frozen_bn_stats",
    "hard_pseudo_labels",
    "interleave",
    "interleave_offsets",
    "kl_consistency",
    "linear_rampup",
    "masked_cross_entropy",
    "mean_teacher_momentum",
    "mix",
    "mixup",
    "pi_model_weight",
    "pseudo_label",
    "sample_lambda",
    "sharpen",
    "sigmoid_rampup",
    "softmax_mse",
    "tempens_rampdown",
]
