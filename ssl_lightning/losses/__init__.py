"""Losses as plain functions: testable alone and callable from any method."""
from ssl_lightning.losses.infonce import moco_infonce, mocov3_infonce
from ssl_lightning.losses.ntxent import nt_xent
from ssl_lightning.losses.regression import byol_loss

__all__ = ["byol_loss", "moco_infonce", "mocov3_infonce", "nt_xent"]
