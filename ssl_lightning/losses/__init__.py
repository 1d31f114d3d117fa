"""Losses as plain functions: testable alone and callable from any method."""
from ssl_lightning.losses.ntxent import nt_xent
from ssl_lightning.losses.regression import byol_loss

__all__ = ["nt_xent", "byol_loss"]
