"""Losses as plain functions, testable alone and callable from any method, grouped by family
(``instance/``, ``joint_embedding/``, ``metric/``, ``mutual_information/``, ``pretext/``, ``autoencoding/``,
``semi_supervised/``); every one is importable from here."""
import sys as _sys

from ssl_lightning.losses.autoencoding import (context_encoder_loss, denoising_weights, discriminator_loss,
                                               generator_adversarial_loss, overlap_weights, reconstruction_loss,
                                               region_weights)
from ssl_lightning.losses.instance.nat import nat_assign, nat_loss
from ssl_lightning.losses.instance.npid import npid_nce_loss, npid_nce_probs, npid_softmax_loss
from ssl_lightning.losses.joint_embedding.barlow_twins import barlow_twins_loss
from ssl_lightning.losses.joint_embedding.dino import DINOLoss, dino_cross_entropy, teacher_temperature
from ssl_lightning.losses.joint_embedding.muconpro import kde_terms, muconpro_loss, soft_mean
from ssl_lightning.losses.joint_embedding.ntxent import nt_xent
from ssl_lightning.losses.joint_embedding.regression import byol_loss
from ssl_lightning.losses.joint_embedding.simsiam import simsiam_loss
from ssl_lightning.losses.joint_embedding.swav import sinkhorn, swapped_prediction, swav_loss
from ssl_lightning.losses.joint_embedding.twist import multicrop_twist_loss, self_label_loss, teacher_twist_loss, twist_loss
from ssl_lightning.losses.joint_embedding.vicreg import covariance_loss, invariance_loss, variance_loss, vicreg_loss
from ssl_lightning.losses.joint_embedding.wmse import cholesky_whiten, wmse_loss
from ssl_lightning.losses.metric.contrastive_margin import contrastive_margin_loss
from ssl_lightning.losses.metric.infonce import info_nce, moco_infonce, mocov3_infonce
from ssl_lightning.losses.metric.nce import nce_logit, nce_loss
from ssl_lightning.losses.metric.soft_nearest_neighbour import soft_nearest_neighbour_loss
from ssl_lightning.losses.mutual_information.cpc import cpc_infonce
from ssl_lightning.losses.mutual_information.dim import (dim_loss, dim_scores, dv_mi_loss, infonce_mi_loss, jsd_mi_loss,
                                                         prior_discriminator_loss, prior_encoder_loss)
from ssl_lightning.losses.pretext.colorization import colorization_loss
from ssl_lightning.losses.semi_supervised import (adversarial_direction, fixmatch_loss, guess_labels, mixmatch_loss,
                                                  normalise_per_sample, vat_loss)

# the module paths from before the families (``ssl_lightning.losses.swav``), for code written against them
for _family, _names in {"joint_embedding": ("barlow_twins", "dino", "muconpro", "ntxent", "regression", "simsiam", "swav",
                                            "twist", "vicreg", "wmse"),
                        "metric": ("contrastive_margin", "infonce", "nce", "soft_nearest_neighbour")}.items():
    for _name in _names:
        _sys.modules.setdefault(f"{__name__}.{_name}", _sys.modules[f"{__name__}.{_family}.{_name}"])

__all__ = [
    "adversarial_direction",
    "barlow_twins_loss",
    "byol_loss",
    "cholesky_whiten",
    "colorization_loss",
    "context_encoder_loss",
    "contrastive_margin_loss",
    "covariance_loss",
    "cpc_infonce",
    "denoising_weights",
    "dim_loss",
    "dim_scores",
    "dino_cross_entropy",
    "DINOLoss",
    "discriminator_loss",
    "dv_mi_loss",
    "fixmatch_loss",
    "generator_adversarial_loss",
    "guess_labels",
    "info_nce",
    "infonce_mi_loss",
    "invariance_loss",
    "jsd_mi_loss",
    "kde_terms",
    "mixmatch_loss",
    "moco_infonce",
    "mocov3_infonce",
    "muconpro_loss",
    "multicrop_twist_loss",
    "nat_assign",
    "nat_loss",
    "nce_logit",
    "nce_loss",
    "normalise_per_sample",
    "npid_nce_loss",
    "npid_nce_probs",
    "npid_softmax_loss",
    "nt_xent",
    "overlap_weights",
    "prior_discriminator_loss",
    "prior_encoder_loss",
    "reconstruction_loss",
    "region_weights",
    "self_label_loss",
    "simsiam_loss",
    "sinkhorn",
    "soft_mean",
    "soft_nearest_neighbour_loss",
    "swapped_prediction",
    "swav_loss",
    "teacher_temperature",
    "teacher_twist_loss",
    "twist_loss",
    "variance_loss",
    "vat_loss",
    "vicreg_loss",
    "wmse_loss",
]
