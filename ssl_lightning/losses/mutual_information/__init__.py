"""Mutual-information losses: CPC's InfoNCE over a patch grid (Oord et al. 2018), each prediction against every
patch of the (global) batch."""
from ssl_lightning.losses.mutual_information.cpc import cpc_infonce

__all__ = ["cpc_infonce"]
