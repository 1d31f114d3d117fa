"""Losses as plain functions: testable alone and callable from any method."""
from ssl_lightning.losses.barlow_twins import barlow_twins_loss
from ssl_lightning.losses.dino import DINOLoss, dino_cross_entropy, teacher_temperature
from ssl_lightning.losses.infonce import moco_infonce, mocov3_infonce
from ssl_lightning.losses.ntxent import nt_xent
from ssl_lightning.losses.regression import byol_loss
from ssl_lightning.losses.simsiam import simsiam_loss
from ssl_lightning.losses.swav import sinkhorn, swapped_prediction, swav_loss
from ssl_lightning.losses.vicreg import covariance_loss, invariance_loss, variance_loss, vicreg_loss
from ssl_lightning.losses.wmse import cholesky_whiten, wmse_loss

__all__ = ["DINOLoss", "barlow_twins_loss", "byol_loss", "cholesky_whiten", "covariance_loss", "dino_cross_entropy",
           "invariance_loss", "moco_infonce", "mocov3_infonce", "nt_xent", "simsiam_loss", "sinkhorn", "swapped_prediction",
           "swav_loss", "teacher_temperature", "variance_loss", "vicreg_loss", "wmse_loss"]
