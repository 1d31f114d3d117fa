"""Losses as plain functions: testable alone and callable from any method."""
from ssl_lightning.losses.barlow_twins import barlow_twins_loss
from ssl_lightning.losses.contrastive_margin import contrastive_margin_loss
from ssl_lightning.losses.dino import DINOLoss, dino_cross_entropy, teacher_temperature
from ssl_lightning.losses.infonce import info_nce, moco_infonce, mocov3_infonce
from ssl_lightning.losses.muconpro import kde_terms, muconpro_loss, soft_mean
from ssl_lightning.losses.nce import nce_logit, nce_loss
from ssl_lightning.losses.ntxent import nt_xent
from ssl_lightning.losses.regression import byol_loss
from ssl_lightning.losses.simsiam import simsiam_loss
from ssl_lightning.losses.soft_nearest_neighbour import soft_nearest_neighbour_loss
from ssl_lightning.losses.swav import sinkhorn, swapped_prediction, swav_loss
from ssl_lightning.losses.twist import multicrop_twist_loss, self_label_loss, teacher_twist_loss, twist_loss
from ssl_lightning.losses.vicreg import covariance_loss, invariance_loss, variance_loss, vicreg_loss
from ssl_lightning.losses.wmse import cholesky_whiten, wmse_loss

__all__ = [
    "DINOLoss",
    "barlow_twins_loss",
    "byol_loss",
    "cholesky_whiten",
    "contrastive_margin_loss",
    "covariance_loss",
    "dino_cross_entropy",
    "info_nce",
    "invariance_loss",
    "kde_terms",
    "moco_infonce",
    "mocov3_infonce",
    "muconpro_loss",
    "multicrop_twist_loss",
    "nce_logit",
    "nce_loss",
    "nt_xent",
    "self_label_loss",
    "simsiam_loss",
    "sinkhorn",
    "soft_nearest_neighbour_loss",
    "soft_mean",
    "swapped_prediction",
    "swav_loss",
    "teacher_temperature",
    "teacher_twist_loss",
    "twist_loss",
    "variance_loss",
    "vicreg_loss",
    "wmse_loss",
]
